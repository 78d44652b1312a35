"""The Segment dock's worker job: napari layer -> ImageSource region -> core inference -> plain arrays.

Runs in a napari ``thread_worker``: it touches no Qt object and only reads the layer's data, so the GUI thread
adds the result layers when it returns (a cancelled run therefore never leaves a half-added layer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from pathlib import Path

import numpy as np

from ..core.progress import CancelToken, Progress
from ._common import leave_gui_a_core


def load_model(path: str | Path) -> tuple:
    """Load a checkpoint for the dock -> (model, CheckpointInfo, devices this machine offers).

    Runs in a worker thread: the first call imports torch (~3 s), which on the GUI thread froze napari."""
    from ..core.checkpoint import load_checkpoint
    from ._common import available_devices

    model, info = load_checkpoint(path)
    return model, info, available_devices()


def image_source_of_layer(layer, level: int = 0):
    """The ONE reader over a napari image layer -> (ImageSource, level-0 pixels per source pixel).

    A layer read from a file is re-opened with ``ImageSource`` (all pyramid levels, lazily); in-memory data is
    wrapped as a one-level source of pyramid level ``level`` (whose pixels are that level's downsample).
    """
    from ..core.io.images import ImageSource

    path = getattr(layer.source, "path", None)
    full = tuple(layer.level_shapes[0][:2]) if layer.multiscale else tuple(layer.data.shape[:2])
    if path and Path(path).is_file():
        try:
            source = ImageSource.open(path)
            if tuple(source.shape) == full:
                # a µm/px the user gave in the dock for a file that states none (PNG/JPEG)
                source.assume_mpp(layer.metadata.get("mpp") if isinstance(layer.metadata, dict) else None)
                return source, 1.0
            source.close()
        except Exception:  # not readable by our reader (e.g. opened by another plugin): use the layer data
            pass
    level = min(level, len(layer.data) - 1) if layer.multiscale else 0
    data = layer.data[level] if layer.multiscale else layer.data
    downsample = float(layer.downsample_factors[level][-2]) if layer.multiscale else 1.0
    mpp = layer.metadata.get("mpp") if isinstance(layer.metadata, dict) else None
    return ImageSource.from_array(np.asarray(data), mpp=None if mpp is None else mpp * downsample), downsample


def segment_job(layer, model, info, settings, region, pseudo, cancel: CancelToken
                ) -> Generator[Progress, None, dict]:
    """Predict ``region`` (y, x, h, w in pixels of the output level, or None) of ``layer``; return plain arrays."""
    # pandas: napari's Labels layer features need it. Imported here (~0.35 s), not on the GUI thread when the
    # first result layer is added (measured there: a 350-860 ms stall, benchmarks/napari_stall.py).
    import pandas  # noqa: F401

    from ..core.inference import predict_source, prediction_pseudo_labels
    from .layers import fingerprint

    with leave_gui_a_core():
        source, downsample = image_source_of_layer(layer, settings.output_level)
        if downsample != 1.0:  # a one-level source of a coarser in-memory level
            settings = dataclasses.replace(settings, output_level=0)
        try:
            prediction = yield from predict_source(model, info, source, settings, region=region, cancel=cancel)
            if downsample != 1.0:  # the source's pixels are level pixels: measure the placement in level-0 pixels
                prediction.placement = prediction.placement.in_units_of(downsample)
            try:  # the dock paints on in-memory arrays (a streamed slide result is read back at its level)
                cam = None if prediction.cam is None else np.asarray(prediction.cam)
                if cam is not None:  # here, off the GUI thread: a map shows only where the labels are tissue
                    cam = tissue_only_maps(cam, prediction.labels, info.classes.background_index)
                labels = np.ascontiguousarray(prediction.labels, dtype=np.uint8)
                # hashed here, off the GUI thread (it tells later whether the user painted on the layer)
                result = {"labels": labels, "fingerprint": fingerprint(labels), "activations": cam,
                          "scale": prediction.scale, "translate": prediction.translate, "mpp": prediction.mpp,
                          "pseudo": None}
                if pseudo is not None and cam is not None:
                    result["pseudo"] = prediction_pseudo_labels(
                        source, prediction, info.classes, alpha=pseudo[0], beta=pseudo[1],
                        crf=settings.crf_params if settings.crf else None, crf_isolated=settings.crf_isolated)
            finally:
                prediction.cleanup()
        finally:
            source.close()
    return result


def tissue_only_maps(maps: np.ndarray, labels, background_index: int) -> np.ndarray:
    """Activation maps (C, H, W) set to 0 where ``labels`` (H, W) are background (no tissue): the model's class
    maps are high on bright glass, so shown unmasked the slide glows where there is nothing. The same tissue
    mask as the labels, so map and labels agree on where tissue is."""
    maps = np.asarray(maps)
    labels = np.asarray(labels)
    if maps.shape[-2:] != labels.shape:
        return maps
    return np.where((labels == background_index)[None], np.zeros((), maps.dtype), maps)


def batch_job(model, info, inputs: list[str], out_dir: str, settings, formats: tuple[str, ...], overwrite: bool,
              cancel: CancelToken, fallback=None) -> Generator[Progress, None, tuple]:
    """Segment files/folders into ``out_dir`` with one summary CSV through the core's batch (as ``wsss-cram
    predict`` does); ``fallback`` (from ``build_predict_settings``): the settings of images that state no µm/px."""
    from ..core.batch import predict_batch

    with leave_gui_a_core():
        return (yield from predict_batch(model, info, inputs, out_dir, settings, formats, overwrite=overwrite,
                                         cancel=cancel, fallback=fallback))
