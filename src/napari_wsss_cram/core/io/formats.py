"""The one list of image file suffixes, and which reader reads which file: names only, no heavy imports (the CLI
builds its options from them). What the napari reader accepts, what `predict` finds in a folder, what counts as a
patch or a mask. ``ImageSource`` itself picks its decoder from the file's bytes, not its name.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Which library reads slides: "auto" (OpenSlide for the vendor formats below, tifffile for other TIFFs incl.
#: SVS), "tifffile" (never OpenSlide) or "openslide" (OpenSlide for every slide it recognises, SVS included).
#: PNG/JPEG patches are always read by Pillow. The one owner of this setting; the CLI's ``--reader`` passes it.
READERS = ("auto", "tifffile", "openslide")
#: Vendor slide formats tifffile does not read (or not with their levels): read through OpenSlide. A DICOM
#: slide is a folder of ``.dcm`` files (one per level); any of them, or the folder, opens the slide.
OPENSLIDE_SUFFIXES = (".mrxs", ".ndpi", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".dcm")
OPENSLIDE_INSTALL = 'pip install "napari-wsss-cram[openslide]"'
#: Whole-slide formats: read region by region, never taken as training patches or masks.
SLIDE_SUFFIXES = (".svs", ".btf", *OPENSLIDE_SUFFIXES)
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
