"""npe2 reader: H&E images and slides (PNG, JPEG, TIFF, OME-TIFF, SVS; MRXS, NDPI, SCN, BIF, DICOM with the
``openslide`` extra) through the project's one reader.

- Pyramidal TIFF/OME-TIFF/SVS open as lazy multiscale data (only the tiles on screen are decoded).
- ``scale`` is the pixel size in µm when the file says it (``units`` µm), else 1 pixel; a result exported from a
  region of a slide (a field of view) gets the ``translate`` that puts it back over that slide.
- ``metadata`` holds ``path``, ``mpp``, ``level_shapes`` and ``level_downsamples`` for the docks.
- WSSS4LUAD-palette PNG masks, label OME-TIFFs written by this plugin (known by their OME image name) and
  single-channel ``*mask*`` TIFFs open as Labels layers (without the grayscale-to-RGB warning).
- QuPath GeoJSON annotations (``.geojson``) open as a class Labels layer placed on the open image they fit
  (see :func:`read_qupath`).
Unreadable files raise ``ImageReadError`` naming the file; napari shows that message (no traceback).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .core.io.formats import image_stem, image_suffix

LayerData = tuple[Any, dict, str]

#: Single-level images up to this many pixels go to napari as in-memory arrays; larger ones lazily.
SMALL_IMAGE_PIXELS = 64_000_000


def napari_get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Return the reader for supported file names (one path or a list of them), else None."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths or not all(image_suffix(p) or str(p).lower().endswith(".geojson") for p in paths):
        return None
    if any(Path(p).is_dir() for p in paths):
        return None
    return read_paths


def read_paths(path: str | list[str]) -> list[LayerData]:
    """Read each path into napari layer data; raises ``ImageReadError`` with a clear message."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        if str(p).lower().endswith(".geojson") and import_qupath_in_background(p):
            continue  # its layer is added when the worker is done
        layers.append(read_layer(p))
    return layers or [(None,)]  # napari's sentinel: read, nothing to add now


def _palette_mask(path: Path) -> Any | None:
    """Index data of a palette PNG that uses the WSSS4LUAD class palette, else None."""
    from PIL import Image

    from .core.classes import WSSS4LUAD

    try:
        with Image.open(path) as img:
            if img.mode != "P":
                return None
            palette = img.getpalette() or []
            n = WSSS4LUAD.num_outputs
            if palette[: 3 * n] != WSSS4LUAD.palette()[: 3 * n]:
                return None
    except (OSError, Image.DecompressionBombError):
        return None  # ImageSource gives the proper error below, naming the file
    from .core.io.png import read_index_png

    return read_index_png(path)


def _labels_kwargs(name: str, meta: dict, scale: tuple[float, float] | None) -> dict:
    from .core.classes import WSSS4LUAD
    from .widgets.layers import class_features, labels_colormap

    kwargs: dict[str, Any] = {"name": name, "metadata": meta, "colormap": labels_colormap(WSSS4LUAD),
                              "features": class_features(WSSS4LUAD)}
    if scale is not None:
        kwargs.update(scale=scale, units=("µm", "µm"))
    return kwargs


def _placement_kwargs(path: Path) -> dict:
    """``scale``/``translate`` that put a result this plugin exported from a region of a slide (a field of view)
    back over that slide: in µm when the slide states its µm/px, else in its level-0 pixels. Empty otherwise."""
    if not path.name.lower().endswith((".tif", ".tiff")):
        return {}
    from .core.io.ometiff import read_placement

    placed = read_placement(path)
    if placed is None:
        return {}
    unit = placed.mpp0 or 1.0
    scale, translate = placed.layer_transform(unit, 0.0)
    kwargs: dict[str, Any] = {"scale": tuple(float(v) for v in scale), "translate": tuple(float(v) for v in translate)}
    if placed.mpp0:
        kwargs["units"] = ("µm", "µm")
    return kwargs


def _qupath_candidates(viewer) -> list:
    """The RGB images annotations may go on, in preference order: the selected one, then the newest."""
    from napari.layers import Image

    active = viewer.layers.selection.active
    candidates = [ly for ly in reversed(list(viewer.layers)) if isinstance(ly, Image) and ly.rgb]
    candidates.sort(key=lambda ly: ly is not active)  # stable: the selected image first, then the newest
    return candidates


def read_qupath(path: str | os.PathLike) -> LayerData:
    """QuPath annotations as a Labels layer on the open image they belong to, read on the calling thread (napari
    itself reads them in the background: :func:`import_qupath_in_background`).

    A reader gets no viewer, so this one asks napari for the current viewer and picks its RGB image whose
    full-resolution size holds every annotation (the selected one first, then the newest); the labels then
    take that image's placement, pixel size and (for a slide) a paintable pyramid level. With no such image
    the one they overlap most (clipped to it, as the dock's Import), else they cover the annotations' own
    extent in level-0 pixels. Classes: WSSS4LUAD's, matched ignoring case ("Tumor" -> tumor); the Segment
    dock's "Import QuPath annotations…" uses the model's classes and a name map.
    """
    from .core.classes import WSSS4LUAD
    from .widgets._qupath_job import rasterise
    from .widgets.layers import level0_shape_of, qupath_layer_from_import

    viewer = _current_viewer()
    images = _qupath_candidates(viewer) if viewer is not None else []
    index, imported, d = rasterise(str(path), [level0_shape_of(ly) for ly in images], WSSS4LUAD)
    image = images[index] if index is not None else None
    _say_imported(path, image, imported, bool(images))
    return qupath_layer_from_import(imported, d, image, WSSS4LUAD, name=None if image is not None else Path(path).stem)


