"""Background is "not tissue": the near-white mask and the rule that turns a model's output into tissue classes.

One place for both, used by the inference engine, the label-constrained loss and the stage-2 pseudo-labels.
torch is imported inside the functions, so importing this module stays light (napari start-up).
"""

from __future__ import annotations

from typing import Any

#: gray-level weights (ITU-R BT.601), as for the tissue thumbnail and the pseudo-labels' tissue prior
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
#: gray level above which a pixel is glass or air, not tissue (the engine's mask, the pseudo-labels' prior, the
#: losses' background prior, the mosaic's white fill): one value everywhere
TISSUE_THRESHOLD = 200
#: the engine's class gate: a class whose image-level presence in a tile is below this is zeroed there. Low,
#: because gating out a present class loses it outright (see ``PredictSettings.gate_classes``)
GATE_THRESHOLD = 0.3


def near_white_mask(rgb: Any, threshold: float, cleanup: int = 5) -> Any:
    """bool (B, H, W) torch: not tissue (gray level > ``threshold``), from float RGB (B, H, W, 3) in 0..255.

    A ``cleanup`` x ``cleanup`` majority vote removes isolated specks of either kind (single bright pixels in
    stroma, dust on the glass), as the tissue masks of MLPS and PistoSeg do with their small-object removal.
    """
    import torch
    import torch.nn.functional as F

    weights = torch.tensor(GRAY_WEIGHTS, dtype=torch.float32, device=rgb.device)
    white = ((rgb.float() * weights).sum(-1) > threshold).float()[:, None]
    if cleanup > 1:
        white = F.avg_pool2d(white, cleanup, stride=1, padding=cleanup // 2, count_include_pad=False)
    return white[:, 0] > 0.5


def restrict_to_tissue(probs: Any, white: Any | None, presence: Any | None,
                       gate_threshold: float = GATE_THRESHOLD) -> Any:
    """Background is "not tissue": probabilities (B, K+1, H, W) -> the same, with background exactly where
    ``white`` (B, H, W) is true and, on tissue, the tissue classes renormalised among themselves.

    ``presence`` (B, K) gates classes: a class below ``gate_threshold`` is zeroed in that tile (the most
    present class is always kept). ``white=None`` keeps the model's own background channel (gating only).
    """
    import torch

    k = probs.shape[1] - 1
    tissue = probs[:, :k]
    if presence is not None:
        keep = presence.float() >= gate_threshold
        keep[torch.arange(len(keep), device=keep.device), presence.argmax(dim=1)] = True
        tissue = tissue * keep[:, :, None, None].to(tissue.dtype)
    if white is None:
        out = torch.cat([tissue, probs[:, k:]], dim=1)
        return out / out.sum(dim=1, keepdim=True).clamp_min(1e-8)
    total = tissue.sum(dim=1, keepdim=True)
    tissue = torch.where(total > 1e-8, tissue / total.clamp_min(1e-8), torch.full_like(tissue, 1.0 / max(1, k)))
    white = white[:, None].to(tissue.dtype)
    return torch.cat([tissue * (1.0 - white), white], dim=1)
