"""How segmentation results become napari layers: names, colours, placement, and never clobbering user edits.

Layer conventions (relied upon by the docks, the writer and the tests):
- Names put the role first (``"labels: <image>"``, ``"<class> activation: <image>"``), because napari's layer
  list cuts long names at the end and WSSS4LUAD image names are long.
- ``"<class> activation: <image>"``: ONE Image layer per image showing one class's DA map at a time (the dock
  picks the class) as a heatmap that is transparent where the map is low; ``metadata["wsss_cram"]["maps"]``
  holds every class's map, so switching class needs no re-run.
- ``"labels: <image>"``: a Labels layer whose values are class indices (background = K, transparent), coloured
  with a ``DirectLabelColormap`` from the ``ClassSpec``; its ``features`` table carries the class names so napari's
  status bar shows them under the cursor. ``metadata["wsss_cram"]`` holds the role, the source image, the classes,
  µm/px and a fingerprint of the predicted labels, which is how an edited layer is recognised. Only class labels
  (0..K) can be chosen for painting.
- One result set per image: a re-run updates the newest *unedited* result layers of that image in place; an edited
  labels layer is never touched (the re-run then adds a new labels layer next to it, which later runs update).
All result layers get ``scale``/``translate`` composed from the source layer and the prediction's own placement
(relative to level 0), so they overlay the source exactly, also on multiscale slides.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from ..core.classes import ClassSpec
from ..core.placement import Placement
from ..core.progress import drive

METADATA_KEY = "wsss_cram"


def labels_layer_name(image_name: str) -> str:
    """Name of the result labels layer of ``image_name`` (role first: the layer list cuts names at the end)."""
    return f"labels: {image_name}"


def activation_layer_name(image_name: str, class_name: str) -> str:
    """Name of the activation-map layer of one class of ``image_name``."""
    return f"{class_name} activation: {image_name}"


def pseudo_layer_name(image_name: str) -> str:
    """Name of the reliable pseudo-label view of ``image_name``."""
    return f"pseudo-labels: {image_name}"


def role_of(layer) -> str | None:
    """``"labels"``, ``"activation"`` or ``"pseudo"`` for a result layer of this plugin, else None."""
    meta = layer.metadata.get(METADATA_KEY) if isinstance(layer.metadata, dict) else None
    return meta.get("role") if isinstance(meta, dict) else None


def result_layers_of(viewer, image_name: str, role: str) -> list:
    """The result layers of ``role`` made for ``image_name``, oldest first."""
    return [layer for layer in viewer.layers
            if role_of(layer) == role and layer.metadata[METADATA_KEY].get("source") == image_name]


def labels_colormap(classes: ClassSpec):
    """Class index -> class colour; background (index K), 255 (ignore) and unknown values are transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    colors: dict[int | None, Any] = {None: (0, 0, 0, 0)}
    for index, rgb in enumerate(classes.colors):
        colors[index] = (*(c / 255.0 for c in rgb), 1.0)
    colors[classes.background_index] = (0, 0, 0, 0)
    colors[255] = (0, 0, 0, 0)
    return DirectLabelColormap(color_dict=colors, background_value=classes.background_index)


def class_features(classes: ClassSpec):
    """The ``features`` table of a Labels layer: napari shows ``class`` in the status bar for the hovered value."""
    import pandas as pd

    return pd.DataFrame({"index": np.arange(classes.num_outputs), "class": list(classes.all_names)})


def activation_colormap():
    """A heatmap with transparency: low activation is see-through (the tissue shows), then yellow to opaque red."""
    from napari.utils.colormaps import Colormap

    return Colormap(colors=[[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.85, 0.0, 0.45],
                            [1.0, 0.4, 0.0, 0.7], [0.85, 0.0, 0.0, 0.9]],
                    controls=[0.0, 0.2, 0.45, 0.7, 1.0], name="wsss_cram_heatmap")


def show_activation(layer, class_name: str) -> None:
    """Show ``class_name``'s map in an activation layer (all maps are kept in its metadata)."""
    meta = layer.metadata[METADATA_KEY]
    names = list(meta["classes"])
    if class_name not in names:
        raise ValueError(f"{class_name!r} is not one of {names}")
    data = meta["maps"][names.index(class_name)]
    # the dock calls this at each opacity step too: setting the same data again re-slices the layer (~0.1 s)
    if layer.data is not data:
        layer.data = data
    meta["class"] = class_name
    name = activation_layer_name(meta["source"], class_name)
    if layer.name != name:
        layer.name = name


