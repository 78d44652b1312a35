"""Training augmentation: random rescale, random crop (padded with white glass), flips, 90-degree turns, and a
light stain/colour jitter. The paper's setting is a x2-x3 rescale of the 150-300 px WSSS4LUAD patches then a
513 px crop; the CPU presets use a smaller range and crop (see ``presets/*.toml``).

Every random draw comes from the ``numpy.random.Generator`` passed in, which the datasets seed from
``(seed, epoch, sample index)``: a sample's augmentation does not depend on the worker that made it, so a resumed
run sees exactly the crops it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..classes import IGNORE_INDEX

#: padding colour: white glass, which the model learns as background
PAD_RGB = 255


@dataclass
class AugmentConfig:
    """Augmentation settings; defaults are the paper's (x2-x3 rescale, 513 crop)."""

    scale_min: float = 2.0
    scale_max: float = 3.0
    crop: int = 513
    flip: bool = True
    rot90: bool = True
    #: relative strength of the per-channel colour/brightness jitter (0 turns it off)
    jitter: float = 0.05
    #: strength of the haematoxylin/eosin stain jitter (Tellez et al. 2018; 0 turns it off, 0.05 "light")
    stain: float = 0.0


def rescale(rgb: np.ndarray, factor: float, mask: np.ndarray | None = None):
    """Resize ``rgb`` (bilinear) and ``mask`` (nearest) by ``factor``."""
    if abs(factor - 1.0) < 1e-6:
        return rgb, mask
    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    return rgb, mask


def random_crop(rgb: np.ndarray, crop: int, rng: np.random.Generator, mask: np.ndarray | None = None):
    """A ``crop`` x ``crop`` window at a random place; smaller images are padded (white / IGNORE) at random sides."""
    h, w = rgb.shape[:2]
    ph, pw = max(0, crop - h), max(0, crop - w)
    if ph or pw:
        top, left = int(rng.integers(0, ph + 1)), int(rng.integers(0, pw + 1))
        pad = ((top, ph - top), (left, pw - left))
        rgb = np.pad(rgb, pad + ((0, 0),), constant_values=PAD_RGB)
        if mask is not None:
            mask = np.pad(mask, pad, constant_values=IGNORE_INDEX)
        h, w = rgb.shape[:2]
    y = int(rng.integers(0, h - crop + 1))
    x = int(rng.integers(0, w - crop + 1))
    rgb = rgb[y:y + crop, x:x + crop]
    if mask is not None:
        mask = mask[y:y + crop, x:x + crop]
    return rgb, mask


def color_jitter(rgb: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Light stain variation: per-channel gain and offset plus a global brightness change, white kept near white."""
    if strength <= 0:
        return rgb
    img = rgb.astype(np.float32)
    gain = 1.0 + rng.uniform(-strength, strength, size=3).astype(np.float32)
    offset = rng.uniform(-strength, strength, size=3).astype(np.float32) * 64.0
    bright = 1.0 + float(rng.uniform(-strength, strength))
    # The change fades out towards white so that glass stays glass (the tissue prior uses gray > 200).
    darkness = 1.0 - img.mean(axis=2, keepdims=True) / 255.0
    out = img + darkness * (img * (gain * bright - 1.0) + offset)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


#: H&E-DAB stain vectors (rows: haematoxylin, eosin, DAB) in optical density, Ruifrok & Johnston 2001 (as
#: scikit-image's ``rgb_from_hed``); their inverse separates an RGB image into stain concentrations
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)


def stain_jitter(rgb: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Stain variation between labs and scanners: each stain's concentration scaled by ``1 +- strength`` and
    shifted by ``+- strength`` optical density (HED jitter, Tellez et al. 2018), glass kept as glass.

    The shift fades out on near-empty pixels (total optical density below 0.3) so that white glass does not turn
    pink or blue: the tissue mask (gray > 200) must see the same background before and after.
    """
    if strength <= 0:
        return rgb
    od = -np.log(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)
    hed = od.reshape(-1, 3) @ HED_FROM_RGB
    scale = 1.0 + rng.uniform(-strength, strength, size=3).astype(np.float32)
    shift = rng.uniform(-strength, strength, size=3).astype(np.float32)
    fade = np.clip(od.reshape(-1, 3).sum(axis=1, keepdims=True) / 0.3, 0.0, 1.0)
    hed = hed * scale + shift * fade
    out = 255.0 * np.exp(-np.maximum(hed @ RGB_FROM_HED, 0.0))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8).reshape(rgb.shape)


def augment(rgb: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator, mask: np.ndarray | None = None):
    """Rescale by a random factor in ``[scale_min, scale_max]``, crop, flip, rotate, stain and colour jitter.

    Returns ``(rgb uint8 (crop, crop, 3), mask uint8 (crop, crop) or None)``, C-contiguous.
    """
    factor = float(rng.uniform(cfg.scale_min, cfg.scale_max))
    rgb, mask = rescale(rgb, factor, mask)
    rgb, mask = random_crop(rgb, cfg.crop, rng, mask)
    if cfg.flip and rng.random() < 0.5:
        rgb = rgb[:, ::-1]
        mask = None if mask is None else mask[:, ::-1]
    if cfg.flip and rng.random() < 0.5:
        rgb = rgb[::-1]
        mask = None if mask is None else mask[::-1]
    if cfg.rot90:
        k = int(rng.integers(0, 4))
        rgb = np.rot90(rgb, k)
        mask = None if mask is None else np.rot90(mask, k)
    rgb = stain_jitter(np.ascontiguousarray(rgb), cfg.stain, rng)
    rgb = color_jitter(rgb, cfg.jitter, rng)
    return np.ascontiguousarray(rgb), (None if mask is None else np.ascontiguousarray(mask))
