"""The inference engine: one code path for a 200-pixel patch and a 100,000-pixel slide, in bounded memory.

API (used by ``wsss-cram predict``, ``demo`` and the napari Segment dock)
-------------------------------------------------------------------------
``PredictSettings``
    scale (default 1.0; callers pass ``core.checkpoint.default_resolution``) or mpp (target µm/px),
    tile/overlap (work pixels), batch, crf + crf_params, device ("auto", "cpu", "cuda", "cuda:1"...), amp,
    output_level, tissue_threshold (None disables background-tile skipping), with_probs, with_cam,
    stream_threshold_mp (outputs above it go to disk-backed zarr arrays), work_dir (where those go).
``predict_array(model, info, rgb, settings, cancel=None, mpp=None)``
    generator over an in-memory image (``uint8 (H, W, 3)``; RGBA/grayscale/16-bit accepted, converted).
``predict_source(model, info, source, settings, region=None, cancel=None)``
    generator over an :class:`~napari_wsss_cram.core.io.images.ImageSource`; ``region = (y, x, h, w)`` in
    pixels of ``settings.output_level`` (the dock passes the current field of view), None for everything.
``predict_path(model, info, path, settings, cancel=None)``
    the same for a file (opens and closes the source).
    All three yield ``Progress("predict", tiles_done, tiles_total, info)`` and *return* a :class:`Prediction`
    (drive them with :func:`napari_wsss_cram.core.progress.drive` or napari's ``thread_worker``).
    A cancelled :class:`CancelToken` raises ``Cancelled`` at the next batch; temporary stores are removed.
``Prediction``
    ``labels (H, W) uint8`` in ``0..K`` (K = background), ``probs``/``cam`` ``(K+1, H, W) uint8``
    (probability x 255; None unless asked for), ``placement`` (a :class:`~napari_wsss_cram.core.placement.
    Placement`: where the output pixels sit in level-0 pixels; ``scale``/``translate``/``mpp`` derive from it),
    ``class_pixels``, ``info`` (timings, tiles, skipped, read level, device...). Arrays are numpy in memory, or
    zarr arrays in a temporary folder when streamed: call :meth:`Prediction.cleanup` when done with them.
Output files (PNG, OME-TIFF, GeoJSON, composition) are written by :mod:`napari_wsss_cram.core.io.writers`.

``model`` is any ``torch.nn.Module`` with ``predict(x) -> (seg_probs, cam_or_None)`` at input size, for
``x`` normalised ``(B, 3, H, W)``; ``info`` is a ``CheckpointInfo`` (classes, model_config: mean/std, mpp)
or None (then ``model.classes``/``model.config`` or the WSSS4LUAD classes and ImageNet normalisation).

How it works (``predict_source``: stages passing one :class:`PredictionRun`): :func:`plan_tiles` covers the region
with tiles in the *work* grid (the image resampled by ``scale``), each with context padding, and marks the tiles
whose footprint has no tissue on a low-resolution near-white mask (predicted as background without the model);
:func:`allocate_outputs` creates the output arrays (memory or zarr); :func:`run_tiles` batches the other tiles on
the device (CUDA: AMP + channels-last; out-of-memory halves the batch and retries), resamples their probabilities
to the output grid and blends them with a linear-ramp window into a band of rows
(:class:`~napari_wsss_cram.core.tiling.BandAccumulator`), finalized (arg-max, quantized) row band by row band:
memory grows with the slide width, not its area. The optional dense CRF (the entry point training uses) runs on
the tile of a single-tile image, and on the *assembled* map of a tiled one (:func:`refine_crf`, window by window
with context: a CRF per tile drew class boundaries along tile borders); :func:`assemble` returns the
:class:`Prediction`. See :mod:`napari_wsss_cram.core.tiling`.

Modules: ``settings`` (PredictSettings, Prediction, the temporary stores), ``plan`` (stage 1-2: read level, tile
plan, output arrays), ``tiles`` (stage 3: the TileRunner and the device pipeline), ``refine`` (stage 3b: the CRF on
the assembled map), ``pipeline`` (the entry points, assembly, pseudo-labels of a prediction).
"""

from ..device import resolve_device
from .pipeline import assemble, predict_array, predict_path, predict_source, prediction_pseudo_labels
from .plan import PredictionRun, allocate_outputs, plan_tiles
from .refine import CRF_WINDOW, crf_margin, refine_crf, scaled_crf_params
from .settings import (
    BATCH_PER_DEVICE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_MPP,
    MAX_SCALE,
    MIN_MPP,
    MIN_SCALE,
    MIN_SIDE,
    STORE_OWNER,
    STORE_PREFIX,
    THUMBNAIL_SIDE,
    Prediction,
    PredictSettings,
    build_predict_settings,
    remove_stale_stores,
)
from .tiles import TileJob, TileResult, TileRunner, run_tiles

__all__ = [
    "BATCH_PER_DEVICE", "build_predict_settings", "CRF_WINDOW", "IMAGENET_MEAN", "IMAGENET_STD", "MAX_MPP", "MAX_SCALE", "MIN_MPP",
    "MIN_SCALE", "MIN_SIDE", "STORE_OWNER", "STORE_PREFIX", "THUMBNAIL_SIDE", "Prediction", "PredictSettings",
    "PredictionRun", "TileJob", "TileResult", "TileRunner", "allocate_outputs", "assemble", "crf_margin",
    "plan_tiles", "predict_array", "predict_path", "predict_source", "prediction_pseudo_labels", "refine_crf",
    "remove_stale_stores", "resolve_device", "run_tiles", "scaled_crf_params",
]