def fingerprint(labels: np.ndarray) -> str:
    """A cheap content hash of a label array (to tell whether the user painted on it)."""
    array = np.ascontiguousarray(np.asarray(labels))
    return hashlib.blake2b(array.tobytes(), digest_size=16).hexdigest() + str(array.shape)


def is_edited(layer) -> bool:
    """True when a result Labels layer no longer holds what the model predicted (the user painted on it)."""
    meta = layer.metadata.get(METADATA_KEY, {})
    if meta.get("edited"):
        return True
    stored = meta.get("fingerprint")
    return stored is None or stored != fingerprint(layer.data)


def _mark_edited(layer) -> None:
    layer.metadata.setdefault(METADATA_KEY, {})["edited"] = True


def pick_class(layer, index: int) -> None:
    """Paint class ``index`` on ``layer`` (the background index erases)."""
    background = int(layer.colormap.background_value)
    layer.selected_label = int(index)
    layer.mode = "erase" if int(index) == background else "paint"


def class_painting(layer, classes: ClassSpec) -> None:
    """Make ``layer`` paint classes: keys 1..K pick tissue class 0..K-1 and 0 the background (eraser), and only
    class labels 0..K can be chosen (napari's "new label" button and +/- keys would pick K+1, which has no colour,
    drops out of the composition and cannot be exported). Keys 1..K replace napari's mode keys on this layer
    only; the modes keep their letter keys (E erase, P paint, F fill)."""
    valid = range(classes.num_outputs)
    last = {"label": 0}

    def on_selected(event=None) -> None:
        value = int(layer.selected_label)
        if value in valid:
            last["label"] = value
        else:  # back to the last class chosen (the setter emits again, with a valid value)
            layer.selected_label = last["label"]

    layer.selected_label = 0
    layer.events.selected_label.connect(on_selected)
    for index in range(min(classes.num_classes, 9)):
        layer.bind_key(str(index + 1), lambda lyr, i=index: pick_class(lyr, i), overwrite=True)
    layer.bind_key("0", lambda lyr: pick_class(lyr, classes.background_index), overwrite=True)
    # napari's key help (the status bar's right side) lists its own meanings of the digits: say ours instead,
    # after napari rewrites it on each mode change ("last": napari's own handler runs first)
    layer.events.mode.connect(lambda event=None: _show_class_keys(layer, classes), position="last")
    _show_class_keys(layer, classes)


def class_key_help(classes: ClassSpec, mode: str | None = None) -> str:
    """The key help of a class-painting labels layer: the class keys, then napari's mode keys that still work
    (their letter keys; the digits paint classes on this layer)."""
    keys = [f"<{k + 1}> {name}" for k, name in enumerate(classes.names[:9])] + ["<0> background (erase)"]
    parts = ["paint " + ", ".join(keys)]
    try:
        from napari.layers.labels._labels_key_bindings import labels_fun_to_mode
        from napari.settings import get_settings
        from napari.utils.action_manager import action_manager

        shortcuts = get_settings().shortcuts.shortcuts
        for fun, fun_mode in labels_fun_to_mode:
            name = f"napari:{fun.__name__}"
            letters = [str(k) for k in shortcuts.get(name, []) if not str(k).isdigit()]
            if str(fun_mode) == mode or not letters or name not in action_manager._actions:
                continue
            parts.append(f"use <{letters[0]}> for {action_manager._actions[name].description.lower()}")
    except (ImportError, AttributeError, KeyError):  # napari's internals moved: the class keys alone
        pass
    return ", ".join(parts)


def _show_class_keys(layer, classes: ClassSpec) -> None:
    layer.help = class_key_help(classes, str(layer.mode))
    import napari

    viewer = napari.current_viewer()  # napari copied its own text to the viewer's help before this handler ran
    active = None if viewer is None else viewer.layers.selection.active
    # by name: a dock's layers are napari's public proxies of the same objects (``is`` tells them apart)
    if active is not None and active.name == layer.name:
        viewer.help = layer.help


def _stack_on(viewer, source_layer, layer) -> None:
    """Put a new result layer just above its source image's results, not on top of every layer: another image
    lying over this one (WSSS4LUAD patches all open at the origin) is then not drawn over by these results."""
    layers = viewer.layers
    if source_layer not in layers or layer not in layers:
        return
    above = layers.index(source_layer) + 1
    while above < len(layers) and layers[above] is not layer and \
            layers[above].metadata.get(METADATA_KEY, {}).get("source") == source_layer.name:
        above += 1  # keep the order of the results already there (labels over activation)
    index = layers.index(layer)
    if index != above:
        layers.move(index, above if above < index else above - 1)


