"""Pixel conversion, identical for every path that reads pixels: any stored layout to ``uint8 (h, w, 3)``.

RGB is kept; alpha is blended onto white (transparent is background); grayscale is repeated to RGB; 16-bit is
scaled to 8-bit (full range, ``v / 257``); float is read as ``0..float_max``; more than 3 channels need the RGB
channels named.
"""

from __future__ import annotations

import numpy as np

from ..errors import ImageReadError


def to_rgb_uint8(block: np.ndarray, *, source: str = "image", float_max: float = 1.0, alpha: bool = False,
                 channels: tuple[int, int, int] | None = None) -> np.ndarray:
    """Convert a (h, w), (h, w, 1..4) block of uint8/uint16/float/bool to ``uint8 (h, w, 3)``.

    Float data is read as ``0..float_max`` (1 for the usual 0..1 images; :func:`float_range_max` tells an
    ImageJ/MATLAB 0..255 export). No warning here: the grayscale warning is issued once per image by
    ``ImageSource``. ``alpha``: the last of 2 or 4 channels is opacity, and what is transparent is blended onto
    white (background: slide scanners leave unscanned areas transparent). ``channels``: the RGB channels of an
    image with more than 3 (a multiplexed or fluorescence stack is refused without them: its first three
    channels are not an H&E colour image).
    """
    a = np.asarray(block)
    if channels is not None and a.ndim == 3:
        if max(channels) >= a.shape[2]:
            raise ImageReadError(f"{source}: RGB channels {channels} asked for, but it has {a.shape[2]} channels.")
        a, alpha = a[:, :, list(channels)], False
    elif a.ndim == 3 and a.shape[2] > 3 and not (alpha and a.shape[2] == 4):
        raise ImageReadError(f"{source} has {a.shape[2]} channels and no alpha; it is not an RGB image. Name "
                             "its red, green and blue channels (predict --channels R,G,B, counted from 0) or save it as RGB.")
    if alpha and a.ndim == 3 and a.shape[2] in (2, 4):
        a = _blend_on_white(a)
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        # Full 16-bit range to 8 bits, rounded; fixed scaling keeps tiles of one image consistent.
        a = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif a.dtype.kind == "f":
        a = np.clip(np.nan_to_num(a.astype(np.float32)) * (255.0 / float_max) + 0.5, 0, 255).astype(np.uint8)
    elif a.dtype.kind in "iu" and a.dtype.itemsize <= 4:
        # 32-bit integer data (e.g. Pillow mode "I" PNGs holding 16-bit values): treat as 16-bit.
        a = ((np.clip(a, 0, 65535).astype(np.uint32) + 128) // 257).astype(np.uint8)
    else:
        raise ImageReadError(f"{source}: unsupported pixel type {a.dtype}; convert it to 8-bit RGB.")
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3:
        raise ImageReadError(f"{source}: expected a 2-D image, got shape {a.shape}.")
    channels = a.shape[2]
    if channels == 1 or channels == 2:  # gray or gray+alpha
        return np.repeat(a[:, :, :1], 3, axis=2)
    if channels >= 3:
        return np.ascontiguousarray(a[:, :, :3])
    raise ImageReadError(f"{source}: unsupported channel count {channels}.")


def _blend_on_white(a: np.ndarray) -> np.ndarray:
    """Colour (or grey) with opacity as its last channel, blended onto white, in the input's dtype."""
    top = 1.0 if a.dtype.kind == "f" else float(np.iinfo(a.dtype).max) if a.dtype.kind in "iu" else 1.0
    colour, opacity = a[:, :, :-1].astype(np.float32), a[:, :, -1:].astype(np.float32) / top
    blended = colour * opacity + top * (1.0 - opacity)
    return (blended if a.dtype.kind == "f" else np.round(blended)).astype(a.dtype)


def float_range_max(values: np.ndarray, source: str) -> float:
    """The full-scale value of a float image from a sample of its pixels: 1 (0..1 data), 255 (an 8-bit image
    saved as float, as ImageJ and MATLAB do) or 65535; raises ``ImageReadError`` when no value is finite."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        raise ImageReadError(f"{source} holds no finite pixel values (all NaN or infinite); re-export the image.")
    top = float(finite.max())
    if top <= 1.0 + 1e-3:
        return 1.0
    if top <= 255.0 + 0.5:
        return 255.0
    if top <= 65535.0 + 0.5:
        return 65535.0
    raise ImageReadError(f"{source} holds float values up to {top:g}, beyond any image range (0..1, 0..255, "
                         "0..65535); convert it to 8-bit RGB.")
