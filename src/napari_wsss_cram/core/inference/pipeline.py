"""The engine's entry points (``predict_source``/``predict_array``/``predict_path``), the last stage, pseudo-labels."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Generator
from typing import Any

import numpy as np

from ..classes import ClassSpec
from ..crf import CRFParams
from ..device import resolve_device
from ..errors import ImageReadError, WsssCramError
from ..progress import CancelToken, Progress
from .plan import PredictionRun, allocate_outputs, plan_tiles
from .refine import refine_crf
from .settings import Prediction, PredictSettings
from .tiles import TileRunner, run_tiles


def _as_source(rgb: np.ndarray, mpp: float | None) -> Any:
    from ..io.images import ImageSource

    arr = np.asarray(rgb)
    if arr.size == 0 or arr.ndim < 2:
        raise ImageReadError(f"The image is empty (shape {arr.shape}); nothing to segment.")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] < 3):
        warnings.warn("The image is grayscale; it was converted to RGB. H&E models expect colour images.",
                      UserWarning, stacklevel=3)
    return ImageSource.from_array(arr, mpp=mpp)


# ================================================================================ engine
def predict_array(model: Any, info: Any, rgb: np.ndarray, settings: PredictSettings | None = None,
                  cancel: CancelToken | None = None, mpp: float | None = None,
                  ) -> Generator[Progress, None, Prediction]:
    """Segment an in-memory image; yields Progress, returns a :class:`Prediction` (see module docstring)."""
    source = _as_source(rgb, mpp)
    return (yield from predict_source(model, info, source, settings, None, cancel))


def predict_path(model: Any, info: Any, path: str | os.PathLike, settings: PredictSettings | None = None,
                 cancel: CancelToken | None = None) -> Generator[Progress, None, Prediction]:
    """Segment an image file or slide (opened with the project's ``ImageSource``)."""
    from ..io.images import ImageSource

    with ImageSource.open(path) as source:
        return (yield from predict_source(model, info, source, settings, None, cancel))



def predict_source(model: Any, info: Any, source: Any, settings: PredictSettings | None = None,
                   region: tuple[int, int, int, int] | None = None, cancel: CancelToken | None = None,
                   ) -> Generator[Progress, None, Prediction]:
    """Segment ``region`` (y, x, h, w in pixels of ``settings.output_level``; None = all) of an ImageSource.

    Stages pass one :class:`PredictionRun`: plan the tiles, allocate the outputs, run the device pipeline
    (read, model, blend), refine a tiled image's assembled map with the CRF, assemble the :class:`Prediction`.
    """
    settings = settings or PredictSettings()
    settings.validate()
    run = plan_tiles(model, info, source, settings, region)
    allocate_outputs(run)
    try:
        device = resolve_device(settings.device)
        runner = TileRunner(model, run.mean, run.std, settings, device, tile_crf=not run.crf_windows)
        yield from run_tiles(run, source, runner, cancel)
        if run.crf_windows:
            yield from refine_crf(run, source, runner, cancel)
    except BaseException:
        if run.store_dir is not None:
            shutil.rmtree(run.store_dir, ignore_errors=True)
        raise
    return assemble(run, runner)




def assemble(run: PredictionRun, runner: TileRunner) -> Prediction:
    """Stage 4: the :class:`Prediction` (arrays, placement, class pixel counts, run information)."""
    settings, classes = run.settings, run.classes
    oh, ow = run.region[2:]
    elapsed = time.perf_counter() - run.t_start
    pixels_in = oh * ow
    run_info = {
        "name": run.name, "tiles": run.total, "skipped_tiles": run.skipped, "tile_size": run.tile_shape,
        "seconds": elapsed, "model_seconds": runner.seconds, "crf_seconds": runner.crf_seconds + run.crf_seconds,
        "crf_on": "assembled map" if run.crf_windows else ("tiles" if settings.crf else None),
        "read_seconds": run.read_seconds, "megapixels": pixels_in / 1e6,
        "megapixels_per_second": pixels_in / 1e6 / max(elapsed, 1e-9), "device": str(runner.device),
        "batch": runner.batch, "messages": list(runner.messages), "streamed": run.streamed,
        "work_per_output_pixel": run.geom.work_per_out, "blend_block": run.block, "crf": settings.crf,
        **run.read_info,
    }
    cam = run.cam if runner.got_cam else None  # stage-2 models have no activation maps
    counts = run.class_pixels if run.class_pixels is not None else run.accumulator.class_pixels
    return Prediction(
        labels=run.labels, probs=run.probs, cam=cam, classes=classes,
        placement=run.placement, region=run.region,
        class_pixels={n: int(v) for n, v in zip(classes.all_names, counts, strict=True)},
        info=run_info, store_dir=run.store_dir,
    )


# ================================================================================ pseudo-labels
def prediction_pseudo_labels(source: Any, prediction: Prediction, classes: ClassSpec, alpha: float, beta: float,
                             crf: CRFParams | None = None, crf_isolated: bool = False) -> np.ndarray:
    """Reliable pseudo-labels (alpha/beta thresholds + CRF agreement) of a prediction's DA maps.
    ``crf_isolated``: a pydensecrf CRF runs in a helper process (GUI callers; see ``PredictSettings``).

    The classes the prediction found serve as the image-level label (at inference there is no other); the image
    is read from ``source`` at the prediction's region and level. Returns uint8 (h, w) in 0..K with 255 ignore.
    """
    from ..pseudo_labels import reliable_pseudo_labels

    if prediction.cam is None:
        raise WsssCramError("This model has no activation maps (a stage-2 model): no pseudo-label view.")
    labels = np.asarray(prediction.labels)
    y, x, h, w = prediction.region
    image = source.read_region(y, x, h, w, level=prediction.level)
    if image.shape[:2] != labels.shape:
        from PIL import Image

        image = np.asarray(Image.fromarray(image).resize(labels.shape[::-1], Image.BILINEAR))
    present = np.bincount(labels.ravel(), minlength=classes.num_outputs)[: classes.num_classes] > 0
    cam = np.asarray(prediction.cam, dtype=np.float32) / 255.0  # the engine stores maps as uint8 x 255
    return reliable_pseudo_labels(cam, image, present.astype(np.float32), alpha=alpha, beta=beta, crf=crf,
                                  crf_isolated=crf_isolated)