def placement(source_layer, pred_scale, pred_translate) -> tuple[np.ndarray, np.ndarray]:
    """World scale/translate of a result whose pixel ``i`` sits at ``pred_translate + i * pred_scale`` level-0 pixels
    of the source layer."""
    return Placement.from_napari(pred_scale, pred_translate).layer_transform(source_layer.scale,
                                                                             source_layer.translate)


def add_result_layers(viewer, source_layer, labels: np.ndarray, activations: np.ndarray | None,
                      classes: ClassSpec, scale=1.0, translate=0.0, mpp: float | None = None) -> dict:
    """Show one prediction: per-class activation Image layers and the CRF labels Labels layer.

    An unedited labels layer from an earlier run is updated in place; an edited one is kept and a new layer is
    added next to it. Returns ``{"labels": layer, "activations": [layers]}``.
    """
    return drive(iter_result_layers(viewer, source_layer, labels, activations, classes, scale, translate, mpp))


def iter_result_layers(viewer, source_layer, labels: np.ndarray, activations: np.ndarray | None,
                       classes: ClassSpec, scale=1.0, translate=0.0, mpp: float | None = None,
                       labels_fingerprint: str | None = None):
    """:func:`add_result_layers` one layer at a time: a generator yielding after each layer (so the dock can
    let the event loop breathe between them: creating a napari layer costs 0.2-2 s on the GUI thread).

    The layers are made once per image; later runs set their data (a new layer only beside an edited labels
    layer). ``labels_fingerprint``: :func:`fingerprint` of ``labels``, when the caller made it off the GUI thread.
    """
    name = source_layer.name
    world_scale, world_translate = placement(source_layer, scale, translate)
    result: dict[str, Any] = {"activations": []}
    if activations is not None:
        maps = np.asarray(activations)[: classes.num_classes]  # uint8 (x255) from the engine: 4x less than float
        found = result_layers_of(viewer, name, "activation")
        layer = found[-1] if found else None
        class_name = layer.metadata[METADATA_KEY].get("class") if layer is not None else None
        if class_name not in classes.names:
            class_name = classes.names[0]
        meta = {"role": "activation", "source": name, "classes": list(classes.names), "maps": maps,
                "class": class_name}
        data = maps[classes.names.index(class_name)]
        if layer is not None:  # made by an earlier run: new data (of any size) in the same layer
            layer.metadata[METADATA_KEY] = meta
            layer.data = data
            _place(layer, world_scale, world_translate)
        else:
            layer = viewer.add_image(
                data, name=activation_layer_name(name, class_name), colormap=activation_colormap(),
                blending="translucent", contrast_limits=_full_range(data), opacity=0.5,
                scale=world_scale, translate=world_translate, units=source_layer.units,
                metadata={METADATA_KEY: meta},
            )
            layer.events.visible.connect(lambda event=None: outline_labels_under_maps(viewer, name))
            _stack_on(viewer, source_layer, layer)
        result["activations"].append(layer)
        yield layer

    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    # where the labels sit on the slide, for the exports (GeoJSON coordinates, OME-TIFF position)
    placed = Placement.from_napari(scale, translate)
    placed = Placement(placed.downsample, placed.origin, mpp0=None if mpp is None else mpp / placed.downsample)
    meta = {"role": "labels", "classes": classes.to_dict(), "mpp": mpp, "source": name,
            "fingerprint": labels_fingerprint or fingerprint(labels), "edited": False,
            "placement": placed.to_metadata()}
    layer_name = labels_layer_name(name)
    # the newest unedited result of this image (after an edit, the layer added next to it is the one to update)
    existing = next((ly for ly in reversed(result_layers_of(viewer, name, "labels")) if not is_edited(ly)), None)
    if existing is not None:
        existing.metadata[METADATA_KEY] = meta
        _place(existing, world_scale, world_translate)
        existing.data = labels
        result["labels"] = existing
        outline_labels_under_maps(viewer, name)
        yield existing  # what the caller does next (the dock's message, tab, map) gets a turn of its own
        return result
    # A new layer: napari suffixes a duplicate name (" [1]"), so an edited layer is never replaced. The colormap
    # is given here, not set afterwards (that would map and upload the whole texture a second time).
    layer = viewer.add_labels(labels, name=layer_name, scale=world_scale, translate=world_translate,
                              units=source_layer.units, colormap=labels_colormap(classes),
                              opacity=0.6, metadata={METADATA_KEY: meta}, features=class_features(classes))
    layer.events.paint.connect(lambda event=None, lyr=layer: _mark_edited(lyr))
    class_painting(layer, classes)
    _stack_on(viewer, source_layer, layer)
    result["labels"] = layer
    outline_labels_under_maps(viewer, name)
    yield layer
    return result


