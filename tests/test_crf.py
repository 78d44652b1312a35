"""The dense CRF's one entry point: both backends follow colour edges and validate inputs; the torch backend
agrees with the pydensecrf reference (synthetic and real WSSS4LUAD images), is deterministic, and a batch equals
its images one by one; a missing pydensecrf fails clearly."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_wsss_cram.core.crf import CRFParams, dense_crf, dense_crf_torch, resolve_backend
from napari_wsss_cram.core.errors import DependencyError

BACKENDS = ["torch", "pydensecrf"]


def _two_colour_image(h: int = 48, w: int = 64, edge: int = 40) -> np.ndarray:
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[:, :edge] = (220, 90, 140)   # pink
    image[:, edge:] = (70, 40, 150)    # purple
    return image


@pytest.mark.parametrize("backend", BACKENDS)
def test_crf_snaps_a_misplaced_boundary_to_the_colour_edge(backend):
    image = _two_colour_image()
    # Unaries put the boundary at column 28, 12 px left of the true colour edge at 40, and weakly.
    probs = np.zeros((2, 48, 64), dtype=np.float32)
    probs[0, :, :28] = 0.6
    probs[0, :, 28:] = 0.4
    probs[1] = 1 - probs[0]
    refined = dense_crf(image, probs, CRFParams(backend=backend))
    assert refined.shape == probs.shape and refined.dtype == np.float32
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-4)
    labels = refined.argmax(0)
    truth = np.zeros((48, 64), dtype=np.int64)
    truth[:, 40:] = 1
    before = (probs.argmax(0) == truth).mean()
    after = (labels == truth).mean()
    assert before < 0.85 and after > 0.97


@pytest.mark.parametrize("backend", BACKENDS)
def test_crf_input_validation(backend):
    image = _two_colour_image()
    probs = np.full((2, 48, 64), 0.5, dtype=np.float32)
    params = CRFParams(backend=backend)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), probs, params)
    with pytest.raises(ValueError, match="sum to 1"):
        dense_crf(image, probs * 1.5, params)
    with pytest.raises(ValueError, match="shape"):
        dense_crf(image, probs[:, :10], params)
    # A non-contiguous, read-only view is fine: it is copied to the C-contiguous buffer pydensecrf needs.
    flipped = image[:, ::-1]
    flipped.flags.writeable = False
    assert dense_crf(flipped, probs, params).shape == probs.shape


def test_missing_pydensecrf_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    assert resolve_backend(CRFParams()) == "torch"  # "auto" falls back to the torch backend
    with pytest.raises(DependencyError, match="pip install pydensecrf2"):
        dense_crf(_two_colour_image(), np.full((2, 48, 64), 0.5, dtype=np.float32), CRFParams(backend="pydensecrf"))


def test_params_round_trip_and_backend_setting():
    params = CRFParams(bilateral_srgb=5, iterations=3, backend="pydensecrf")
    assert CRFParams.from_dict(params.to_dict()) == params
    assert CRFParams.from_dict(None) == CRFParams()
    assert CRFParams.from_dict({"iterations": 2}).backend == "auto"  # checkpoints saved before the setting
    # auto: torch where the work is on CUDA, pydensecrf on the CPU (faster per core there), torch without it
    assert resolve_backend(CRFParams(), "cuda:1") == "torch"
    assert resolve_backend(CRFParams()) == resolve_backend(None, "cpu") == "pydensecrf"
    assert resolve_backend(params, "cuda") == "pydensecrf" and resolve_backend(CRFParams(backend="torch")) == "torch"
    with pytest.raises(ValueError, match="backend"):
        CRFParams(backend="cuda")


# ----------------------------------------------------------------------------- torch vs the pydensecrf reference

def _realistic_probs(mask: np.ndarray, classes: int, seed: int = 0) -> np.ndarray:
    """Softmax of a blurred, noisy one-hot of ``mask`` (wrong near boundaries, unsure in places), as a model's."""
    rng = np.random.default_rng(seed)
    onehot = np.eye(classes, dtype=np.float32)[mask].transpose(2, 0, 1)
    logits = torch.from_numpy(3.0 * onehot + rng.normal(0, 2.0, onehot.shape).astype(np.float32))[None]
    logits = F.avg_pool2d(logits, 9, stride=1, padding=4, count_include_pad=False)
    return logits[0].softmax(0).numpy()


