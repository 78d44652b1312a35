"""Reliable pseudo-label rules on hand-made activation maps (K = 3 tissue classes + background)."""

from __future__ import annotations

import numpy as np
import torch

from napari_wsss_cram.core.classes import IGNORE_INDEX
from napari_wsss_cram.core.crf import CRFParams
from napari_wsss_cram.core.pseudo_labels import (
    batch_pseudo_labels,
    reliable_pseudo_labels,
    reliable_pseudo_labels_batch,
)

BG = 3


def _image(h=32, w=48):
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[:] = (200, 60, 120)          # pink tissue, gray < 200
    return image


def test_alpha_beta_thresholds_without_crf():
    maps = np.zeros((4, 32, 48), dtype=np.float32)
    maps[0, :, :16] = 0.95   # > beta -> class 0
    maps[1, :, 16:32] = 0.6  # between alpha and beta -> ignore
    maps[2, :, 32:] = 0.1    # < alpha -> background
    out = reliable_pseudo_labels(maps, _image(), [1, 1, 1], crf=None, background_needs_white=False)
    assert out.dtype == np.uint8 and out.shape == (32, 48)
    assert (out[:, :16] == 0).all()
    assert (out[:, 16:32] == IGNORE_INDEX).all()
    assert (out[:, 32:] == BG).all()
    # Moving the thresholds moves the decisions.
    out = reliable_pseudo_labels(maps, _image(), [1, 1, 1], alpha=0.05, beta=0.5, crf=None,
                                 background_needs_white=False)
    assert (out[:, 16:32] == 1).all() and (out[:, 32:] == IGNORE_INDEX).all()


def test_low_activation_on_stained_tissue_is_unsure_not_background_by_default():
    image = _image()
    image[:, 40:] = 250  # glass on the right
    maps = np.zeros((4, 32, 48), dtype=np.float32)
    maps[0, :, :16] = 0.95
    maps[3] = 0.9  # a strong background map everywhere, as an untrained DA layer may give
    out = reliable_pseudo_labels(maps, image, [1, 1, 1], crf=None)
    assert (out[:, :16] == 0).all()
    assert (out[:, 16:40] == IGNORE_INDEX).all()  # stained, weakly activated: unsure
    assert (out[:, 40:] == BG).all()


def test_absent_classes_are_zeroed():
    maps = np.zeros((4, 32, 48), dtype=np.float32)
    maps[0] = 0.95
    maps[1, :, 24:] = 0.99  # stronger, but stroma is not in the image-level label
    out = reliable_pseudo_labels(maps, _image(), [1, 0, 0], crf=None)
    assert (out == 0).all()
    out = reliable_pseudo_labels(maps, _image(), [0, 0, 0], crf=None, background_needs_white=False)
    assert (out == BG).all()


def test_tissue_prior_marks_white_pixels_background():
    image = _image()
    image[:8] = 245  # glass
    maps = np.zeros((4, 32, 48), dtype=np.float32)
    maps[0] = 0.95
    for crf in (None, CRFParams()):
        out = reliable_pseudo_labels(maps, image, [1, 0, 0], crf=crf)
        assert (out[:8] == BG).all() and (out[8:] == 0).all()
    out = reliable_pseudo_labels(maps, image, [1, 0, 0], crf=None, tissue_threshold=None)
    assert (out == 0).all()


def test_crf_agreement_keeps_agreeing_pixels_and_ignores_disagreement():
    # Two colours with the edge at column 24; the maps confidently put class 0 up to column 30.
    image = _image()
    image[:, 24:] = (60, 40, 160)
    maps = np.zeros((4, 32, 48), dtype=np.float32)
    maps[0, :, :30] = 0.95
    maps[1, :, 30:] = 0.95
    maps[1, :, 24:30] = 0.8  # the purple side also activates class 1, less strongly
    maps[3] = 0.3
    without = reliable_pseudo_labels(maps, image, [1, 1, 0], crf=None)
    assert (without[:, 24:30] == 0).all()
    with_crf = reliable_pseudo_labels(maps, image, [1, 1, 0], crf=CRFParams())
    # The CRF follows the colour edge, disagrees on columns 24..29 -> those become 255.
    assert (with_crf[:, 24:30] == IGNORE_INDEX).mean() > 0.9
    assert (with_crf[:, :22] == 0).all() and (with_crf[:, 32:] == 1).all()


