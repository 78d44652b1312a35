"""npe2 writer: save a tissue Labels layer as an index PNG (class palette), a pyramidal OME-TIFF or QuPath GeoJSON.

The format follows the file name: ``.png``, ``.ome.tif``/``.tif``/``.tiff`` or ``.geojson``. The Segment dock's
Export uses :func:`export_labels` too, so File > Save and Export write identical files through the core writers.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np

from .core.classes import WSSS4LUAD, ClassSpec
from .core.errors import WsssCramError
from .core.placement import Placement
from .core.progress import Progress

FORMAT_SUFFIXES = {"png": ".png", "ome-tiff": ".ome.tif", "geojson": ".geojson"}


def format_of(path: str | Path) -> str:
    """``png``, ``ome-tiff`` or ``geojson`` from a file name; raises a WsssCramError for anything else."""
    name = Path(path).name.lower()
    if name.endswith(".png"):
        return "png"
    if name.endswith((".ome.tif", ".ome.tiff", ".tif", ".tiff")):
        return "ome-tiff"
    if name.endswith(".geojson"):
        return "geojson"
    raise WsssCramError(f"Cannot save labels as '{Path(path).name}': use a .png, .ome.tif or .geojson name.")


def export_labels(path: str | Path, labels: np.ndarray, classes: ClassSpec, mpp: float | None = None,
                  overwrite: bool = True, placement: Placement | None = None) -> str:
    """Write one label mask (class indices, background = K) in the format named by ``path``; return the path.

    ``mpp`` is the pixel size of ``labels`` itself. ``placement`` says where the labels sit on the slide: GeoJSON
    coordinates are full-resolution (level-0) pixels, and an OME-TIFF records the position (a field of view
    re-opens where it was taken).
    """
    from .core.io.guard import ensure_can_write
    from .core.io.ometiff import write_pyramidal_ome_tiff
    from .core.io.png import write_index_png
    from .core.io.qupath import write_geojson

    path = Path(path)
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise WsssCramError(f"Cannot save {path.name}: tissue labels must be a 2D image, got shape {labels.shape}.")
    if labels.size and int(labels.max()) > max(classes.background_index, 0) and int(labels.max()) != 255:
        raise WsssCramError(
            f"Cannot save {path.name}: label value {int(labels.max())} is not a class of "
            f"{', '.join(classes.all_names)}. Paint only with the class values 0..{classes.background_index}.")
    labels = labels.astype(np.uint8, copy=False)
    ensure_can_write(path, overwrite)
    fmt = format_of(path)
    if fmt == "png":
        write_index_png(path, labels, classes)
    elif fmt == "ome-tiff":
        write_pyramidal_ome_tiff(path, labels, mpp=mpp, placement=placement)
    else:
        write_geojson(path, labels, classes, placement=placement)
    return str(path)


def export_files(paths: list[Path], labels: np.ndarray, classes: ClassSpec, table: dict,
                 mpp: float | None = None, placement: Placement | None = None,
                 ) -> Generator[Progress, None, list[str]]:
    """Write ``labels`` to each of ``paths[:-2]`` (format from the name), then the composition ``table`` as CSV
    (``paths[-2]``) and JSON (``paths[-1]``); yields ``Progress("export", done, total)``, returns the paths.

    Existing files are replaced: callers ask first. A generator, so the dock runs it in a worker thread
    (tracing GeoJSON polygons of a big slide takes a while).
    """
    from .core.composition import composition_csv
    from .core.io.atomic import atomic_path

    written: list[str] = []
    total = len(paths)
    yield Progress("export", 0, total)
    for path in paths[:-2]:
        written.append(export_labels(path, labels, classes, mpp, overwrite=True, placement=placement))
        yield Progress("export", len(written), total)
    for path, text in ((paths[-2], composition_csv(table)), (paths[-1], json.dumps(table, indent=2))):
        with atomic_path(path) as tmp:  # whole or not at all, like the masks
            tmp.write_text(text, encoding="utf-8")
    written += [str(paths[-2]), str(paths[-1])]
    yield Progress("export", total, total)
    return written


def classes_from_meta(meta: dict[str, Any]) -> ClassSpec:
    stored = (meta.get("metadata") or {}).get("wsss_cram", {})
    return ClassSpec.from_dict(stored["classes"]) if "classes" in stored else WSSS4LUAD


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer for Labels layers; returns the written paths (empty when the name is refused)."""
    stored = (meta.get("metadata") or {}).get("wsss_cram", {})
    try:
        format_of(path)
    except WsssCramError:
        return []
    if isinstance(data, list):  # a multiscale labels layer: save the full-resolution level
        data = data[0]
    return [export_labels(path, np.asarray(data), classes_from_meta(meta), mpp=stored.get("mpp"),
                          placement=Placement.from_metadata(stored.get("placement")))]