def _synthetic_case(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from napari_wsss_cram.core.sample import make_patch

    rgb, mask = make_patch(seed, size, (0, 1))
    return np.ascontiguousarray(rgb[..., :3]), _realistic_probs(np.asarray(mask, np.int64) % 3, 3, seed)


def _agreement(image: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    ref = dense_crf(image, probs, CRFParams(backend="pydensecrf"))
    out = dense_crf(image, probs, CRFParams(backend="torch"))
    assert out.shape == ref.shape and out.dtype == np.float32
    return float((ref.argmax(0) == out.argmax(0)).mean()), float(np.abs(ref - out).max())


def test_torch_agrees_with_pydensecrf_on_a_synthetic_patch():
    image, probs = _synthetic_case(128)
    agree, diff = _agreement(image, probs)
    print(f"\nsynthetic 128x128: labels agree on {100 * agree:.2f}% of pixels, max |dQ| {diff:.2e}")
    assert agree >= 0.95
    # the same lattice as pydensecrf: the probabilities match too, up to float32 summation order
    assert diff < 1e-3


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["00", "06"])
def test_torch_agrees_with_pydensecrf_on_real_images(wsss4luad_dir, name):
    from PIL import Image

    image = np.asarray(Image.open(wsss4luad_dir / "2.validation" / "img" / f"{name}.png").convert("RGB"))
    mask = np.asarray(Image.open(wsss4luad_dir / "2.validation" / "mask" / f"{name}.png")).astype(np.int64)
    agree, diff = _agreement(image, _realistic_probs(mask, 4))
    print(f"\nWSSS4LUAD {name}.png {image.shape[1]}x{image.shape[0]}: labels agree on {100 * agree:.2f}%, "
          f"max |dQ| {diff:.2e}")
    assert agree >= 0.95


def test_torch_crf_is_deterministic_and_a_batch_equals_its_images():
    cases = [_synthetic_case(64, seed) for seed in (1, 2)]
    images = torch.from_numpy(np.stack([c[0] for c in cases]))
    probs = torch.from_numpy(np.stack([c[1] for c in cases]))
    first = dense_crf_torch(images, probs)
    again = dense_crf_torch(images, probs)
    assert torch.equal(first, again)
    assert first.shape == probs.shape and first.dtype == torch.float32 and not first.requires_grad
    for i in range(2):
        alone = dense_crf_torch(images[i:i + 1], probs[i:i + 1])[0]
        torch.testing.assert_close(first[i], alone, atol=1e-6, rtol=0)
    # float colours in 0..255 (the inference engine's work tiles) give what the uint8 image gives
    torch.testing.assert_close(dense_crf_torch(images.float(), probs), first, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="B, H, W, 3"):
        dense_crf_torch(images.permute(0, 3, 1, 2), probs)


def test_predict_cli_parses_the_backend():
    from napari_wsss_cram.commands.predict import _parse_crf_params
    from napari_wsss_cram.core.errors import WsssCramError

    params = _parse_crf_params("bilateral_srgb=5, iterations=3, backend=pydensecrf")
    assert params == CRFParams(bilateral_srgb=5.0, iterations=3, backend="pydensecrf")
    assert _parse_crf_params(None).backend == "auto"
    with pytest.raises(WsssCramError, match="backend must be one of"):
        _parse_crf_params("backend=gpu")


def test_isolated_pydensecrf_runs_in_a_helper_process_with_the_same_result():
    """The GUI's path for pydensecrf (a helper process, so the worker thread never holds the GIL) changes
    nothing in the result, and checks its inputs in the caller's process."""
    from napari_wsss_cram.core import crf as crf_module

    image, probs = _synthetic_case(48)
    params = CRFParams(backend="pydensecrf", iterations=3)
    isolated = crf_module.dense_crf_isolated(image, probs, params)
    assert crf_module._HELPER.pool is not None  # pydensecrf went to the helper
    np.testing.assert_array_equal(isolated, dense_crf(image, probs, params))
    torch_params = CRFParams(backend="torch", iterations=3)
    np.testing.assert_array_equal(crf_module.dense_crf_isolated(image, probs, torch_params),
                                  dense_crf(image, probs, torch_params))
    with pytest.raises(ValueError, match="sum to 1"):
        crf_module.dense_crf_isolated(image, probs * 2, params)
