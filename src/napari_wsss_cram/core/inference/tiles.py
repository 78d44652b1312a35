"""Stage 3, the device pipeline: the ``TileRunner`` (model on batches of tiles) and ``run_tiles``."""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..crf import dense_crf, dense_crf_isolated, dense_crf_torch, resolve_backend
from ..device import tensor_of
from ..errors import OutOfMemoryError
from ..progress import CancelToken, Progress
from ..tiling import (
    linear_taps,
)
from ..tissue import near_white_mask, restrict_to_tissue
from .plan import PredictionRun, Taps, _read_footprint
from .settings import BATCH_PER_DEVICE, PredictSettings

log = logging.getLogger(__name__)



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
        self.batch = settings.batch or BATCH_PER_DEVICE.get(device.type, BATCH_PER_DEVICE["cuda"])
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
        converted = tuple(tensor_of(a).to(self.device, non_blocking=True) for a in taps)
        if cache:
            if len(self._taps_cache) > 4096:
                self._taps_cache.clear()
            self._taps_cache[key] = (taps, converted)
        return converted

    def _work_tile(self, job: TileJob) -> Any:
        """uint8 read-grid footprint -> float (H, W, 3) work tile, quantized like a uint8 image."""
        block = tensor_of(job.block)
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


