"""The dense-CRF wrapper: it follows colour edges, validates inputs, and fails clearly without pydensecrf."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from napari_wsss_cram.core.crf import CRFParams, dense_crf
from napari_wsss_cram.core.errors import DependencyError


def _two_colour_image(h: int = 48, w: int = 64, edge: int = 40) -> np.ndarray:
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[:, :edge] = (220, 90, 140)   # pink
    image[:, edge:] = (70, 40, 150)    # purple
    return image


def test_crf_snaps_a_misplaced_boundary_to_the_colour_edge():
    image = _two_colour_image()
    # Unaries put the boundary at column 28, 12 px left of the true colour edge at 40, and weakly.
    probs = np.zeros((2, 48, 64), dtype=np.float32)
    probs[0, :, :28] = 0.6
    probs[0, :, 28:] = 0.4
    probs[1] = 1 - probs[0]
    refined = dense_crf(image, probs, CRFParams())
    assert refined.shape == probs.shape and refined.dtype == np.float32
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-4)
    labels = refined.argmax(0)
    truth = np.zeros((48, 64), dtype=np.int64)
    truth[:, 40:] = 1
    before = (probs.argmax(0) == truth).mean()
    after = (labels == truth).mean()
    assert before < 0.85 and after > 0.97


def test_crf_input_validation():
    image = _two_colour_image()
    probs = np.full((2, 48, 64), 0.5, dtype=np.float32)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), probs)
    with pytest.raises(ValueError, match="sum to 1"):
        dense_crf(image, probs * 1.5)
    with pytest.raises(ValueError, match="shape"):
        dense_crf(image, probs[:, :10])
    # A non-contiguous view is fine: it is copied to the C-contiguous buffer pydensecrf needs.
    flipped = image[:, ::-1]
    assert dense_crf(flipped, probs).shape == probs.shape


def test_missing_pydensecrf_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    with pytest.raises(DependencyError, match="pip install pydensecrf2"):
        dense_crf(_two_colour_image(), np.full((2, 48, 64), 0.5, dtype=np.float32))


def test_params_round_trip():
    params = CRFParams(bilateral_srgb=5, iterations=3)
    assert CRFParams.from_dict(params.to_dict()) == params
    assert CRFParams.from_dict(None) == CRFParams()
