"""Stage 3b: the dense CRF on the assembled probability map of a tiled image, window by window."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np

from ..crf import CRFParams, dense_crf, dense_crf_isolated, dense_crf_torch, resolve_backend
from ..progress import CancelToken, Progress
from ..tiling import (
    quantize,
)
from ..validate import RANGES

if TYPE_CHECKING:
    from .plan import PredictionRun
    from .tiles import TileRunner


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


