"""Index masks as PNG: class indices 0..K (255 = ignore) with the class colours as the palette (WSSS4LUAD
convention), and the one mask reader (palette, grayscale, 16-bit or RGB masks in class colours).

Files are written whole under a temporary name and renamed into place (:func:`~.atomic.atomic_path`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..classes import IGNORE_INDEX, ClassSpec
from ..errors import ImageReadError
from .atomic import atomic_path


def as_label_array(labels: Any, name: str = "labels") -> np.ndarray:
    """``labels`` as a 2-D uint8 array (values must fit 0..255); ValueError naming ``name`` otherwise."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {arr.shape}.")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"{name} values must be in 0..255 to be stored as uint8.")
        arr = arr.astype(np.uint8)
    return arr



def write_index_png(path: str | os.PathLike, labels: np.ndarray, classes: ClassSpec) -> Path:
    """Write ``labels (H, W)`` (0..K, 255 ignore) as a palette PNG with the class colours."""
    from PIL import Image

    arr = as_label_array(labels)
    img = Image.fromarray(arr)
    img.putpalette(classes.palette())  # an "L" image with a palette becomes mode "P", indices unchanged
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", optimize=False)
    return Path(path)


def read_index_png(path: str | os.PathLike, classes: ClassSpec | None = None) -> np.ndarray:
    """Read an index mask as ``uint8 (H, W)``: palette PNGs give their indices, gray PNGs their values.

    An RGB mask is accepted when ``classes`` is given and every colour is a class colour.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"Mask '{p}' does not exist.")
    try:
        with Image.open(p) as img:
            img.load()
            if img.mode == "P" and classes is not None:
                return _palette_to_index(np.array(img, dtype=np.uint8), img.getpalette() or [], classes, p)
            if img.mode in ("P", "L"):
                return np.array(img, dtype=np.uint8)
            if img.mode in ("I", "I;16", "I;16B", "I;16L"):
                arr = np.asarray(img)
                if arr.size and (arr.min() < 0 or arr.max() > 255):
                    raise ImageReadError(f"Mask '{p}' holds values outside 0..255; it is not an index mask.")
                return arr.astype(np.uint8)
            if img.mode in ("RGB", "RGBA") and classes is not None:
                return _rgb_to_index(np.asarray(img.convert("RGB")), classes, p)
            raise ImageReadError(f"Mask '{p}' is a {img.mode} image; expected a palette or grayscale index PNG.")
    except UnidentifiedImageError:
        raise ImageReadError(f"Mask '{p}' is not a readable PNG.") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"Cannot decode mask '{p}' (truncated or corrupt?): {err}.") from None


def _palette_to_index(indices: np.ndarray, palette: list[int], classes: ClassSpec, path: Path) -> np.ndarray:
    """A palette mask as the user sees it: by colour. When the colours its pixels use are class colours, each
    pixel takes the class of its colour, whatever the palette's order (an editor that reorders or compacts the
    palette used to turn tumor into stroma silently). A palette of no class colour (grey levels, an editor's
    default) keeps the indices; one that mixes class colours and others is refused."""
    used = np.unique(indices)
    colours = {int(i): tuple(palette[3 * int(i): 3 * int(i) + 3]) for i in used if 3 * int(i) + 3 <= len(palette)}
    by_colour = {tuple(c): i for i, c in enumerate(classes.all_colors)}
    known = {i: by_colour[c] for i, c in colours.items() if c in by_colour}
    if not known:
        return indices
    if all(known.get(int(i)) == int(i) for i in used if int(i) != IGNORE_INDEX):
        return indices  # the class palette itself: the indices are the classes
    unknown = sorted(int(i) for i in used if int(i) not in known and int(i) != IGNORE_INDEX)
    if unknown:
        raise ImageReadError(
            f"Mask '{path}' mixes class colours with other colours (palette entries {unknown[:5]}); repaint them "
            f"with the class colours of {', '.join(classes.all_names)}, or save the mask as class indices.")
    table = np.full(256, IGNORE_INDEX, np.uint8)
    for i, cls_index in known.items():
        table[i] = cls_index
    return table[indices]


def _rgb_to_index(rgb: np.ndarray, classes: ClassSpec, path: Path) -> np.ndarray:
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    out = np.full(code.shape, IGNORE_INDEX, np.uint8)
    known = np.zeros(code.shape, bool)
    for i, (r, g, b) in enumerate(classes.all_colors):
        hit = code == ((r << 16) | (g << 8) | b)
        out[hit] = i
        known |= hit
    if not known.all():
        raise ImageReadError(f"Mask '{path}' has colours that are not class colours "
                             f"({', '.join(classes.all_names)}).")
    return out


# ---------------------------------------------------------------------------- integrity of a PNG
def _png_raw_size(width: int, height: int, bit_depth: int, color_type: int, interlace: int) -> int:
    """Bytes of a PNG's decompressed IDAT stream: each row's filter byte plus its packed samples (per Adam7
    pass when interlaced)."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color_type, 4)

    def rows(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + (w * channels * bit_depth + 7) // 8)

    if not interlace:
        return rows(width, height)
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    return sum(rows(-(-(width - x0) // dx), -(-(height - y0) // dy)) for x0, y0, dx, dy in passes)


def check_png_pixel_data(path: Path, img: Any) -> None:
    """Raise ``ImageReadError`` when a PNG's compressed pixel data is shorter than its header's size says.

    Pillow decodes such a file without complaint when the end marker is present, filling the missing rows
    with black (which would be segmented), and a tiny file that claims a huge size decodes for minutes. The
    zlib stream is inflated here in bounded pieces, output discarded: cheap for patch-sized images.
    """
    import struct
    import zlib

    data = Path(path).read_bytes()
    pos, chunks = 8, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            chunks.append(data[pos + 8:pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    if len(data) < 29:
        raise ImageReadError(f"'{path}' is too short to be a PNG (truncated?).")
    width, height, bit_depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    expected = _png_raw_size(width, height, bit_depth, color_type, interlace)
    inflater = zlib.decompressobj()
    produced = 0
    try:
        for chunk in chunks:
            piece = inflater.decompress(chunk, 1 << 24)
            produced += len(piece)
            while inflater.unconsumed_tail and produced < expected:
                piece = inflater.decompress(inflater.unconsumed_tail, 1 << 24)
                produced += len(piece)
            if produced >= expected:
                break
    except zlib.error as err:
        raise ImageReadError(f"Cannot decode '{path}': its pixel data is corrupt ({err}).") from None
    if produced < expected:
        rows = max(1, expected // max(1, height))
        raise ImageReadError(
            f"'{path}' is truncated: its header says {width}x{height} px but its pixel data stops after "
            f"about {produced // rows} of {height} rows. Re-export or re-copy the file.")