def _place(layer, scale, translate) -> None:
    """Set a layer's scale/translate only when they change (each set re-composes napari's transforms and
    refreshes the layer: ~50 ms apiece on the GUI thread for nothing on a re-run)."""
    if not np.allclose(layer.scale, scale):
        layer.scale = scale
    if not np.allclose(layer.translate, translate):
        layer.translate = translate


#: Labels up to this many pixels are drawn as outlines under a visible activation map (napari computes the
#: outlines on the GUI thread at each refresh: ~0.2-0.4 s for 2048², ~1 s for 4096² on a busy 2-core machine).
MAX_OUTLINED_PIXELS = 4096 * 4096
#: Modes in which a labels layer is edited: it is drawn filled then (outlines hide what a stroke did).
EDITING_MODES = ("paint", "fill", "erase", "polygon")
#: Marks a labels layer whose mode changes already re-decide its outlines (beside METADATA_KEY, which each run
#: replaces).
OUTLINES_KEY = "wsss_cram_outlines"


def outline_width(shape) -> int:
    """napari's ``contour`` for labels of ``shape``: 2 px on a patch (1 hid in the tissue), 1 per 1024 px on a slide."""
    return max(2, int(round(max(int(v) for v in shape[-2:]) / 1024)))


def outline_labels_under_maps(viewer, image_name: str) -> None:
    """While an activation map of ``image_name`` is visible, draw its labels layers as class-coloured outlines
    (the heat shows through inside them; filled labels at 0.6 opacity hid it), filled again when the maps are
    hidden or while a layer is being painted. Labels larger than MAX_OUTLINED_PIXELS stay filled and turn
    more transparent instead (their outlines would cost seconds per refresh)."""
    maps_shown = any(ly.visible for ly in result_layers_of(viewer, image_name, "activation"))
    for layer in result_layers_of(viewer, image_name, "labels"):
        if layer.multiscale:
            continue
        if not layer.metadata.get(OUTLINES_KEY):  # follow the layer's own mode: filled while painting
            layer.metadata[OUTLINES_KEY] = True
            layer.events.mode.connect(lambda event=None: outline_labels_under_maps(viewer, image_name))
        outlined = maps_shown and str(layer.mode) not in EDITING_MODES
        small = int(np.prod(layer.data.shape[-2:])) <= MAX_OUTLINED_PIXELS
        contour = outline_width(layer.data.shape) if outlined and small else 0
        if layer.contour != contour:
            layer.contour = contour
        if not small:
            opacity = 0.3 if outlined else 0.6
            if abs(layer.opacity - opacity) > 1e-6:
                layer.opacity = opacity


def _full_range(data: np.ndarray) -> tuple[float, float]:
    """Activation maps are probabilities: show 0..1 (0..255 when stored as uint8) on every class alike."""
    return (0.0, 255.0) if np.asarray(data).dtype == np.uint8 else (0.0, 1.0)


def classes_of_layer(layer) -> ClassSpec | None:
    """The ClassSpec stored on a result Labels layer, or None for a layer this plugin did not make."""
    meta = layer.metadata.get(METADATA_KEY, {})
    return ClassSpec.from_dict(meta["classes"]) if "classes" in meta else None


def mpp_of_layer(layer) -> float | None:
    """µm per pixel of a result Labels layer's own pixels, when known."""
    return layer.metadata.get(METADATA_KEY, {}).get("mpp")


def set_results_mpp(viewer, image_name: str, mpp0: float | None) -> None:
    """The user stated the level-0 pixel size of ``image_name`` (a PNG states none): its result and imported
    labels layers take it (their own µm/px = ``mpp0`` x their downsample), for the areas and the exports."""
    for layer in result_layers_of(viewer, image_name, "labels"):
        meta = layer.metadata[METADATA_KEY]
        placed = Placement.from_metadata(meta.get("placement"))
        placed = Placement(placed.downsample, placed.origin, placed.level, mpp0=mpp0)
        meta["placement"] = placed.to_metadata()
        meta["mpp"] = placed.mpp


