"""Tiling geometry, exact resampling, blending weights, tissue mask and the streaming band accumulator.

Helpers of :mod:`napari_wsss_cram.core.inference` (the engine); nothing here knows about models.

Three pixel grids are involved, all with pixel centres at integer indices:

* the *read* grid: pixels of the pyramid level the image is read from (downsample ``d_read`` vs level 0);
* the *work* grid: what the model sees, ``f`` work pixels per read pixel (``f = 2.5`` for the paper's test
  protocol, or ``level mpp / model mpp`` when targeting the model's µm/px);
* the *output* grid: pixels of the requested output level (downsample ``d_out``).

Every mapping between them is an exact affine map of absolute coordinates (see :class:`Geometry`), and tiles
are resampled with absolute coordinates too, so the values at a pixel do not depend on where tile borders
fall: tiled and whole-image predictions differ only by what the model sees near tile edges, and that is
weighted down by the blending window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .tissue import GRAY_WEIGHTS

#: Smallest weight of the blending window: pixels seen only by the edge of one tile (image borders) still count.
WINDOW_FLOOR = 1e-3


# --------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """Affine maps between the read, work and output grids (all coordinates absolute, per axis identical).

    ``d_read``/``d_out``: downsample of the read/output level vs level 0; ``f``: work pixels per read pixel.
    """

    d_read: float
    d_out: float
    f: float

    @property
    def work_per_out(self) -> float:
        """k: work pixels per output pixel."""
        return self.d_out * self.f / self.d_read

    def work_to_read(self, u: np.ndarray | float) -> np.ndarray | float:
        """Continuous read-grid coordinate of work pixel ``u``."""
        return (np.asarray(u, dtype=np.float64) + 0.5) / self.f - 0.5

    def block_centres_in_work(self, origin: int, n: int, block: int) -> np.ndarray:
        """Work-grid coordinates of the centres of ``n`` blocks of ``block`` output pixels from ``origin``.

        With ``block == 1`` these are output pixel centres; larger blocks form the coarser accumulation grid
        used when the work grid is coarser than the output grid.
        """
        return (origin + np.arange(n, dtype=np.float64) * block + block / 2.0) * self.work_per_out - 0.5


def tile_starts(lo: int, hi: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """Start positions and size of tiles covering work pixels ``[lo, hi)`` with context padding.

    Every tile extends half an overlap beyond ``[lo, hi)`` (context padding: no real pixel sits on a tile
    edge, whether the image is split or not). An extent that fits in one padded tile gets a single tile just
    large enough (a multiple of 8), so that a small patch is predicted whole. Otherwise tiles of ``tile``
    pixels are spaced evenly, sharing at least ``overlap`` pixels.
    """
    pad = overlap // 2
    extent = hi - lo + 2 * pad
    if extent <= tile:
        size = max(8, int(math.ceil(extent / 8.0)) * 8)
        return [lo - pad - (size - extent) // 2], size
    first, last = lo - pad, hi + pad - tile
    stride = max(1, tile - overlap)
    n = max(1, int(math.ceil((last - first) / stride)) + 1)
    return [int(round(first + i * (last - first) / (n - 1))) for i in range(n)], tile


def window_1d(positions: np.ndarray, size: int, ramp: float) -> np.ndarray:
    """Blending weight at continuous positions ``positions`` (0..size-1) of a tile: a linear ramp of
    ``ramp`` pixels up from each edge, 1 inside, never below :data:`WINDOW_FLOOR`."""
    pos = np.asarray(positions, dtype=np.float64)
    if ramp <= 0:
        return np.ones_like(pos, dtype=np.float32)
    dist = np.minimum(pos + 0.5, size - 0.5 - pos)
    return np.clip(dist / ramp, WINDOW_FLOOR, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------- resampling
def linear_taps(coords: np.ndarray, origin: int, length: int, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights for linear interpolation at absolute ``coords`` of a buffer that holds absolute
    pixels ``[origin, origin + length)``; coordinates are clamped to ``[0, limit - 1]`` (edge replication)."""
    c = np.clip(np.asarray(coords, dtype=np.float64), 0.0, limit - 1.0)
    i0 = np.floor(c).astype(np.int64)
    t = (c - i0).astype(np.float32)
    i1 = np.minimum(i0 + 1, limit - 1)
    i0 = np.clip(i0 - origin, 0, length - 1)
    i1 = np.clip(i1 - origin, 0, length - 1)
    return i0, i1, t


