"""The one list of image file suffixes: what the napari reader accepts, what `predict` finds in a folder, what
counts as a patch or a mask. ``ImageSource`` itself picks its reader from the file's bytes, not its name.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Whole-slide formats: read region by region, never taken as training patches or masks.
SLIDE_SUFFIXES = (".svs", ".btf")
#: Flat images (also pyramidal OME-TIFF under .tif/.tiff), read by Pillow or tifffile.
FLAT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Every suffix the package opens.
IMAGE_SUFFIXES = FLAT_SUFFIXES + SLIDE_SUFFIXES
#: Label masks: lossless formats only (a JPEG would change the class indices).
MASK_SUFFIXES = (".png", ".tif", ".tiff")
#: Multi-part suffixes kept whole when a name is stripped.
_COMPOUND = (".ome.tiff", ".ome.tif")


def image_suffix(path: str | os.PathLike) -> str:
    """The image suffix of ``path`` in lower case (``.ome.tif`` whole), or "" when it is not an image name."""
    name = Path(path).name.lower()
    for suffix in _COMPOUND + tuple(sorted(IMAGE_SUFFIXES, key=len, reverse=True)):
        if name.endswith(suffix):
            return suffix
    return ""


def image_stem(path: str | os.PathLike) -> str:
    """The file name without its image suffix (``a.ome.tif`` -> ``a``)."""
    name = Path(path).name
    return name[: len(name) - len(image_suffix(name))]


def is_image_file(path: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> bool:
    """A visible regular file whose suffix is one of ``suffixes`` (case-insensitive)."""
    return path.suffix.lower() in suffixes and not path.name.startswith(".") and path.is_file()
