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
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Generator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .classes import WSSS4LUAD, ClassSpec
from .crf import CRFParams, dense_crf, dense_crf_isolated, dense_crf_torch, resolve_backend
from .device import resolve_device
from .errors import ImageReadError, OutOfMemoryError, WsssCramError
from .placement import Placement
from .progress import CancelToken, Progress
from .tiling import (
    BandAccumulator,
    Geometry,
    RowSink,
    linear_taps,
    quantize,
    tile_starts,
    tissue_thumbnail,
    window_1d,
)
from .tissue import near_white_mask, restrict_to_tissue
from .validate import RANGES

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Smallest image side (output pixels) the engine accepts: below it there is nothing to segment.
MIN_SIDE = 8
#: Longest side, in its own pixels, of the tissue thumbnail that decides which tiles are skipped (each of
#: its pixels covers long side / THUMBNAIL_SIDE level-0 pixels, at least 1).
THUMBNAIL_SIDE = 1024
#: All output formats, and the default set of the CLI.
FORMATS = ("png", "ome-tiff", "geojson", "probs")
DEFAULT_FORMATS = ("png", "ome-tiff", "geojson")


@dataclass
class PredictSettings:
    """How to run the engine. ``tile``/``overlap`` are in work pixels (what the model sees)."""

    scale: float = 1.0
    mpp: float | None = None
    tile: int = 512
    overlap: int = 64
    batch: int = 4
    crf: bool = False
    crf_params: CRFParams = field(default_factory=CRFParams)
    # run a pydensecrf CRF in a helper process (GUI callers: the worker thread then never holds the GIL for a
    # whole tile); the torch backend releases the GIL by itself and ignores this
    crf_isolated: bool = False
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    output_level: int = 0
    tissue_threshold: int | None = 200
    # "tissue": background is where the tissue mask says (near-white), every tissue pixel takes the arg-max
    # over the tissue classes; "model": the model's background channel competes with the classes (the paper).
    background: str = "tissue"
    # zero the classes the image-level classifier calls absent in a tile (presence < gate_threshold). Off by
    # default: on real WSSS4LUAD images a CPU-trained classifier, which saw normal lung in few crops, put whole
    # normal-only images at presence 0.03-0.07, and gating then erased the class (benchmarks/README.md). The
    # threshold is low because gating out a present class loses it outright.
    gate_classes: bool = False
    gate_threshold: float = 0.3
    # test-time augmentation: the model at each of these scales (and mirrored), averaged; costs len x (2 x) time
    tta_scales: tuple[float, ...] = (1.0,)
    tta_flip: bool = False
    with_probs: bool = True
    with_cam: bool = False
    stream_threshold_mp: float = 64.0
    work_dir: str | None = None

    def __post_init__(self) -> None:
        self.validate()  # when built: the CLI, the presets and the docks meet the same limits

    def validate(self) -> None:
        """Refuse settings outside their documented ranges (``core.validate.RANGES``) with a clear message."""
        from .validate import check_fields, check_number

        for name in ("scale", "tile", "overlap", "batch"):  # types first: the range checks below compare them
            check_number(getattr(self, name), name, -math.inf, math.inf, integer=name != "scale",
                         label=f"--{name}")
        if self.mpp is not None:
            check_number(self.mpp, "mpp", -math.inf, math.inf, label="--mpp")
        if self.mpp is None and not (self.scale > 0 and math.isfinite(self.scale)):
            raise WsssCramError(f"--scale must be a positive number, got {self.scale}.")
        if self.mpp is None and not MIN_SCALE <= self.scale <= MAX_SCALE:
            # x250 of a 100 px patch is 25000^2 px of work: almost surely a µm/px or a percentage typed as a scale
            raise WsssCramError(f"--scale {self.scale:g} is outside {MIN_SCALE:g}..{MAX_SCALE:g} (a factor on the "
                                "image's pixels: 1 = as stored, 2.5 = the paper's). For a pixel size use --mpp.")
        if self.mpp is not None and not MIN_MPP <= self.mpp <= MAX_MPP:
            raise WsssCramError(f"--mpp {self.mpp:g} is outside {MIN_MPP:g}..{MAX_MPP:g} µm per pixel (40x scans are "
                                "about 0.25, 20x about 0.5).")
        if self.mpp is not None and not self.mpp > 0:
            raise WsssCramError(f"--mpp must be a positive number of µm per pixel, got {self.mpp}.")
        if self.tile < 32:
            raise WsssCramError(f"--tile must be at least 32 pixels, got {self.tile}.")
        if not 0 <= self.overlap <= self.tile // 2:
            raise WsssCramError(f"--overlap must be between 0 and half the tile ({self.tile // 2}), "
                                f"got {self.overlap}.")
        if self.batch < 1:
            raise WsssCramError(f"--batch must be at least 1, got {self.batch}.")
        if not self.tta_scales or not all(0.25 <= float(v) <= 4.0 for v in self.tta_scales):
            raise WsssCramError(f"test-time scales must lie between 0.25 and 4, got {self.tta_scales}.")
        if self.work_dir is not None and not Path(self.work_dir).is_dir():
            raise WsssCramError(f"--work-dir '{self.work_dir}' is not an existing folder; create it or leave the "
                                "option out (the system's temporary folder is used).")
        if self.background not in ("tissue", "model"):
            raise WsssCramError(f"background must be 'tissue' or 'model', got '{self.background}'.")
        if not isinstance(self.crf_params, CRFParams):
            raise WsssCramError(f"crf_params must be CRFParams, got {type(self.crf_params).__name__}.")
        check_fields(self, ["tile", "batch", "output_level", "gate_threshold", "stream_threshold_mp"])
        if self.tissue_threshold is not None:  # a negative threshold made every pixel background, silently
            check_number(self.tissue_threshold, "tissue_threshold", label="--tissue-threshold")