# --------------------------------------------------------------------------------------------- tissue mask
def tissue_thumbnail(read_block: Callable[[int, int, int, int], np.ndarray], height: int, width: int,
                     factor: int, threshold: int, block: int = 2048) -> np.ndarray:
    """Low-resolution tissue mask of an image of ``height x width`` pixels, read block by block.

    A thumbnail pixel covers ``factor x factor`` image pixels and is tissue when any of them is darker than
    ``threshold`` in gray level (H&E background is near-white glass or air). The minimum (not the mean) keeps
    small tissue fragments. Memory stays bounded by one block.
    """
    factor = max(1, int(factor))
    block = max(factor, (block // factor) * factor)
    th, tw = -(-height // factor), -(-width // factor)
    mask = np.zeros((th, tw), dtype=bool)
    for y in range(0, height, block):
        for x in range(0, width, block):
            h, w = min(block, height - y), min(block, width - x)
            rgb = read_block(y, x, h, w)
            gray = rgb[..., :3].astype(np.float32) @ np.array(GRAY_WEIGHTS, np.float32)
            ph, pw = -(-h // factor) * factor, -(-w // factor) * factor
            if (ph, pw) != (h, w):
                gray = np.pad(gray, ((0, ph - h), (0, pw - w)), mode="edge")
            low = gray.reshape(ph // factor, factor, pw // factor, factor).min(axis=(1, 3))
            mask[y // factor: y // factor + low.shape[0], x // factor: x // factor + low.shape[1]] = low < threshold
    return mask


# --------------------------------------------------------------------------------------------- accumulation
class RowSink:
    """Destination of finalized output rows: in-memory arrays or chunked disk-backed zarr arrays.

    ``labels`` (H, W) uint8; ``probs``/``cam`` (C, H, W) uint8 (probability x 255; ``probs`` may be a float
    array, then unquantized) or None. Rows arrive in
    order; for zarr they are buffered until whole chunk rows can be written (no read-modify-write).
    """

    def __init__(self, labels, probs=None, cam=None, chunk_rows: int = 1) -> None:
        self.labels, self.probs, self.cam = labels, probs, cam
        self.chunk_rows = max(1, int(chunk_rows))
        self._pending: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = []
        self._pending_rows = 0
        self._next_row = 0

    def write(self, y0: int, labels: np.ndarray, probs: np.ndarray | None, cam: np.ndarray | None) -> None:
        if y0 != self._next_row + self._pending_rows:
            raise RuntimeError(f"rows must arrive in order (expected {self._next_row + self._pending_rows}, got {y0})")
        self._pending.append((labels, probs, cam))
        self._pending_rows += labels.shape[0]
        if self._pending_rows >= self.chunk_rows:
            self._flush(whole_chunks_only=True)

    def close(self) -> None:
        self._flush(whole_chunks_only=False)

    def _flush(self, whole_chunks_only: bool) -> None:
        if not self._pending:
            return
        labels = np.concatenate([p[0] for p in self._pending], axis=0)
        probs = np.concatenate([p[1] for p in self._pending], axis=1) if self.probs is not None else None
        cam = np.concatenate([p[2] for p in self._pending], axis=1) if self.cam is not None else None
        n = labels.shape[0]
        if whole_chunks_only and self.chunk_rows > 1:
            n = (n // self.chunk_rows) * self.chunk_rows
        y0 = self._next_row
        if n:
            self.labels[y0:y0 + n] = labels[:n]
            if probs is not None:
                self.probs[:, y0:y0 + n] = probs[:, :n]
            if cam is not None:
                self.cam[:, y0:y0 + n] = cam[:, :n]
        rest = labels.shape[0] - n
        self._pending = [] if rest == 0 else [(labels[n:], None if probs is None else probs[:, n:],
                                               None if cam is None else cam[:, n:])]
        self._pending_rows = rest
        self._next_row = y0 + n


class BandAccumulator:
    """Weighted blend of overlapping tile predictions over a moving band of output rows.

    Tiles arrive row of tiles by row of tiles (top to bottom). Only the rows still reachable by a future tile
    are held in memory (``(C, band, W)`` float32): :meth:`advance` finalizes everything above a row (divide
    by the summed weights, arg-max, quantize) and hands it to the :class:`RowSink`. Memory is therefore
    bounded by the tile height times the output width, whatever the image height.
    """

    def __init__(self, height: int, width: int, channels: int, sink: RowSink, with_cam: bool,
                 background_index: int, repeat: int = 1, out_shape: tuple[int, int] | None = None) -> None:
        self.height, self.width, self.channels = height, width, channels
        # Each accumulated pixel becomes a repeat x repeat block of output pixels, cropped to out_shape.
        self.repeat = max(1, int(repeat))
        self.out_shape = out_shape or (height * self.repeat, width * self.repeat)
        self.sink, self.with_cam, self.background_index = sink, with_cam, background_index
        self.y0 = 0                       # first row held
        self.acc = np.zeros((channels, 0, width), np.float32)
        self.cam = np.zeros((channels, 0, width), np.float32) if with_cam else None
        self.wsum = np.zeros((0, width), np.float32)
        self.class_pixels = np.zeros(channels, np.int64)

    def _ensure_rows(self, y1: int) -> None:
        """Grow the band so that it holds rows ``[y0, y1)``."""
        have = self.y0 + self.wsum.shape[0]
        if y1 <= have:
            return
        extra = y1 - have
        self.acc = np.concatenate([self.acc, np.zeros((self.channels, extra, self.width), np.float32)], axis=1)
        self.wsum = np.concatenate([self.wsum, np.zeros((extra, self.width), np.float32)], axis=0)
        if self.cam is not None:
            self.cam = np.concatenate([self.cam, np.zeros((self.channels, extra, self.width), np.float32)],
                                      axis=1)

    def add(self, y0: int, x0: int, probs: np.ndarray, weight: np.ndarray, cam: np.ndarray | None = None) -> None:
        """Add ``weight * probs`` (C, h, w) at output rows/cols starting at (y0, x0)."""
        h, w = weight.shape
        if y0 < self.y0:
            raise RuntimeError("tile above the finalized rows (tiles must come top to bottom)")
        self._ensure_rows(y0 + h)
        r = y0 - self.y0
        self.acc[:, r:r + h, x0:x0 + w] += probs * weight
        self.wsum[r:r + h, x0:x0 + w] += weight
        if self.cam is not None and cam is not None:
            self.cam[:, r:r + h, x0:x0 + w] += cam * weight

    def add_constant(self, y0: int, x0: int, channel: int, weight: np.ndarray) -> None:
        """Add a one-hot prediction of ``channel`` (a skipped background tile) with ``weight``."""
        h, w = weight.shape
        self._ensure_rows(y0 + h)
        r = y0 - self.y0
        self.acc[channel, r:r + h, x0:x0 + w] += weight
        self.wsum[r:r + h, x0:x0 + w] += weight
        if self.cam is not None:
            self.cam[channel, r:r + h, x0:x0 + w] += weight

    def advance(self, y_final: int) -> None:
        """Finalize and emit all rows above ``y_final`` (no later tile may touch them)."""
        y_final = min(max(y_final, self.y0), self.height)
        n = y_final - self.y0
        if n <= 0:
            return
        self._ensure_rows(y_final)
        wsum = self.wsum[:n]
        untouched = wsum <= 0
        norm = 1.0 / np.maximum(wsum, 1e-12)
        probs = self.acc[:, :n] * norm
        if untouched.any():  # never predicted (cannot happen with a complete tiling): call it background
            probs[:, untouched] = 0.0
            probs[self.background_index, untouched] = 1.0
        labels = probs.argmax(axis=0).astype(np.uint8)
        probs_u8 = None
        if self.sink.probs is not None:  # a float sink keeps the probabilities unquantized (for a later CRF)
            kind = np.dtype(self.sink.probs.dtype)
            probs_u8 = probs.astype(kind) if kind.kind == "f" else quantize(probs)
        cam_u8 = None
        if self.cam is not None and self.sink.cam is not None:
            cam_u8 = quantize(self.cam[:, :n] * norm)
        m = self.repeat
        if m == 1:
            self._count(labels)
            self.sink.write(self.y0, labels, probs_u8, cam_u8)
        else:
            # Expand each accumulated pixel to m x m output pixels, a few hundred output rows at a time.
            out_h, out_w = self.out_shape
            step = max(1, 256 // m)
            for i in range(0, n, step):
                j = min(n, i + step)
                first = (self.y0 + i) * m
                rows = min((self.y0 + j) * m, out_h) - first
                if rows <= 0:
                    break

                def expand(a: np.ndarray | None, i: int = i, j: int = j, rows: int = rows) -> np.ndarray | None:
                    if a is None:
                        return None
                    a = np.repeat(a[..., i:j, :], m, axis=-2)[..., :rows, :]
                    return np.repeat(a, m, axis=-1)[..., :out_w]

                block = expand(labels)
                self._count(block)
                self.sink.write(first, block, expand(probs_u8), expand(cam_u8))
        self.acc = self.acc[:, n:].copy()
        self.wsum = self.wsum[n:].copy()
        if self.cam is not None:
            self.cam = self.cam[:, n:].copy()
        self.y0 = y_final

    def _count(self, labels: np.ndarray) -> None:
        # bincount converts to intp (8 bytes per pixel): count a few rows at a time on wide images.
        step = max(1, (1 << 20) // max(1, labels.shape[1]))
        for y in range(0, labels.shape[0], step):
            self.class_pixels += np.bincount(labels[y:y + step].ravel(), minlength=self.channels)[: self.channels]

    def finish(self) -> None:
        self.advance(self.height)
        self.sink.close()


def quantize(values: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 (x 255, rounded)."""
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- seams
def seam_profile(labels: np.ndarray, borders_y: list[float], borders_x: list[float], width: int = 3,
                 ) -> dict[str, dict[str, float]]:
    """Class changes per column and per row of a label map, near tile borders vs elsewhere.

    ``columns``: for each column boundary x|x+1, the number of rows whose class changes there (a class boundary
    running straight down a tile border piles up in one column); ``rows`` likewise. ``borders_y``/``borders_x``:
    the tile borders (centres of the overlaps) in label pixels; "near" is within ``width`` pixels. Each profile
    gives ``border_max``, ``other_max``, ``median`` (all columns) and ``ratio`` = border_max / median.
    """
    lab = np.asarray(labels)
    out: dict[str, dict[str, float]] = {}
    for name, axis, borders in (("columns", 1, borders_x), ("rows", 0, borders_y)):
        changes = (np.diff(lab.astype(np.int16), axis=axis) != 0).sum(axis=1 - axis)
        near = np.zeros(changes.shape[0], bool)
        for b in borders:
            near[max(0, int(math.floor(b)) - width): max(0, int(math.floor(b)) + width + 1)] = True
        median = float(np.median(changes)) if changes.size else 0.0
        border_max = float(changes[near].max()) if near.any() else 0.0
        out[name] = {"border_max": border_max, "other_max": float(changes[~near].max()) if (~near).any() else 0.0,
                     "median": median, "ratio": border_max / max(median, 1.0)}
    return out
