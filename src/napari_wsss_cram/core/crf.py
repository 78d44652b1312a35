"""The one dense-CRF wrapper (pydensecrf), used for pseudo-labels in training and label refinement at inference.

Defaults follow DSRG (Huang et al. 2018): a Gaussian (smoothness) kernel sxy=3 compat=3 and a bilateral
(appearance) kernel sxy=80 srgb=13 compat=10, run for 10 mean-field iterations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import DependencyError

INSTALL_HINT = "pip install pydensecrf2"


@dataclass
class CRFParams:
    """Dense-CRF settings (DSRG defaults). Distances in pixels of the image given to :func:`dense_crf`."""

    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    iterations: int = 10

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> CRFParams:
        data = dict(data or {})
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def _densecrf_module():
    """Import pydensecrf lazily so that a missing install fails with a hint, not an obscure ImportError."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as err:  # pragma: no cover - exercised only where pydensecrf is absent
        raise DependencyError(
            f"The dense CRF needs the 'pydensecrf' module, which could not be imported ({err}). "
            f"Install it with: {INSTALL_HINT}   (or turn the CRF off)."
        ) from err
    return dcrf


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams | None = None) -> np.ndarray:
    """Refine per-pixel class probabilities with a fully connected CRF.

    ``image``: uint8 RGB (H, W, 3). ``probs``: float (C, H, W), summing to 1 over C at each pixel.
    Returns float32 (C, H, W) probabilities after mean-field inference.
    """
    params = params or CRFParams()
    image = np.asarray(image)
    probs = np.asarray(probs)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense_crf needs a uint8 RGB image of shape (H, W, 3), got {image.dtype} {image.shape}.")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"dense_crf needs probabilities of shape (C, H, W) = (C, {image.shape[0]}, "
                         f"{image.shape[1]}), got {probs.shape}.")
    if probs.shape[0] < 2:
        raise ValueError("dense_crf needs at least two classes.")
    if not np.all(np.isfinite(probs)) or probs.min() < -1e-6:
        raise ValueError("dense_crf probabilities must be finite and non-negative.")
    sums = probs.sum(axis=0)
    if np.abs(sums - 1.0).max() > 1e-3:
        raise ValueError(f"dense_crf probabilities must sum to 1 over classes at each pixel "
                         f"(found sums between {sums.min():.4f} and {sums.max():.4f}).")
    dcrf = _densecrf_module()
    n_labels, height, width = probs.shape
    # pydensecrf reads the image buffer directly: it must be C-contiguous uint8, and writable (its typed
    # memoryview refuses read-only buffers, e.g. np.asarray of a PIL image).
    image = np.require(image, dtype=np.uint8, requirements=["C", "W"])
    unary = -np.log(np.clip(probs, 1e-8, 1.0)).reshape(n_labels, -1).astype(np.float32)
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=image,
                             compat=params.bilateral_compat)
    q = crf.inference(int(params.iterations))
    return np.asarray(q, dtype=np.float32).reshape(n_labels, height, width)