def add_pseudo_label_layer(viewer, source_layer, pseudo: np.ndarray, classes: ClassSpec, scale=1.0,
                           translate=0.0):
    """The reliable pseudo-label view ("pseudo-labels: <image>"): class colours, 255 (unsure) clear."""
    world_scale, world_translate = placement(source_layer, scale, translate)
    name = pseudo_layer_name(source_layer.name)
    pseudo = np.ascontiguousarray(pseudo, dtype=np.uint8)
    found = result_layers_of(viewer, source_layer.name, "pseudo")
    if found:  # made by an earlier run: new data in the same layer
        layer = found[-1]
        for extra in found[:-1]:
            viewer.layers.remove(extra)
        _place(layer, world_scale, world_translate)
        layer.data = pseudo
        return layer
    layer = viewer.add_labels(pseudo, name=name, scale=world_scale, colormap=labels_colormap(classes),
                              translate=world_translate, units=source_layer.units, opacity=0.6, visible=False,
                              features=class_features(classes),
                              metadata={METADATA_KEY: {"role": "pseudo", "source": source_layer.name}})
    _stack_on(viewer, source_layer, layer)
    return layer


def _viewport_level0_edges(layer, viewer) -> np.ndarray | None:
    """The canvas's visible box as level-0 pixel edges of ``layer`` ([[y0, x0], [y1, x1]]), from the camera and
    canvas size; None when the viewer cannot say (no canvas yet, 3D view)."""
    if viewer is None or viewer.dims.ndisplay != 2:
        return None
    height, width = (float(v) for v in viewer.canvas.size)
    zoom = float(viewer.camera.zoom)
    if height <= 1 or width <= 1 or zoom <= 0:
        return None
    center = np.asarray(viewer.camera.center, dtype=float)[-2:]
    half = np.array([height, width]) / (2 * zoom)
    world = np.asarray(viewer.dims.point, dtype=float).copy()
    corners = []
    for corner in (center - half, center + half):
        world[-2:] = corner
        corners.append(np.asarray(layer.world_to_data(world[-layer.ndim:]), dtype=float)[-2:])
    # data coordinates are pixel centres: pixel i spans i - 0.5 .. i + 0.5
    return np.stack([np.minimum(*corners), np.maximum(*corners)]) + 0.5