#: disk-backed stores of large slides: a folder per prediction, holding the owner's process id
STORE_PREFIX, STORE_OWNER = "wsss-cram-predict-", "owner.pid"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its store
    return True


def remove_stale_stores(parent: Path) -> list[Path]:
    """Remove the disk-backed stores in ``parent`` whose process is gone (killed with ``kill -9`` or by a power
    cut, it could not clean up); a live run's store is kept. Returns the folders removed."""
    removed = []
    for store in sorted(Path(parent).glob(f"{STORE_PREFIX}*")):
        try:
            pid = int((store / STORE_OWNER).read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            continue  # not ours, or being created right now
        if pid != os.getpid() and not _process_alive(pid):
            shutil.rmtree(store, ignore_errors=True)
            removed.append(store)
    return removed


#: the resampling factors and pixel sizes the engine accepts (beyond them, a typing slip is likelier than intent)
MIN_SCALE, MAX_SCALE = 0.01, 16.0
MIN_MPP, MAX_MPP = 0.05, 100.0


@dataclass
class Prediction:
    """Result of the engine for one image or region (see the module docstring)."""

    labels: Any
    probs: Any
    cam: Any
    classes: ClassSpec
    placement: Placement
    region: tuple[int, int, int, int]
    class_pixels: dict[str, int]
    info: dict[str, Any] = field(default_factory=dict)
    store_dir: Path | None = None

    @property
    def scale(self) -> tuple[float, float]:
        """napari ``scale`` of the output pixels in level-0 pixels (see :class:`Placement`)."""
        return self.placement.scale

    @property
    def translate(self) -> tuple[float, float]:
        """napari ``translate`` (pixel centres) in level-0 pixels (see :class:`Placement`)."""
        return self.placement.translate

    @property
    def mpp(self) -> float | None:
        """µm per output pixel (None when the image does not state its pixel size)."""
        return self.placement.mpp

    @property
    def level(self) -> int:
        return self.placement.level

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.labels.shape)  # type: ignore[return-value]

    @property
    def streamed(self) -> bool:
        return self.store_dir is not None

    def cleanup(self) -> None:
        """Remove the temporary disk-backed arrays of a streamed prediction (no-op in memory)."""
        if self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)
            self.store_dir = None


# ================================================================================ model side
def _model_meta(model: Any, info: Any) -> tuple[ClassSpec, tuple, tuple, float | None]:
    """Classes, normalisation mean/std and training µm/px from the checkpoint info or the model."""
    classes = getattr(info, "classes", None) or getattr(model, "classes", None) or WSSS4LUAD
    config = getattr(info, "model_config", None) or getattr(model, "config", None)
    mean = tuple(getattr(config, "mean", IMAGENET_MEAN))
    std = tuple(getattr(config, "std", IMAGENET_STD))
    return classes, mean, std, getattr(config, "mpp", None)


Taps = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class TileJob:
    """One tile for the model: its read-grid footprint and how to resample it to the work grid and back."""

    index: int
    block: np.ndarray          # uint8 (h, w, 3) footprint on the read grid
    in_rows: Taps              # read grid -> work grid (rows, cols)
    in_cols: Taps
    out_rows: Taps             # work grid -> accumulation pixels of this tile (rows, cols)
    out_cols: Taps


@dataclass
class TileResult:
    probs: np.ndarray                 # (C, h, w) float32 at the tile's accumulation pixels
    cam: np.ndarray | None


def _lerp(x: Any, dim: int, taps: tuple) -> Any:
    """Linear interpolation of torch tensor ``x`` along ``dim`` (taps as torch tensors on x's device)."""
    i0, i1, t = taps
    a = x.index_select(dim, i0)
    b = x.index_select(dim, i1)
    shape = [1] * x.ndim
    shape[dim] = -1
    return a + (b - a) * t.view(shape)


