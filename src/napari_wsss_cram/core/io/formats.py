"""Which reader reads which file: names only, no heavy imports (the CLI builds its options from them)."""

from __future__ import annotations

#: Which library reads slides: "auto" (OpenSlide for the vendor formats below, tifffile for other TIFFs incl.
#: SVS), "tifffile" (never OpenSlide) or "openslide" (OpenSlide for every slide it recognises, SVS included).
#: PNG/JPEG patches are always read by Pillow. The one owner of this setting; the CLI's ``--reader`` passes it.
READERS = ("auto", "tifffile", "openslide")
#: Vendor slide formats tifffile does not read (or not with their levels): read through OpenSlide. A DICOM
#: slide is a folder of ``.dcm`` files (one per level); any of them, or the folder, opens the slide.
OPENSLIDE_SUFFIXES = (".mrxs", ".ndpi", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".dcm")
#: Whole-slide suffixes beyond the plain image ones (PNG/JPEG/TIFF).
SLIDE_SUFFIXES = (".svs", *OPENSLIDE_SUFFIXES)
OPENSLIDE_INSTALL = 'pip install "napari-wsss-cram[openslide]"'
