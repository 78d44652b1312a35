"""The old import path of the single-file writers, for the CLI and dock modules that still import from it.

Each format has its own module now: :mod:`.png` (index masks), :mod:`.ometiff` (pyramidal OME-TIFF),
:mod:`.qupath` (GeoJSON); the output checks and the folder lock are in :mod:`.guard`, the one atomic-write
helper in :mod:`.atomic`, and the tissue composition (analysis, not a format) in :mod:`..composition`.
New code imports from those.
"""

from __future__ import annotations

from ..composition import composition, composition_csv, describe_tsr
from .atomic import atomic_path
from .guard import folder_lock
from .png import write_index_png

__all__ = ["atomic_path", "composition", "composition_csv", "describe_tsr", "folder_lock", "write_index_png"]
