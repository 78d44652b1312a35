"""Stage 1 and 2 of the engine: where tiles are read from, the tile plan (``PredictionRun``), the output arrays."""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..classes import WSSS4LUAD, ClassSpec
from ..errors import ImageReadError, WsssCramError
from ..placement import Placement
from ..tiling import (
    BandAccumulator,
    Geometry,
    RowSink,
    linear_taps,
    tile_starts,
    tissue_thumbnail,
    window_1d,
)
from .refine import _crf_windows, crf_margin
from .settings import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_SCALE,
    MIN_SCALE,
    MIN_SIDE,
    STORE_OWNER,
    STORE_PREFIX,
    THUMBNAIL_SIDE,
    PredictSettings,
    remove_stale_stores,
)

Taps = tuple[np.ndarray, np.ndarray, np.ndarray]


# ================================================================================ model side
def _model_meta(model: Any, info: Any) -> tuple[ClassSpec, tuple, tuple, float | None]:
    """Classes, normalisation mean/std and training µm/px from the checkpoint info or the model."""
    classes = getattr(info, "classes", None) or getattr(model, "classes", None) or WSSS4LUAD
    config = getattr(info, "model_config", None) or getattr(model, "config", None)
    mean = tuple(getattr(config, "mean", IMAGENET_MEAN))
    std = tuple(getattr(config, "std", IMAGENET_STD))
    return classes, mean, std, getattr(config, "mpp", None)



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


