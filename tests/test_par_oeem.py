"""Pixel-adaptive refinement (PAR) and OEEM weighting: the behaviour each exists for, on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_wsss_cram.core.losses import pixel_weighted_ce
from napari_wsss_cram.core.par import pixel_adaptive_refine
from napari_wsss_cram.core.pseudo_labels import segmentation_pseudo_label


def _two_regions(size: int = 64) -> torch.Tensor:
    """(1, 3, size, size): pink on the left half, purple on the right half (a sharp colour edge)."""
    image = torch.empty(1, 3, size, size)
    image[..., : size // 2] = torch.tensor([230.0, 150.0, 190.0])[:, None, None]
    image[..., size // 2:] = torch.tensor([90.0, 40.0, 140.0])[:, None, None]
    image += torch.randn(image.shape, generator=torch.Generator().manual_seed(0)) * 2.0  # a little stain noise
    return image


def test_par_spreads_a_label_across_a_uniform_region_and_stops_at_the_colour_edge():
    image = _two_regions()
    probs = torch.full((1, 2, 64, 64), 0.5)
    probs[0, :, 20:28, 8:16] = torch.tensor([1.0, 0.0])[:, None, None]   # confident class 0 inside the left region
    probs[0, :, 36:44, 48:56] = torch.tensor([0.0, 1.0])[:, None, None]  # confident class 1 inside the right region
    refined = pixel_adaptive_refine(image, probs)
    label = refined.argmax(dim=1)[0]
    assert torch.allclose(refined.sum(dim=1), torch.ones(1, 64, 64), atol=1e-4)
    left, right = label[:, :30], label[:, 34:]
    # the unsure pixels of each region took the label of that region's confident pixels ...
    assert (left == 0).float().mean() > 0.95 and (right == 1).float().mean() > 0.95
    # ... and the edge stayed where the colour changes, not where the two seeds are equidistant
    assert (label[:, 31] == 0).all() and (label[:, 32] == 1).all()


def test_par_without_iterations_is_the_identity_and_checks_its_inputs():
    image, probs = _two_regions(16), torch.rand(1, 3, 16, 16)
    assert torch.equal(pixel_adaptive_refine(image, probs, iterations=0), probs)
    with pytest.raises(ValueError, match="differ in size"):
        pixel_adaptive_refine(image, torch.rand(1, 3, 8, 8))


def test_segmentation_pseudo_label_with_par_relabels_a_noisy_region():
    image = _two_regions().permute(0, 2, 3, 1)[0].clamp(0, 255).numpy().astype(np.uint8)
    rng = np.random.default_rng(0)
    probs = np.zeros((4, 64, 64), np.float32)        # tumor, stroma, normal, background
    probs[0], probs[1] = 0.8, 0.2
    probs[:, :, 32:] = 0.0
    probs[1, :, 32:], probs[0, :, 32:] = 0.8, 0.2
    flip = rng.random((64, 64)) < 0.2                 # 20% salt-and-pepper errors inside both regions
    probs[0][flip], probs[1][flip] = probs[1][flip].copy(), probs[0][flip].copy()
    plain = segmentation_pseudo_label(probs, image, [1, 1, 0])
    refined = segmentation_pseudo_label(probs, image, [1, 1, 0], refine="par")
    truth = np.zeros((64, 64), np.uint8)
    truth[:, 32:] = 1
    assert (plain == truth).mean() < 0.85
    assert (refined == truth).mean() > 0.98


def test_oeem_weights_down_the_pixels_the_model_contradicts():
    # one image: 90 pixels where the model agrees with the label, 10 where it strongly disagrees (label noise)
    logits = torch.zeros(1, 2, 10, 10)
    logits[0, 0] = 4.0
    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target[0, 0, :] = 1  # noisy row: labelled 1, predicted 0 with confidence
    uniform = pixel_weighted_ce(logits, target)
    oeem = pixel_weighted_ce(logits, target, weighting="oeem")
    assert oeem < 0.2 * uniform
    # on a clean label both are the same mean cross-entropy
    clean = torch.zeros_like(target)
    assert torch.isclose(pixel_weighted_ce(logits, clean, weighting="oeem"), pixel_weighted_ce(logits, clean))


def test_pixel_weighted_ce_weights_images_and_skips_unlabelled_ones():
    logits = torch.zeros(2, 2, 4, 4, requires_grad=True)
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[1] = 255
    loss = pixel_weighted_ce(logits, target, torch.tensor([1.0, 5.0]))
    assert torch.isclose(loss, torch.tensor(np.log(2.0), dtype=torch.float32))  # the empty image does not dilute
    loss.backward()
    assert logits.grad[1].abs().sum() == 0
    with pytest.raises(ValueError, match="weighting"):
        pixel_weighted_ce(logits, target, weighting="focal")


def test_balanced_weighting_lifts_a_rare_class_and_is_uniform_when_classes_are_even():
    target = torch.zeros(2, 10, 10, dtype=torch.long)
    target[:, :, 5:] = 1
    target[1, :2, :2] = 2                                # 4 of 200 labelled pixels: the rare class
    target[0, 0, :] = 255                                # unlabelled pixels do not count
    logits = torch.zeros(2, 3, 10, 10)
    logits[:, 0] = 2.0                                   # the model says class 0 everywhere
    predicted = target.clamp(max=1)                      # right on classes 0 and 1, wrong only on the rare class
    wrong_on_rare = 5.0 * torch.nn.functional.one_hot(predicted, 3).permute(0, 3, 1, 2).float()
    uniform = pixel_weighted_ce(wrong_on_rare, target)
    balanced = pixel_weighted_ce(wrong_on_rare, target, weighting="balanced")
    assert balanced > 2.5 * uniform                      # the rare class's error counts ~sqrt(48) times more
    even = torch.zeros(1, 10, 10, dtype=torch.long)
    even[:, :, 5:] = 1
    assert torch.isclose(pixel_weighted_ce(logits[:1], even, weighting="balanced"), pixel_weighted_ce(logits[:1], even))
    with pytest.raises(ValueError, match="balanced"):
        pixel_weighted_ce(logits, target, weighting="sqrt")