def region_mask(shapes_layer, labels_layer) -> np.ndarray:
    """The pixels of ``labels_layer`` whose centres lie inside the shapes (polygons, rectangles, ellipses) of
    ``shapes_layer``, as a boolean mask, whatever the two layers' scale and translate (lines and paths enclose no
    area)."""
    from skimage.draw import ellipse, polygon

    data = labels_layer.data[0] if labels_layer.multiscale else labels_layer.data
    shape = tuple(data.shape[-2:])
    mask = np.zeros(shape, dtype=bool)
    for vertices, kind in zip(shapes_layer.data, shapes_layer.shape_type, strict=True):
        if kind in ("line", "path"):
            continue
        world = [shapes_layer.data_to_world(v) for v in np.asarray(vertices, dtype=float)]
        # labels data coordinates: pixel centres at integers, as skimage.draw expects
        yx = np.array([np.asarray(labels_layer.world_to_data(w), dtype=float)[-2:] for w in world])
        if kind == "ellipse":  # napari stores an ellipse as the corners of its bounding box
            (y0, x0), (y1, x1) = yx.min(axis=0), yx.max(axis=0)
            rows, cols = ellipse((y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2, shape=shape)
        else:
            rows, cols = polygon(yx[:, 0], yx[:, 1], shape=shape)
        mask[rows, cols] = True
    return mask


def field_of_view(layer, level: int = 0, viewer=None) -> tuple[int, int, int, int]:
    """(y, x, h, w) in pixels of pyramid ``level`` of what the canvas shows of ``layer``.

    With ``viewer``, the visible box comes from its camera and canvas size. ``layer.corner_pixels`` is only the
    fallback: on a multiscale layer napari expands it to whole chunks (up to tens of times the visible area) and
    updates it only when the view leaves it; its upper corner is an inclusive pixel index.
    """
    from ..core.errors import WsssCramError

    shapes = layer.level_shapes if layer.multiscale else [layer.data.shape[:2]]
    edges = _viewport_level0_edges(layer, viewer)
    if edges is None:
        corners = np.asarray(layer.corner_pixels, dtype=float)[:, -2:]
        edges = np.stack([corners[0], corners[1] + 1])  # inclusive last pixel -> its far edge
        if layer.multiscale:
            edges = edges * np.asarray(layer.downsample_factors[layer.data_level], dtype=float)[-2:]
    level = min(level, len(shapes) - 1)
    if level:
        edges = edges / np.asarray(layer.downsample_factors[level], dtype=float)[-2:]
    full = np.asarray(shapes[level], dtype=int)[:2]
    lo = np.clip(np.floor(edges[0] + 1e-6).astype(int), 0, full)
    hi = np.clip(np.ceil(edges[1] - 1e-6).astype(int), 0, full)
    if np.any(hi - lo < 8):
        raise WsssCramError(f"The field of view shows no part of '{layer.name}': pan onto the image.")
    return int(lo[0]), int(lo[1]), int(hi[0] - lo[0]), int(hi[1] - lo[1])


def qupath_layer_name(image_name: str) -> str:
    """Name of the Labels layer holding QuPath annotations imported onto ``image_name``."""
    return f"qupath: {image_name}"


def level0_shape_of(layer) -> tuple[int, int]:
    """(height, width) of an image layer's full-resolution level."""
    return tuple(int(v) for v in (layer.level_shapes[0][:2] if layer.multiscale else layer.data.shape[:2]))


def qupath_layer_data(geojson, source_layer, classes: ClassSpec, class_map=None, name: str | None = None):
    """QuPath annotations as napari Labels layer data placed on ``source_layer`` (or, with None, on level-0
    pixels of their own extent) -> ((data, kwargs, "labels"), QuPathImport), read on the calling thread.

    The labels are level 0 of the image, or the power-of-two level that keeps them paintable (<= 8192 px);
    their metadata is a result layer's (classes, µm/px, level-0 scale/offset), so the dock paints, measures and
    exports them like a segmentation, and marked edited so that a Run never overwrites them. The GUI reads in
    a worker (``_qupath_job.import_job``, then :func:`qupath_layer_from_import`).
    """
    from ..core.io.qupath import features_extent, qupath_to_level_labels

    shape = level0_shape_of(source_layer) if source_layer is not None else features_extent(geojson)
    imported, d = qupath_to_level_labels(geojson, shape, classes, class_map=class_map)
    return qupath_layer_from_import(imported, d, source_layer, classes, name), imported


def qupath_layer_from_import(imported, d: int, source_layer, classes: ClassSpec, name: str | None = None):
    """Labels layer data ``(data, kwargs, "labels")`` of rasterised annotations (a ``QuPathImport`` at
    downsample ``d``) placed on ``source_layer`` (None: level-0 pixels of their own extent)."""
    # label pixel u covers level-0 pixels u*d .. (u+1)*d: its centre is level-0 pixel (u + 0.5) d - 0.5
    pred_scale, pred_translate = float(d), (d - 1) / 2
    if source_layer is not None:
        world_scale, world_translate = placement(source_layer, pred_scale, pred_translate)
        units, image_name = source_layer.units, source_layer.name
        meta_in = source_layer.metadata if isinstance(source_layer.metadata, dict) else {}
        mpp = meta_in.get("mpp")
    else:
        world_scale, world_translate = np.array([pred_scale] * 2), np.array([pred_translate] * 2)
        units, image_name, mpp = None, None, None
    meta = {"role": "labels", "classes": classes.to_dict(), "mpp": None if not mpp else float(mpp) * d,
            "source": image_name, "fingerprint": fingerprint(imported.labels), "edited": True, "imported": "qupath",
            "placement": Placement(downsample=float(d), mpp0=None if not mpp else float(mpp)).to_metadata()}
    kwargs = {"name": name or qupath_layer_name(image_name or "annotations"), "scale": tuple(world_scale),
              "translate": tuple(world_translate), "opacity": 0.6, "metadata": {METADATA_KEY: meta},
              "colormap": labels_colormap(classes), "features": class_features(classes)}
    if units is not None:
        kwargs["units"] = units
    return imported.labels, kwargs, "labels"


def add_qupath_layer(viewer, layer_data, source_layer=None):
    """Add the layer made by :func:`qupath_layer_data`, paintable by class, above its image."""
    data, kwargs, _ = layer_data
    layer = viewer.add_labels(data, **kwargs)
    classes = classes_of_layer(layer)
    if classes is not None:
        class_painting(layer, classes)
    if source_layer is not None:
        _stack_on(viewer, source_layer, layer)
    return layer