def test_maps_at_feature_resolution_and_torch_batches():
    maps = np.zeros((2, 4, 4, 6), dtype=np.float32)
    maps[:, 0, :, :3] = 0.97
    maps[:, 3, :, 3:] = 1.0
    images = np.stack([_image(), _image()])
    out = batch_pseudo_labels(torch.from_numpy(maps), images, torch.tensor([[1, 0, 0], [1, 0, 0]]), crf=None,
                              background_needs_white=False)
    assert out.shape == (2, 32, 48)
    assert (out[:, :, :20] == 0).all() and (out[:, :, 28:] == BG).all()


def test_batched_rule_equals_the_per_image_rule_for_both_crf_backends():
    """The trainer's batched, on-device rule gives the per-image rule's labels; the CRF backends agree."""
    rng = np.random.default_rng(3)
    maps = rng.random((2, 4, 12, 16)).astype(np.float32)
    maps[:, 0, :, :8] += 0.8
    images = np.stack([_image(), _image()])
    images[:, :, 24:] = (110, 60, 150)   # a purple block: a colour edge for the CRF
    images[1, :4] = 250                  # near-white rows: background by the tissue prior
    labels = np.array([[1, 0, 1], [1, 1, 0]], np.float32)
    out = {}
    for backend in ("torch", "pydensecrf"):
        crf = CRFParams(backend=backend)
        batched = reliable_pseudo_labels_batch(torch.from_numpy(maps), torch.from_numpy(images),
                                               torch.from_numpy(labels), alpha=0.2, beta=0.6, crf=crf)
        assert batched.dtype == torch.uint8 and batched.shape == (2, 32, 48)
        single = np.stack([reliable_pseudo_labels(m, im, lab, alpha=0.2, beta=0.6, crf=crf)
                           for m, im, lab in zip(maps, images, labels, strict=True)])
        assert np.array_equal(batched.numpy(), single)
        out[backend] = single
    assert (out["torch"] == out["pydensecrf"]).mean() > 0.99
    assert (out["torch"][1, :4] == BG).all() and not np.isin(out["torch"][0], [1]).any()
    assert (out["torch"] == IGNORE_INDEX).any() and (out["torch"] == 0).any()


def test_segmentation_pseudo_label_keeps_the_patch_classes_and_tissue():
    from napari_wsss_cram.core.pseudo_labels import segmentation_pseudo_label

    image = np.full((6, 8, 3), 150, np.uint8)
    image[:, 4:] = 250                                    # glass on the right
    probs = np.zeros((4, 6, 8), np.float32)
    probs[1] = 0.6                                        # stroma favoured, but the patch is tumor+normal
    probs[0, :3] = 0.3
    probs[2, :3] = 0.1
    probs[0, 3:] = 0.2
    probs[2, 3:] = 0.2                                    # a tie between the present classes: unsure
    probs[3] = 1.0 - probs[:3].sum(0)
    label = segmentation_pseudo_label(probs, image, [1, 0, 1], min_confidence=0.6)
    assert (label[:3, :4] == 0).all()                     # tumor holds 0.75 of the present classes' mass
    assert (label[3:, :4] == 255).all()                   # 0.5 / 0.5: below the confidence floor
    assert (label[:, 4:] == 3).all()                      # glass is background
    assert not (label == 1).any()                         # an absent class never appears


def test_isolated_crf_gives_the_same_pseudo_labels():
    """The dock's pseudo-label view runs pydensecrf in a helper process: same labels as in this process."""
    rng = np.random.default_rng(4)
    maps = rng.random((4, 16, 24)).astype(np.float32)
    image = _image()
    image[:, 30:] = (110, 60, 150)
    crf = CRFParams(backend="pydensecrf", iterations=3)
    here = reliable_pseudo_labels(maps, image, [1, 1, 0], alpha=0.2, beta=0.6, crf=crf)
    isolated = reliable_pseudo_labels(maps, image, [1, 1, 0], alpha=0.2, beta=0.6, crf=crf, crf_isolated=True)
    assert np.array_equal(here, isolated) and (here != IGNORE_INDEX).any()