class TileRunner:
    """Runs the model on batches of tiles: resampling to the work grid, normalisation, the model and the
    resampling back to output pixels all happen on the device (only small arrays cross the bus); CUDA uses
    AMP and channels-last; out-of-memory halves the batch and retries."""

    def __init__(self, model: Any, mean: tuple, std: tuple, settings: PredictSettings, device: Any,
                 tile_crf: bool = True) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.cancel: CancelToken | None = None  # set by run_tiles: the tile CRF checks it between iterations
        self.cuda = device.type == "cuda"
        self.batch = settings.batch
        self.amp = settings.amp and self.cuda
        self.channels_last = settings.channels_last and self.cuda
        # the CRF on each tile (a single-tile image); a tiled image gets it on the assembled map (refine_crf)
        self.crf = settings.crf_params if (settings.crf and tile_crf) else None
        self.crf_isolated = bool(settings.crf_isolated)
        self.want_cam = settings.with_cam
        self.tissue_threshold = (float(settings.tissue_threshold)
                                 if settings.background == "tissue" and settings.tissue_threshold is not None
                                 else None)
        self.gate = bool(settings.gate_classes)
        self.tta_scales = tuple(float(v) for v in settings.tta_scales)
        self.tta_flip = bool(settings.tta_flip)
        self.gate_threshold = float(settings.gate_threshold)
        self.model = model.eval().to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        self.messages: list[str] = []
        self.seconds = 0.0
        self.crf_seconds = 0.0
        self.got_cam = False
        self._taps_cache: dict[int, tuple] = {}

    def _taps(self, taps: Taps, cache: bool = False) -> tuple:
        """Taps as device tensors; ``cache`` for the output taps shared by a whole tile row/column."""
        key = id(taps)
        hit = self._taps_cache.get(key) if cache else None
        if hit is not None and hit[0] is taps:  # the cache holds ``taps`` alive, so its id is not reused
            return hit[1]
        torch = self.torch
        converted = tuple(torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=True)
                          for a in taps)
        if cache:
            if len(self._taps_cache) > 4096:
                self._taps_cache.clear()
            self._taps_cache[key] = (taps, converted)
        return converted

    def _work_tile(self, job: TileJob) -> Any:
        """uint8 read-grid footprint -> float (H, W, 3) work tile, quantized like a uint8 image."""
        torch = self.torch
        block = torch.from_numpy(np.ascontiguousarray(job.block))
        if self.cuda:
            block = block.pin_memory().to(self.device, non_blocking=True)
        x = _lerp(block.float(), 0, self._taps(job.in_rows))
        x = _lerp(x, 1, self._taps(job.in_cols))
        return x.round_().clamp_(0.0, 255.0)

    def _predict_once(self, x: Any) -> tuple[Any, Any, Any]:
        if hasattr(self.model, "predict_with_presence"):
            return self.model.predict_with_presence(x)
        probs, cam = self.model.predict(x)
        return probs, cam, None

    def _predict_augmented(self, x: Any) -> tuple[Any, Any, Any]:
        """The model at each test-time scale (and mirrored, with ``tta_flip``), averaged at input size."""
        import torch.nn.functional as F

        if self.tta_scales == (1.0,) and not self.tta_flip:
            return self._predict_once(x)
        size = x.shape[-2:]
        sums: list[Any] = [None, None, None]
        count = 0
        for scale in self.tta_scales:
            xs = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
            for flip in ((False, True) if self.tta_flip else (False,)):
                out = list(self._predict_once(xs.flip(-1) if flip else xs))
                for i in (0, 1):
                    if out[i] is not None:
                        out[i] = out[i].float().flip(-1) if flip else out[i].float()
                        if out[i].shape[-2:] != size:
                            out[i] = F.interpolate(out[i], size=size, mode="bilinear", align_corners=False)
                for i in range(3):
                    if out[i] is not None:
                        sums[i] = out[i].float() if sums[i] is None else sums[i] + out[i].float()
                count += 1
        return tuple(None if v is None else v / count for v in sums)

    def _run(self, jobs: list[TileJob]) -> list[TileResult]:
        torch = self.torch
        with torch.inference_mode():
            rgb = torch.stack([self._work_tile(j) for j in jobs])        # (B, H, W, 3) float
            x = (rgb.permute(0, 3, 1, 2) - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            amp = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
            with amp:
                probs, cam, presence = self._predict_augmented(x)
            probs = probs.float()
            cam = cam.float().clamp(0.0, 1.0) if (cam is not None and self.want_cam) else None
            self.got_cam = self.got_cam or cam is not None
            white = None
            if self.tissue_threshold is not None:
                white = near_white_mask(rgb, self.tissue_threshold)
            probs = restrict_to_tissue(probs, white, presence if self.gate else None, self.gate_threshold)
            if self.crf is not None:
                # The CRF runs at the model's resolution, on the exact tiles the model saw: the torch backend on
                # the model's device for the whole batch (its ops release the GIL, so a GUI thread keeps
                # running), pydensecrf on the CPU tile by tile (in a helper process with crf_isolated).
                t0 = time.perf_counter()
                if resolve_backend(self.crf, self.device) == "torch":
                    probs = dense_crf_torch(rgb, probs, self.crf, cancel=self.cancel)
                    if self.cuda:
                        torch.cuda.synchronize(self.device)  # so that crf_seconds is the CRF's time
                else:
                    rgb_u8 = rgb.to(torch.uint8).cpu().numpy()
                    probs_np = probs.cpu().numpy()
                    refined = []
                    for j in range(len(jobs)):
                        p = probs_np[j] / np.maximum(probs_np[j].sum(axis=0, keepdims=True), 1e-8)
                        refined.append((dense_crf_isolated if self.crf_isolated else dense_crf)(
                            rgb_u8[j], p, self.crf, cancel=self.cancel))
                    probs = torch.from_numpy(np.stack(refined)).to(self.device)
                self.crf_seconds += time.perf_counter() - t0
                if white is not None:  # the CRF may spread background over pale tissue: the mask decides
                    probs = restrict_to_tissue(probs, white, None, self.gate_threshold)
            results = []
            for j, job in enumerate(jobs):
                rows, cols = self._taps(job.out_rows, cache=True), self._taps(job.out_cols, cache=True)
                p = _lerp(_lerp(probs[j], 1, rows), 2, cols).cpu().numpy()
                c = None if cam is None else _lerp(_lerp(cam[j], 1, rows), 2, cols).cpu().numpy()
                results.append(TileResult(p, c))
        return results

    def __call__(self, jobs: list[TileJob]) -> list[TileResult]:
        """Predict ``jobs`` in batches of at most ``self.batch``, halving it on out-of-memory."""
        torch = self.torch
        oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                      getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
        start = time.perf_counter()
        crf_before = self.crf_seconds
        results: list[TileResult] = []
        i = 0
        while i < len(jobs):
            n = min(self.batch, len(jobs) - i)
            try:
                results.extend(self._run(jobs[i:i + n]))
            except oom_types as err:
                if self.cuda:
                    torch.cuda.empty_cache()
                if n == 1:
                    shape = jobs[i].out_rows[0].shape
                    raise OutOfMemoryError(
                        f"The {self.device} device ran out of memory on a single tile (blending {shape[0]} rows); "
                        "use a smaller --tile (e.g. 256) or --device cpu.") from err
                self.batch = max(1, n // 2)
                message = (f"Out of memory on {self.device} with a batch of {n} tiles; "
                           f"retrying with batches of {self.batch}.")
                log.warning(message)
                self.messages.append(message)
                continue
            i += n
        self.seconds += time.perf_counter() - start - (self.crf_seconds - crf_before)
        return results


# ================================================================================ image side
class _BoxReducedLevel:
    """A virtual pyramid level: ``level`` of ``source`` averaged over ``b x b`` blocks.

    Used when the work grid is much coarser than the closest real level (bilinear sampling would alias).
    """

    def __init__(self, source: Any, level: int, b: int) -> None:
        self.source, self.level, self.b = source, level, b
        h, w = source.level_shapes[level]
        self.shape = (h // b, w // b)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        b = self.b
        block = self.source.read_region(y * b, x * b, h * b, w * b, self.level)
        return block.reshape(h, b, w, b, 3).mean(axis=(1, 3)).round().astype(np.uint8)


class _Level:
    """Where tiles are read from: one level of the source, possibly box-reduced."""

    def __init__(self, source: Any, level: int, b: int = 1) -> None:
        self.source, self.level, self.b = source, level, b
        self._reduced = _BoxReducedLevel(source, level, b) if b > 1 else None
        self.shape = self._reduced.shape if self._reduced else tuple(source.level_shapes[level])

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        if self._reduced is not None:
            return self._reduced.read(y, x, h, w)
        return self.source.read_region(y, x, h, w, self.level)


def _read_footprint(level: _Level, geom: Geometry, uy: int, ux: int, th: int, tw: int,
                    ) -> tuple[np.ndarray, Taps, Taps]:
    """Read the read-grid pixels a work tile at (uy, ux) of (th, tw) needs, and its bilinear taps."""
    H, W = level.shape
    ry = geom.work_to_read(np.arange(uy, uy + th))
    rx = geom.work_to_read(np.arange(ux, ux + tw))
    y0 = int(np.clip(math.floor(ry[0]), 0, H - 1))
    y1 = int(np.clip(math.floor(ry[-1]) + 1, 0, H - 1))
    x0 = int(np.clip(math.floor(rx[0]), 0, W - 1))
    x1 = int(np.clip(math.floor(rx[-1]) + 1, 0, W - 1))
    block = level.read(y0, x0, y1 - y0 + 1, x1 - x0 + 1)
    return block, linear_taps(ry, y0, block.shape[0], H), linear_taps(rx, x0, block.shape[1], W)


def _as_source(rgb: np.ndarray, mpp: float | None) -> Any:
    from .io.images import ImageSource

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
    from .io.images import ImageSource

    with ImageSource.open(path) as source:
        return (yield from predict_source(model, info, source, settings, None, cancel))


def _choose_read_level(source: Any, settings: PredictSettings, out_level: int,
                       model_mpp: float | None) -> tuple[_Level, Geometry, dict]:
    """Read level and work scale: ``scale`` reads the output level; ``mpp`` reads the level closest to
    (not coarser than) the target µm/px, box-reducing when that level is still over 1.5x finer."""
    downsamples = source.level_downsamples
    d_out = downsamples[out_level]
    if settings.mpp is None:
        level = _Level(source, out_level)
        geom = Geometry(d_read=d_out, d_out=d_out, f=float(settings.scale))
        return level, geom, {"read_level": out_level, "work_scale": float(settings.scale), "work_mpp": (
            None if source.mpp is None else source.mpp * d_out / settings.scale)}
    target = float(settings.mpp)
    if source.mpp is None:
        name = getattr(source, "name", "the image")
        raise ImageReadError(f"{name} does not state its pixel size (µm/px), so --mpp {target} cannot be "
                             "applied; use --scale instead.")
    want = target / source.mpp  # level-0 pixels per work pixel
    read = source.best_level_for_downsample(want)
    d_read = downsamples[read]
    b = int(math.floor(want / d_read)) if want / d_read >= 1.5 else 1
    level = _Level(source, read, b)
    geom = Geometry(d_read=d_read * b, d_out=d_out, f=d_read * b / want)
    if not MIN_SCALE <= geom.f <= MAX_SCALE:  # e.g. --mpp 0.05 on a 4 µm/px image: an 80x up-sampling
        name = getattr(source, "name", "the image")
        raise WsssCramError(f"--mpp {target:g} on {name} ({source.mpp:g} µm/px) would resample it {geom.f:.3g}x, "
                            f"outside {MIN_SCALE:g}..{MAX_SCALE:g}; check --mpp (40x scans are about 0.25 µm/px).")
    return level, geom, {"read_level": read, "box_reduce": b, "work_scale": geom.f, "work_mpp": target,
                         "model_mpp": model_mpp}


def _tissue_mask(source: Any, y0: float, x0: float, h0: float, w0: float, threshold: int,
                 ) -> tuple[np.ndarray, float, float, float]:
    """Low-res tissue mask of a level-0 box; returns (mask, level-0 px per mask px, mask origin y, x)."""
    want = max(1.0, max(h0, w0) / THUMBNAIL_SIDE)
    lt = source.best_level_for_downsample(want)
    dl = source.level_downsamples[lt]
    r = max(1, int(round(want / dl)))
    H, W = source.level_shapes[lt]
    ty0, tx0 = int(max(0, math.floor(y0 / dl))), int(max(0, math.floor(x0 / dl)))
    ty1, tx1 = int(min(H, math.ceil((y0 + h0) / dl))), int(min(W, math.ceil((x0 + w0) / dl)))
    mask = tissue_thumbnail(lambda y, x, h, w: source.read_region(ty0 + y, tx0 + x, h, w, lt),
                            max(1, ty1 - ty0), max(1, tx1 - tx0), r, threshold)
    return mask, dl * r, ty0 * dl, tx0 * dl


@dataclass
class PredictionRun:
    """The record the engine's stages pass along (as segment-anything's mask generator passes its ``MaskData``):
    what :func:`plan_tiles` decided, what :func:`allocate_outputs` created, what :func:`run_tiles` counted."""

    # plan_tiles: the region, the grids and the tiles
    name: str
    settings: PredictSettings
    classes: ClassSpec
    mean: tuple
    std: tuple
    model_mpp: float | None
    region: tuple[int, int, int, int]          # (y, x, h, w) in pixels of the output level
    placement: Placement
    level: _Level
    geom: Geometry
    read_info: dict
    block: int                                 # m: output pixels per accumulation pixel (per axis)
    acc_shape: tuple[int, int]
    ys: list[int]                              # tile starts on the work grid (rows, columns)
    xs: list[int]
    tile_shape: tuple[int, int]
    row_spans: list[tuple[int, int, np.ndarray]]   # accumulation pixels [a, b) of each tile row / column
    col_spans: list[tuple[int, int, np.ndarray]]
    row_weights: list[np.ndarray]
    col_weights: list[np.ndarray]
    tiles: list[tuple[int, int]]               # (tile row, tile column), row-major
    runs_model: list[bool]                     # False: no tissue in its footprint, predicted as background
    t_start: float
    # CRF windows on the assembled map (tiled images): (core y0, y1, x0, x1, window y0, y1, x0, x1), output px
    crf_windows: list[tuple[int, ...]] = field(default_factory=list)
    # allocate_outputs: where finalized rows go
    labels: Any = None
    probs: Any = None
    cam: Any = None
    accumulator: BandAccumulator | None = None
    store_dir: Path | None = None
    crf_probs: Any = None                      # float16 (C, H, W) blended probabilities, the CRF's unaries
    # run_tiles / refine_crf: counters
    done: int = 0
    skipped: int = 0
    read_seconds: float = 0.0
    crf_seconds: float = 0.0
    class_pixels: np.ndarray | None = None     # recounted after refine_crf

    @property
    def total(self) -> int:
        return len(self.tiles)

    @property
    def steps(self) -> int:
        """Progress steps: tiles, then CRF windows."""
        return len(self.tiles) + len(self.crf_windows)

    def tile_borders(self) -> tuple[list[float], list[float]]:
        """Where neighbouring tiles meet (the middle of each overlap), in output pixels of the region (rows,
        columns): where seams would show."""
        k = self.geom.work_per_out
        out = []
        for starts, size, origin in ((self.ys, self.tile_shape[0], self.region[0]),
                                     (self.xs, self.tile_shape[1], self.region[1])):
            out.append([((starts[i + 1] + starts[i] + size) / 2.0 + 0.5) / k - 0.5 - origin
                        for i in range(len(starts) - 1)])
        return out[0], out[1]

    @property
    def streamed(self) -> bool:
        return self.store_dir is not None


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


def plan_tiles(model: Any, info: Any, source: Any, settings: PredictSettings,
               region: tuple[int, int, int, int] | None) -> PredictionRun:
    """Stage 1: clip the region, choose the read level and work grid, lay out the tiles and their blending
    weights, and decide from a low-resolution tissue mask which tiles need the model."""
    t_start = time.perf_counter()
    classes, mean, std, model_mpp = _model_meta(model, info)
    name = getattr(source, "name", "image")
    out_level = int(settings.output_level)
    if not 0 <= out_level < source.n_levels:
        raise WsssCramError(f"{name} has {source.n_levels} level(s); output level {out_level} does not exist.")
    lh, lw = source.level_shapes[out_level]
    if region is None:
        region = (0, 0, lh, lw)
    oy0, ox0, oh, ow = (int(v) for v in region)
    oy0, ox0 = max(0, oy0), max(0, ox0)
    oh, ow = min(oh, lh - oy0), min(ow, lw - ox0)
    if oh < MIN_SIDE or ow < MIN_SIDE:
        raise ImageReadError(f"{name}: the image (or region) is {max(oh, 0)}x{max(ow, 0)} pixels; at least "
                             f"{MIN_SIDE}x{MIN_SIDE} is needed to segment it.")

    level, geom, read_info = _choose_read_level(source, settings, out_level, model_mpp)
    k = geom.work_per_out
    # Blend on the output grid, or on blocks of m output pixels when the work grid is coarser (a 40x slide
    # processed at 1 µm/px): the band of rows in memory then stays about one tile high in work pixels.
    m = max(1, int(math.floor(1.0 / k + 1e-9)))
    ah, aw = -(-oh // m), -(-ow // m)
    centres_y = geom.block_centres_in_work(oy0, ah, m)
    centres_x = geom.block_centres_in_work(ox0, aw, m)
    wy_lo, wy_hi = math.floor(centres_y[0]), math.floor(centres_y[-1]) + 2
    wx_lo, wx_hi = math.floor(centres_x[0]), math.floor(centres_x[-1]) + 2
    ys, th = tile_starts(wy_lo, wy_hi, settings.tile, settings.overlap)
    xs, tw = tile_starts(wx_lo, wx_hi, settings.tile, settings.overlap)
    ramp = float(settings.overlap)

    # Accumulation pixels each tile writes ([a, b)), and where they sit inside the tile (work coordinates).
    def spans(starts: list[int], size: int, centres: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        out = []
        for u0 in starts:
            a = int(np.searchsorted(centres, u0, side="left"))
            b = int(np.searchsorted(centres, u0 + size - 1, side="right"))
            out.append((a, b, centres[a:b] - u0))
        return out

    row_spans, col_spans = spans(ys, th, centres_y), spans(xs, tw, centres_x)
    row_weights = [window_1d(p, th, ramp) for _, _, p in row_spans]
    col_weights = [window_1d(p, tw, ramp) for _, _, p in col_spans]
    tiles = [(r, c) for r in range(len(ys)) for c in range(len(xs))]

    # Tissue mask: which tiles can be skipped as background.
    d_out, d_read = geom.d_out, geom.d_read
    runs_model = [True] * len(tiles)
    if settings.tissue_threshold is not None:
        mask, per_px, my0, mx0 = _tissue_mask(source, oy0 * d_out, ox0 * d_out, oh * d_out, ow * d_out,
                                              int(settings.tissue_threshold))

        def has_tissue(uy: int, ux: int) -> bool:
            # Tile footprint in level-0 pixels -> mask pixels, grown by one for safety.
            ry = (geom.work_to_read(np.array([uy, uy + th - 1])) + 0.5) * d_read
            rx = (geom.work_to_read(np.array([ux, ux + tw - 1])) + 0.5) * d_read
            i0, i1 = int(math.floor((ry[0] - my0) / per_px)) - 1, int(math.ceil((ry[1] - my0) / per_px)) + 1
            j0, j1 = int(math.floor((rx[0] - mx0) / per_px)) - 1, int(math.ceil((rx[1] - mx0) / per_px)) + 1
            return bool(mask[max(0, i0):max(0, i1), max(0, j0):max(0, j1)].any())

        runs_model = [has_tissue(ys[r], xs[c]) for r, c in tiles]

    crf_windows: list[tuple[int, ...]] = []
    if settings.crf and len(tiles) > 1 and not _CRF_PER_TILE:
        crf_windows = _crf_windows(oh, ow, crf_margin(settings.crf_params, k))
    placement = Placement.of_region(oy0, ox0, d_out, level=out_level, mpp0=getattr(source, "mpp", None))
    return PredictionRun(
        name=name, settings=settings, classes=classes, mean=mean, std=std, model_mpp=model_mpp,
        region=(oy0, ox0, oh, ow), placement=placement, level=level, geom=geom, read_info=read_info, block=m,
        acc_shape=(ah, aw), ys=ys, xs=xs, tile_shape=(th, tw), row_spans=row_spans, col_spans=col_spans,
        row_weights=row_weights, col_weights=col_weights, tiles=tiles, runs_model=runs_model, t_start=t_start,
        crf_windows=crf_windows)


#: Keep the CRF on each tile of a tiled image (the behaviour before the seam fix): for benchmarks/seams.py only.
_CRF_PER_TILE = False
#: Side (output pixels) of the part of the assembled map one CRF window keeps.
CRF_WINDOW = 1024


def crf_margin(params: CRFParams, work_per_out: float) -> int:
    """Context (output pixels) around a CRF window's kept part: 4 bilateral ranges, so that two windows agree
    where they meet (the kernel weight at 4 sigma is 3e-4)."""
    return int(min(512, max(32, math.ceil(4.0 * params.bilateral_sxy / work_per_out))))


def _crf_windows(h: int, w: int, margin: int) -> list[tuple[int, ...]]:
    out = []
    for y0 in range(0, h, CRF_WINDOW):
        for x0 in range(0, w, CRF_WINDOW):
            y1, x1 = min(h, y0 + CRF_WINDOW), min(w, x0 + CRF_WINDOW)
            out.append((y0, y1, x0, x1, max(0, y0 - margin), min(h, y1 + margin), max(0, x0 - margin),
                        min(w, x1 + margin)))
    return out


def scaled_crf_params(params: CRFParams, work_per_out: float) -> CRFParams:
    """The CRF's distances are in model (work) pixels; the same kernels on the output grid."""
    import dataclasses

    # kept inside the settings' range: narrower is no smoothing either way (0 crashed the CRF), wider is global
    low, high = RANGES["gaussian_sxy"][:2]
    return dataclasses.replace(params, gaussian_sxy=min(high, max(low, params.gaussian_sxy / work_per_out)),
                               bilateral_sxy=min(high, max(low, params.bilateral_sxy / work_per_out)))


def allocate_outputs(run: PredictionRun) -> None:
    """Stage 2: the output arrays (in memory, or chunked zarr arrays on disk above the streaming threshold)
    and the band accumulator that fills them."""
    settings, channels = run.settings, run.classes.num_outputs
    oh, ow = run.region[2:]
    want_cam = settings.with_cam
    with_crf = bool(run.crf_windows)
    if oh * ow > settings.stream_threshold_mp * 1e6:
        import zarr

        remove_stale_stores(Path(settings.work_dir or tempfile.gettempdir()))
        store_dir = run.store_dir = Path(tempfile.mkdtemp(prefix=STORE_PREFIX, dir=settings.work_dir))
        (store_dir / STORE_OWNER).write_text(str(os.getpid()), encoding="utf-8")
        chunk = 256

        def array(name: str, shape: tuple, chunks: tuple, dtype: Any = np.uint8) -> Any:
            return zarr.create_array(str(store_dir / f"{name}.zarr"), shape=shape, chunks=chunks, dtype=dtype)

        run.labels = array("labels", (oh, ow), (chunk, 1024))
        run.probs = array("probs", (channels, oh, ow), (1, chunk, 1024)) if settings.with_probs else None
        run.cam = array("cam", (channels, oh, ow), (1, chunk, 1024)) if want_cam else None
        run.crf_probs = array("crf_probs", (channels, oh, ow), (1, chunk, 1024), np.float16) if with_crf else None
        chunk_rows = chunk
    else:
        run.labels = np.zeros((oh, ow), np.uint8)
        run.probs = np.zeros((channels, oh, ow), np.uint8) if settings.with_probs else None
        run.cam = np.zeros((channels, oh, ow), np.uint8) if want_cam else None
        run.crf_probs = np.zeros((channels, oh, ow), np.float16) if with_crf else None
        chunk_rows = 1
    # A tiled image with the CRF blends into float probabilities (quantized ones would make the CRF's unaries
    # -log(0) for any class under 0.2%: it could no longer move a boundary); refine_crf quantizes them.
    sink = RowSink(run.labels, run.crf_probs if with_crf else run.probs, run.cam, chunk_rows=chunk_rows)
    run.accumulator = BandAccumulator(*run.acc_shape, channels, sink, with_cam=want_cam,
                                      background_index=run.classes.background_index, repeat=run.block,
                                      out_shape=(oh, ow))


def run_tiles(run: PredictionRun, source: Any, runner: TileRunner, cancel: CancelToken | None = None,
              ) -> Generator[Progress, None, None]:
    """Stage 3, the device pipeline: tiles are read one batch ahead in a thread (decoding overlaps the model),
    strictly in order; the model runs on batches; blending runs in another thread, in order, so that the host
    work of one batch overlaps the model on the next; finished row bands are finalized as soon as no later tile
    can touch them. Yields Progress."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    runner.cancel = cancel

    acc, tiles, total, name = run.accumulator, run.tiles, run.total, run.name
    steps = run.steps
    th, tw = run.tile_shape
    background = run.classes.background_index
    yield Progress("predict", 0, steps, {"name": name, "tile": (th, tw), "tiles": total})

    # Work grid -> accumulation pixels of each tile row / column, shared by the tiles in it.
    out_row_taps = [linear_taps(py, 0, th, th) for _, _, py in run.row_spans]
    out_col_taps = [linear_taps(px, 0, tw, tw) for _, _, px in run.col_spans]
    model_tiles = [i for i, run_it in enumerate(run.runs_model) if run_it]
    last_model_tile = model_tiles[-1] if model_tiles else -1

    def add(index: int, result: TileResult | None) -> None:
        r, c = tiles[index]
        y_a, y_b, _ = run.row_spans[r]
        x_a, x_b, _ = run.col_spans[c]
        if y_b <= y_a or x_b <= x_a:
            return
        weight = run.row_weights[r][:, None] * run.col_weights[c][None, :]
        if result is None:
            acc.add_constant(y_a, x_a, background, weight)
        else:
            acc.add(y_a, x_a, result.probs, weight, result.cam)

    def read_job(index: int) -> TileJob:
        r, c = tiles[index]
        block, in_rows, in_cols = _read_footprint(run.level, run.geom, run.ys[r], run.xs[c], th, tw)
        return TileJob(index, block, in_rows, in_cols, out_row_taps[r], out_col_taps[c])

    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsss-cram-read")
    blender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsss-cram-blend")
    futures: dict[int, Any] = {}
    blending: deque = deque()
    next_to_schedule = 0
    finalized_to = 0

    def schedule(upto: int) -> None:
        nonlocal next_to_schedule
        while next_to_schedule < min(upto, len(model_tiles)):
            index = model_tiles[next_to_schedule]
            futures[index] = reader.submit(read_job, index)
            next_to_schedule += 1

    def blend(fn: Any, *fn_args: Any) -> None:
        blending.append(blender.submit(fn, *fn_args))
        while len(blending) > 8:  # bounded queue; surfaces errors of the blending thread
            blending.popleft().result()

    def add_batch(jobs: list[TileJob], results: list[TileResult]) -> None:
        for job, result in zip(jobs, results, strict=True):
            add(job.index, result)

    try:
        pending: list[TileJob] = []
        position = 0  # how many model tiles were taken so far
        for index in range(total):
            if cancel is not None:
                cancel.raise_if_cancelled()
            if not run.runs_model[index]:
                blend(add, index, None)
                run.skipped += 1
                run.done += 1
                if run.skipped % 64 == 0:
                    yield Progress("predict", run.done, steps, {"name": name, "skipped": run.skipped,
                                                                "batch": runner.batch})
            else:
                schedule(position + 2 * max(1, runner.batch))
                t0 = time.perf_counter()
                pending.append(futures.pop(index).result())
                run.read_seconds += time.perf_counter() - t0
                position += 1
            if pending and (len(pending) >= runner.batch or index == last_model_tile):
                blend(add_batch, pending, runner(pending))
                run.done += len(pending)
                pending = []
                yield Progress("predict", run.done, steps, {"name": name, "skipped": run.skipped,
                                                            "batch": runner.batch})
            # Rows above the first row that a tile not yet added can touch are final.
            first_open = pending[0].index if pending else index + 1
            if first_open < total and run.row_spans[tiles[first_open][0]][0] > finalized_to:
                finalized_to = run.row_spans[tiles[first_open][0]][0]
                blend(acc.advance, finalized_to)
        while blending:
            blending.popleft().result()
        if cancel is not None:
            cancel.raise_if_cancelled()
        acc.finish()
    except BaseException:
        for future in blending:
            future.cancel()
        blender.shutdown(wait=True)
        raise
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        blender.shutdown(wait=True)


def refine_crf(run: PredictionRun, source: Any, runner: TileRunner, cancel: CancelToken | None = None,
               ) -> Generator[Progress, None, None]:
    """Stage 3b (tiled images with the CRF): the dense CRF on the *assembled* probability map, window by window.

    Why not on each tile: the CRF propagates a decision over its whole bilateral range (80 model pixels), and a
    tile's CRF knows only that tile, so two neighbours often settle an ambiguous region differently; their
    near one-hot results then meet in a straight line in the middle of the overlap (class boundaries along
    tile borders: 279 class changes across one border column of a 640x640 field where the median column has
    8). On the assembled map every window sees the same blended unaries, and each keeps only its core with
    :func:`crf_margin` of context around it, so windows agree where they meet. The kernels are the same
    physical size (distances divided by work pixels per output pixel); the tissue mask still decides background.
    """
    import torch

    settings, classes = run.settings, run.classes
    params = scaled_crf_params(settings.crf_params, run.geom.work_per_out)
    oy0, ox0 = run.region[:2]
    k = classes.num_classes
    tissue_rules = runner.tissue_threshold is not None
    use_torch = resolve_backend(params, runner.device) == "torch"
    crf_fn = dense_crf_isolated if settings.crf_isolated else dense_crf
    for cy0, cy1, cx0, cx1, wy0, wy1, wx0, wx1 in run.crf_windows:
        if cancel is not None:
            cancel.raise_if_cancelled()
        t0 = time.perf_counter()
        rgb = np.ascontiguousarray(source.read_region(oy0 + wy0, ox0 + wx0, wy1 - wy0, wx1 - wx0,
                                                      run.placement.level)[..., :3], dtype=np.uint8)
        p = np.asarray(run.crf_probs[:, wy0:wy1, wx0:wx1]).astype(np.float32)
        total = p.sum(axis=0, keepdims=True)
        p = np.where(total > 0, p / np.maximum(total, 1e-8), 1.0 / p.shape[0]).astype(np.float32)
        if use_torch:
            with torch.inference_mode():
                q = dense_crf_torch(torch.from_numpy(rgb)[None].to(runner.device),
                                    torch.from_numpy(p)[None].to(runner.device), params,
                                    cancel=cancel)[0].cpu().numpy()
        else:
            q = crf_fn(rgb, p, params, cancel=cancel)
        if tissue_rules:  # as on tiles: the CRF may spread background over pale tissue; the mask decides
            white = p[k] >= 0.5
            tissue = q[:k]
            tsum = tissue.sum(axis=0, keepdims=True)
            tissue = np.where(tsum > 1e-8, tissue / np.maximum(tsum, 1e-8), 1.0 / max(1, k))
            q = np.concatenate([tissue * ~white, white[None].astype(np.float32)], axis=0)
        sy, sx = slice(cy0 - wy0, cy1 - wy0), slice(cx0 - wx0, cx1 - wx0)
        core = q[:, sy, sx]
        run.labels[cy0:cy1, cx0:cx1] = core.argmax(axis=0).astype(np.uint8)
        if run.probs is not None:
            run.probs[:, cy0:cy1, cx0:cx1] = quantize(core)
        run.crf_seconds += time.perf_counter() - t0
        run.done += 1
        yield Progress("predict", run.done, run.steps, {"name": run.name, "stage": "crf"})
    counts = np.zeros(classes.num_outputs, np.int64)
    rows = max(1, (1 << 20) // max(1, run.region[3]))
    for y in range(0, run.region[2], rows):
        counts += np.bincount(np.asarray(run.labels[y:y + rows]).ravel(),
                              minlength=classes.num_outputs)[: classes.num_outputs]
    run.class_pixels = counts
    run.crf_probs = None
    if run.store_dir is not None:
        shutil.rmtree(run.store_dir / "crf_probs.zarr", ignore_errors=True)


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
    from .pseudo_labels import reliable_pseudo_labels

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
