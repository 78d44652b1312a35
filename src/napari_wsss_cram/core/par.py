"""Pixel-adaptive refinement (PAR) of class probabilities by colour and position affinities.

A re-implementation of the refinement in AFA (Ru et al., CVPR 2022, "Learning Affinity from Attention"): each
pixel's probabilities are replaced, ``iterations`` times, by an average of its neighbours' at several dilations,
weighted by a softmax over the neighbours of their colour similarity (the colour distance scaled by the local
colour spread of that neighbourhood) plus a small position term. Labels therefore spread across regions of
uniform colour and stop at colour edges, like a dense CRF's message passing but without unary terms: where the
network was unsure inside a homogeneous region, the region's confident pixels decide.

Used to refine the segmentation branch's probabilities before they become the next round's pseudo-labels
(``make_pseudo_labels(..., refine="par")``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: AFA's dilations and iterations (a field of view of 2 x 24 px around each pixel)
DEFAULT_DILATIONS = (1, 2, 4, 8, 12, 24)
DEFAULT_ITERATIONS = 10
#: temperature of the colour and position affinities (AFA's w1) and weight of the position term (w2)
COLOUR_TEMPERATURE = 0.3
POSITION_WEIGHT = 0.01

# the 8 neighbours of a pixel, as (dy, dx), and their distance in units of the dilation
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _neighbours(x: torch.Tensor, dilations: tuple[int, ...]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, N, H, W): the 8 neighbours of each pixel at each dilation (edges replicated)."""
    h, w = x.shape[-2:]
    out = []
    for d in dilations:
        padded = F.pad(x, (d, d, d, d), mode="replicate")
        for dy, dx in _OFFSETS:
            out.append(padded[..., d + dy * d: d + dy * d + h, d + dx * d: d + dx * d + w])
    return torch.stack(out, dim=2)


def pixel_adaptive_refine(image: torch.Tensor, probs: torch.Tensor, dilations: tuple[int, ...] = DEFAULT_DILATIONS,
                          iterations: int = DEFAULT_ITERATIONS) -> torch.Tensor:
    """Refine ``probs`` (B, C, H, W) by the colour affinities of ``image`` (B, 3, H, W, any colour scale).

    Returns probabilities of the same shape (each pixel's still sum to its input's sum): every iteration
    replaces a pixel's vector by an affinity-weighted mean of its neighbours' at ``dilations``.
    """
    if image.shape[-2:] != probs.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape[-2:])} and probabilities {tuple(probs.shape[-2:])} differ in size.")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}.")
    dilations = tuple(int(d) for d in dilations)
    if not dilations or min(dilations) < 1:
        raise ValueError(f"dilations must be positive, got {dilations}.")
    image = image.float()
    probs = probs.float()
    neighbours = _neighbours(image, dilations)                           # (B, 3, N, H, W)
    spread = neighbours.std(dim=2, keepdim=True)
    colour = -((neighbours - image[:, :, None]).abs() / (spread + 1e-8) / COLOUR_TEMPERATURE).square()
    colour = colour.mean(dim=1, keepdim=True)                            # (B, 1, N, H, W)
    distance = torch.tensor([d * (math.sqrt(2.0) if dy and dx else 1.0)
                             for d in dilations for dy, dx in _OFFSETS], dtype=image.dtype, device=image.device)
    position = -(distance / (distance.std() + 1e-8) / COLOUR_TEMPERATURE).square()
    affinity = torch.softmax(colour, dim=2) + POSITION_WEIGHT * torch.softmax(position, dim=0)[None, None, :, None,
                                                                                            None]
    affinity = affinity / affinity.sum(dim=2, keepdim=True)
    for _ in range(iterations):
        probs = (_neighbours(probs, dilations) * affinity).sum(dim=2)
    return probs