def _current_viewer():
    try:
        import napari
    except ImportError:  # pragma: no cover - napari calls readers
        return None
    return napari.current_viewer()


def _say_imported(path, image, imported, had_images: bool) -> None:
    if image is None and had_images:
        _tell(f"The annotations of {Path(path).name} lie outside every open image: they open on their own. "
              "Open their image first (same slide, level 0).", warning=True)
    where = f" on '{image.name}'" if image is not None else ""
    _tell(f"{Path(path).name}{where}: {imported.summary()}.",
          warning=bool(imported.clipped or imported.not_areas or imported.unclassified))


#: Imports started by drops, kept alive until they end.
_RUNNING: set = set()


def import_qupath_in_background(path: str | os.PathLike) -> bool:
    """A GeoJSON dropped on napari: read and rasterised in a worker (a slide-region export took 38 s, all of it
    with the window frozen), with a busy bar and a Cancel button in napari's notification; the layer is added
    when it is done. False (read it now) outside a running napari window."""
    from qtpy.QtWidgets import QApplication

    viewer = _current_viewer()
    if viewer is None or QApplication.instance() is None:
        return False
    from .core.classes import WSSS4LUAD
    from .widgets._qupath_job import QuPathImportRun
    from .widgets.layers import add_qupath_layer

    images = _qupath_candidates(viewer)

    def done(result) -> None:
        image, layer_data, imported = result
        if image is not None and image not in viewer.layers:
            image = None  # its image was closed meanwhile: on its own
        add_qupath_layer(viewer, layer_data, image)
        _say_imported(path, image, imported, bool(images))

    def failed(error) -> None:
        from .widgets._common import user_message

        _tell(user_message(error), warning=True)

    run = QuPathImportRun(str(path), images, WSSS4LUAD, None, done, failed, cancel_button=True,
                          on_finished=_RUNNING.discard)
    _RUNNING.add(run)  # before the worker can finish: its end is handled on this (the GUI) thread
    return True


def _tell(text: str, warning: bool = False) -> None:
    """A note in napari's notifications (shown in the window, not only in the terminal), else a warning."""
    try:
        from napari.utils.notifications import show_info, show_warning
    except ImportError:  # pragma: no cover - napari calls readers
        warnings.warn(text, stacklevel=3)
        return
    (show_warning if warning else show_info)(text)


def read_layer(path: str | os.PathLike) -> LayerData:
    """One file as a napari layer-data tuple (image, or labels for masks)."""
    from .core.errors import ImageReadError
    from .core.io.images import ImageSource

    p = Path(path)
    if p.name.lower().endswith(".geojson"):
        return read_qupath(p)
    name = image_stem(p)
    if p.suffix.lower() == ".png" and p.is_file():
        mask = _palette_mask(p)
        if mask is not None:
            meta = {"path": str(p), "mpp": None}
            return mask, _labels_kwargs(name, meta, None), "labels"
    from .core.io.ometiff import is_labels_tiff

    maybe_labels = is_labels_tiff(p) or "mask" in p.name.lower()
    with warnings.catch_warnings():
        # the grayscale-to-RGB warning reaches napari's notifications, except for masks (they are not converted)
        warnings.simplefilter("ignore" if maybe_labels else "default")
        source = ImageSource.open(p)
    if source.samples > 3 and not source.alpha:
        if p.name.lower().endswith(("_probs.ome.tif", "_probs.ome.tiff")):
            source.channels = (0, 1, 2)  # this package's probability maps: the first three classes as colours
        else:
            source.close()
            raise ImageReadError(f"{p.name} has {source.samples} channels and no alpha; it is not an RGB image. "
                                 "Save its red, green and blue channels as an RGB image to open it here.")
    mpp = source.mpp
    scale = (mpp, mpp) if mpp else None
    meta = {"path": str(p), "mpp": mpp, "level_shapes": source.level_shapes,
            "level_downsamples": source.level_downsamples}
    placed = _placement_kwargs(p)
    if source.samples == 1 and source.dtype.kind == "u" and source.dtype.itemsize == 1 and maybe_labels:
        levels = [source.lazy_level(i, raw=True) for i in range(source.n_levels)]
        data = levels if len(levels) > 1 else levels[0].compute()
        kwargs = _labels_kwargs(name, meta, scale)
        kwargs["multiscale"] = len(levels) > 1
        kwargs.update(placed)
        return data, kwargs, "labels"
    data = image_layer_data(source)
    kwargs = {"name": name, "rgb": True, "multiscale": isinstance(data, list), "metadata": meta}
    if scale is not None:
        kwargs.update(scale=scale, units=("µm", "µm"))
    kwargs.update(placed)
    if source.n_levels == 1 and not isinstance(data, list):
        source.close()  # everything is in memory
    return data, kwargs, "image"


def image_layer_data(source: Any) -> list[Any] | Any:
    """Data for a napari ``Image`` layer with ``rgb=True`` from an open ``ImageSource``.

    A pyramid gives a list of lazy dask arrays ``(h, w, 3) uint8``, one per level, whose chunks are read
    through ``read_region`` (so the same RGB conversion applies). A single small level is returned in memory;
    a single large TIFF or slide level lazily.
    """
    if source.n_levels == 1:
        h, w = source.shape
        if source.format not in ("tiff", "openslide") or h * w <= SMALL_IMAGE_PIXELS:
            return source.read_level(0)
    return [source.lazy_level(i) for i in range(source.n_levels)]
