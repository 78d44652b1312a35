"""A stain prior for the pseudo-labels of crops that hold two co-occurring classes (tumor and stroma).

Inside a crop labelled "tumor and stroma", a model trained from image-level labels has no evidence of where
each one lies: on real WSSS4LUAD crops of that kind the segmentation branch's pseudo-labels agree with the
pathologist's mask on 52-56% of the pixels, a coin flip. The stain does carry that evidence: tumor is
nucleus-dense, stroma is eosin-rich with sparse nuclei. The hematoxylin density (colour deconvolution,
Ruifrok & Johnston 2001, smoothed over a few nuclei) ranks tumor above stroma pixels of those crops with an
AUC of 0.75 / 0.87 in the two folds of the benchmark, and thresholding it at its median over those crops labels
68% / 79% of the pixels right.

The prior is fitted without any pixel label: the density's quantiles over the tissue of every crop labelled
with both classes. Pixels of such a crop whose density lies above the upper quantile take the nucleus-dense
class, below the lower one the sparse class, in between they are left unlabelled (255), as the paper's
alpha/beta thresholds leave unsure activations out. Other classes the model found in the crop (normal tissue)
and the background keep the model's label. Crops with one of the two classes only are not touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

#: Ruifrok & Johnston's optical-density vectors of hematoxylin, eosin and DAB (rows), normalised
_STAIN_VECTORS = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]])
_UNMIX = np.linalg.inv(_STAIN_VECTORS / np.linalg.norm(_STAIN_VECTORS, axis=1, keepdims=True)).astype(np.float32)

#: the default pair: (the nucleus-dense class, the eosin-rich class with sparse nuclei)
DEFAULT_PAIR = ("tumor", "stroma")
#: smoothing of the density: a few nuclei at 0.25 µm/px (12 px = 3 µm; measured best of 4, 12, 24 px)
DENSITY_SIGMA_PX = 12.0
#: the quantiles of the density between which a pixel stays unlabelled (on real crops: 79% of the pixels kept,
#: 72% / 85% of them right in the two folds, against 52% / 56% for the model's own labels)
DEFAULT_BAND = (0.4, 0.6)
#: pixels sampled per crop to estimate the quantiles (memory stays small on thousands of crops)
_SAMPLES_PER_CROP = 4000


def hematoxylin_density(rgb: np.ndarray, tissue: np.ndarray, sigma_px: float = DENSITY_SIGMA_PX) -> np.ndarray:
    """float32 (H, W): the hematoxylin optical density of ``rgb`` (H, W, 3 uint8), averaged with a Gaussian of
    ``sigma_px`` over the ``tissue`` pixels only (glass does not dilute the nuclei next to it)."""
    from scipy.ndimage import gaussian_filter

    od = -np.log10(np.maximum(np.asarray(rgb[..., :3], dtype=np.float32), 1.0) / 255.0)
    hematoxylin = od @ _UNMIX[:, 0]
    weight = np.asarray(tissue, dtype=np.float32)
    smoothed = gaussian_filter(hematoxylin * weight, sigma_px, mode="reflect")
    norm = gaussian_filter(weight, sigma_px, mode="reflect")
    return (smoothed / np.maximum(norm, 1e-6)).astype(np.float32)


@dataclass(frozen=True)
class StainPrior:
    """Fitted thresholds of the hematoxylin density: above ``high`` the ``dense`` class, below ``low`` the
    ``sparse`` class (class indices), in between unlabelled."""

    dense: int
    sparse: int
    low: float
    high: float

    def applies_to(self, labels: np.ndarray) -> bool:
        """Whether a crop with these image-level labels holds both classes of the pair."""
        labels = np.asarray(labels).ravel()
        return bool(labels[self.dense] and labels[self.sparse])


def pair_indices(class_names: list[str], pair: tuple[str, str] = DEFAULT_PAIR) -> tuple[int, int]:
    """Indices of the pair's classes among ``class_names``; a clear error when the model has no such classes."""
    lowered = [n.lower() for n in class_names]
    missing = [n for n in pair if n.lower() not in lowered]
    if missing:
        raise ValueError(f"The stain prior separates '{pair[0]}' (nucleus-dense) from '{pair[1]}' (eosin-rich), but "
                         f"this model's classes are {', '.join(class_names)}; use refine 'none' or 'par'.")
    return lowered.index(pair[0].lower()), lowered.index(pair[1].lower())


def fit_stain_prior(densities: Iterable[np.ndarray], dense: int, sparse: int,
                    band: tuple[float, float] = DEFAULT_BAND, seed: int = 0) -> StainPrior:
    """Fit the thresholds from the tissue densities (1-D arrays, one per crop holding both classes): the
    ``band`` quantiles of their pooled pixels (a fixed number sampled per crop, so large crops do not dominate
    by more than their size)."""
    lo_q, hi_q = float(band[0]), float(band[1])
    if not 0.0 < lo_q <= hi_q < 1.0:
        raise ValueError(f"band must be two quantiles 0 < low <= high < 1, got {band}.")
    rng = np.random.default_rng(seed)
    samples = []
    for values in densities:
        values = np.asarray(values, dtype=np.float32).ravel()
        if values.size > _SAMPLES_PER_CROP:
            values = rng.choice(values, _SAMPLES_PER_CROP, replace=False)
        samples.append(values)
    pooled = np.concatenate(samples) if samples else np.zeros(0, np.float32)
    if pooled.size == 0:
        raise ValueError("No crop holds both classes of the stain prior's pair: nothing to fit it on.")
    low, high = np.quantile(pooled, [lo_q, hi_q])
    return StainPrior(dense, sparse, float(low), float(high))


def apply_stain_prior(label: np.ndarray, density: np.ndarray, prior: StainPrior, ignore_index: int = 255,
                      background: int | None = None) -> np.ndarray:
    """The pseudo-label (H, W) of a crop holding both classes, with the pair decided by the density: pixels the
    model gave to either class of the pair or left unlabelled become ``dense`` above ``high``, ``sparse`` below
    ``low``, ``ignore_index`` in between; other classes and ``background`` keep their label."""
    out = np.array(label, dtype=np.uint8, copy=True)
    open_pixels = (out == prior.dense) | (out == prior.sparse) | (out == ignore_index)
    if background is not None:
        open_pixels &= out != background
    out[open_pixels] = ignore_index
    out[open_pixels & (density > prior.high)] = prior.dense
    out[open_pixels & (density < prior.low)] = prior.sparse
    return out
