"""Reliable pseudo-labels (RRM, Zhang et al. 2020, adapted by WSSS-CRAM) from per-class activation maps.

Rules, for one image with image-level labels y (K,) and maps M (K+1, H, W), background last:
1. maps of classes absent from y are zeroed;
2. tissue prior: pixels whose gray level is above ``tissue_threshold`` (glass, air spaces; 200 as in the
   WSSS4LUAD baselines) are background: their foreground maps are zeroed and the background map set to 1;
3. high-confidence map p_r: background where max_k M_k (foreground) < alpha, arg-max class where > beta,
   255 (ignore) elsewhere. With ``background_needs_white`` (default), the alpha rule gives background only
   where the prior agrees (near-white); on stained tissue a low foreground maximum means "unsure" (255).
   Why: in H&E, background *is* glass and air space; without this, the DA layer's background channel
   (never supervised on tissue) lends its label to weakly activated tissue, and the segmentation branch
   learns to call tissue background (seen on the synthetic patches of tests/test_model_learnability.py:
   most confident labels were "background" on tissue). ``background_needs_white=False`` is the paper's
   rule as written;
4. p_crf = arg-max of the dense CRF run on the image with the maps normalised to probabilities;
5. pseudo-label = p_r where p_r == p_crf, else 255 (with the CRF off: p_r). Prior pixels stay background.
"""

from __future__ import annotations

import numpy as np

from .classes import IGNORE_INDEX
from .crf import CRFParams, dense_crf

_DEFAULT_CRF = CRFParams()


def tissue_background(image: np.ndarray, threshold: int | None = 200) -> np.ndarray:
    """Boolean (H, W): True where the pixel is near-white (gray > threshold), i.e. not tissue."""
    if threshold is None:
        return np.zeros(image.shape[:2], dtype=bool)
    gray = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return gray > threshold


def _resize_maps(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if maps.shape[1:] == tuple(shape):
        return maps
    import torch
    import torch.nn.functional as F

    resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(maps))[None], size=shape, mode="bilinear",
                            align_corners=False)[0]
    return resized.numpy()


def reliable_pseudo_labels(maps, image: np.ndarray, labels, alpha: float = 0.3, beta: float = 0.9,
                           crf: CRFParams | None = _DEFAULT_CRF, tissue_threshold: int | None = 200,
                           background_needs_white: bool = True) -> np.ndarray:
    """Pseudo-label (H, W) uint8 in 0..K with 255 = unreliable, from maps (K+1, h, w) and RGB image.

    ``maps`` may be a numpy array or a torch tensor, at any size (bilinearly resized to the image);
    ``labels`` (K,) are the image-level labels (0/1); ``crf=None`` turns the CRF agreement off;
    ``background_needs_white``: background only on near-white pixels (see the module notes).
    """
    if hasattr(maps, "detach"):
        maps = maps.detach().float().cpu().numpy()
    maps = np.asarray(maps, dtype=np.float32)
    image = np.asarray(image)
    labels = np.asarray(labels).astype(bool).reshape(-1)
    if maps.ndim != 3 or maps.shape[0] != labels.size + 1:
        raise ValueError(f"maps must be (K+1, h, w) with K={labels.size} classes, got {maps.shape}.")
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"image must be RGB (H, W, 3), got {image.shape}.")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}.")
    image = np.ascontiguousarray(image[..., :3])
    k = labels.size
    maps = _resize_maps(maps, image.shape[:2]).copy()
    maps[:k][~labels] = 0.0
    background = tissue_background(image, tissue_threshold)
    maps[:k, background] = 0.0
    maps[k, background] = 1.0
    maps = np.clip(maps, 0.0, None)

    fg_max = maps[:k].max(axis=0) if k else np.zeros(image.shape[:2], np.float32)
    p_r = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
    low = fg_max < alpha
    if background_needs_white and tissue_threshold is not None:
        low &= background
    p_r[low] = k
    confident = fg_max > beta
    p_r[confident] = maps[:k].argmax(axis=0)[confident]
    if crf is None:
        return p_r

    probs = maps + 1e-5  # every pixel gets a valid distribution, also where all maps are zero
    probs[:k][~labels] = 0.0
    probs /= probs.sum(axis=0, keepdims=True)
    p_crf = dense_crf(image, probs, crf).argmax(axis=0)
    pseudo = np.where(p_r == p_crf, p_r, IGNORE_INDEX).astype(np.uint8)
    pseudo[background] = k
    return pseudo


def batch_pseudo_labels(cams, images: np.ndarray, labels, alpha: float = 0.3, beta: float = 0.9,
                        crf: CRFParams | None = _DEFAULT_CRF, tissue_threshold: int | None = 200,
                        background_needs_white: bool = True) -> np.ndarray:
    """:func:`reliable_pseudo_labels` for a batch: cams (B, K+1, h, w), images uint8 (B, H, W, 3),
    labels (B, K) -> uint8 (B, H, W)."""
    if hasattr(cams, "detach"):
        cams = cams.detach().float().cpu().numpy()
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    return np.stack([reliable_pseudo_labels(c, im, lab, alpha, beta, crf, tissue_threshold,
                                            background_needs_white)
                     for c, im, lab in zip(cams, images, labels, strict=True)])
