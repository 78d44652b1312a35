"""The one dense-CRF entry point, used for pseudo-labels in training and label refinement at inference.

Defaults follow DSRG (Huang et al. 2018): a Gaussian (smoothness) kernel sxy=3 compat=3 and a bilateral
(appearance) kernel sxy=80 srgb=13 compat=10, run for 10 mean-field iterations.

Two backends compute the same model (Krähenbühl & Koltun 2011, as pydensecrf's ``DenseCRF2D`` sets it up):
unary -log p, Q0 = softmax(-unary), then ``iterations`` times Q = softmax(-unary + sum_k w_k K_k Q) with Potts
compatibility w_k and each kernel K_k a Gaussian over features (x/sxy, y/sxy[, r/srgb, g/srgb, b/srgb]),
filtered on a permutohedral lattice (Adams et al. 2010) and symmetrically normalised
(diag(1/sqrt(K 1)) K diag(1/sqrt(K 1))):

- ``"pydensecrf"``: the C++ reference (CPU, holds the GIL, one image at a time);
- ``"torch"``: a port of the same lattice to torch (:func:`dense_crf_torch`), batched, on the device of its
  inputs, float32, no gradient. Why the lattice and not an exact dense filter on a downsampled grid or a
  ConvCRF window: the lattice is the approximation pydensecrf itself makes, so the labels agree with the
  reference (100.00% of pixels, max |dQ| < 1e-5 on WSSS4LUAD images), and it is O(N) with sxy=80 (a window
  that wide is a dense filter), while the exact filter on a 64x64 grid (``losses.dense_gaussian_filter``,
  O(N^2)) was slower and agreed on 76-82% only: it moves boundaries by the downsampling step (see
  benchmarks/crf_speed.py). The energy loss keeps that exact filter: its value and gradient are defined by it;
  a lattice there would change the loss, not just its speed;
- ``"auto"`` (default): ``"torch"`` where the work is on a CUDA device, ``"pydensecrf"`` on the CPU (``"torch"``
  if pydensecrf is not installed). Why, measured (benchmarks/crf_speed.py, 1 thread, same parameters and 10
  iterations): on the CPU pydensecrf is 1.2-1.4x faster per core (565 vs 741 ms per 512², 119 vs 151 ms per
  256²) and torch threads contend badly on a shared machine; on a GPU the torch backend is batched, runs in
  the training step on the model's device and needs no process pool. Where the GIL matters (the Segment dock)
  pydensecrf runs in a helper process (:func:`dense_crf_isolated`).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from .device import tensor_of
from .errors import DependencyError, WsssCramError
from .fields import setting
from .helper_process import HelperSlot, start_helper_pool
from .progress import CancelToken

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch is imported lazily: the CLI's help and the pydensecrf path do not need it
    import torch

INSTALL_HINT = "pip install pydensecrf2"


class CRFSettingsError(WsssCramError, ValueError):
    """CRF settings that cannot run on the given image (a ValueError too, as before)."""
BACKENDS = ("auto", "torch", "pydensecrf")


@dataclass
class CRFParams:
    """Dense-CRF settings (DSRG defaults). Distances in pixels of the image given to :func:`dense_crf`;
    ``backend``: "auto" (torch on CUDA, pydensecrf on the CPU), "torch" or "pydensecrf" (the C++ reference)."""

    gaussian_sxy: float = setting(3.0, "Smoothness kernel width (px): larger = smoother, blob-like regions",
                                  step=1.0, dock=True)
    gaussian_compat: float = setting(3.0, "Weight of the smoothness kernel", step=1.0, dock=True)
    bilateral_sxy: float = setting(80.0, "Appearance kernel width (px): how far similar colours pull a pixel's "
                                   "label", step=1.0, dock=True)
    bilateral_srgb: float = setting(13.0, "Appearance kernel colour tolerance: smaller = boundaries follow finer "
                                    "colour changes", step=1.0, dock=True)
    bilateral_compat: float = setting(10.0, "Weight of the appearance kernel", step=1.0, dock=True)
    iterations: int = setting(10, "Mean-field iterations of the CRF (10 is plenty)", label="CRF iterations",
                              dock=True)
    backend: str = setting("auto", "auto = torch on CUDA, pydensecrf on the CPU; torch; or pydensecrf (the C++ "
                           "reference)", choices=BACKENDS)

    def __post_init__(self) -> None:
        from .validate import check_fields

        if self.backend not in BACKENDS:
            raise ValueError(f"CRF backend must be one of {', '.join(BACKENDS)}, got '{self.backend}'.")
        # 0 or NaN widths crashed pydensecrf (SIGSEGV); negative iterations silently skipped the CRF
        check_fields(self, ["gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb",
                            "bilateral_compat", "iterations"])

    def to_dict(self) -> dict:
        """The settings as a plain dict (for checkpoints, presets and worker processes)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> CRFParams:
        """Settings from a dict; unknown keys are ignored, missing ones take the defaults."""
        data = dict(data or {})
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def resolve_backend(params: CRFParams | None, device: object = None) -> str:
    """The backend that runs for work on ``device`` (None = the CPU): "torch" or "pydensecrf".

    "auto" is torch on CUDA and pydensecrf elsewhere, torch where pydensecrf is not installed (module notes).
    """
    backend = (params or CRFParams()).backend
    if backend != "auto":
        return backend
    if str(device or "cpu").split(":")[0] == "cuda":
        return "torch"
    import importlib.util

    return "pydensecrf" if importlib.util.find_spec("pydensecrf") is not None else "torch"


def _densecrf_module():
    """Import pydensecrf lazily so that a missing install fails with a hint, not an obscure ImportError."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as err:  # pragma: no cover - exercised only where pydensecrf is absent
        raise DependencyError(
            f"The dense CRF needs the 'pydensecrf' module, which could not be imported ({err}). "
            f"Install it with: {INSTALL_HINT}   (or choose the torch CRF backend, or turn the CRF off)."
        ) from err
    return dcrf


def _check_inputs(image: np.ndarray, probs: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense_crf needs a uint8 RGB image of shape (H, W, 3), got {image.dtype} {image.shape}.")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"dense_crf needs probabilities of shape (C, H, W) = (C, {image.shape[0]}, "
                         f"{image.shape[1]}), got {probs.shape}.")
    if probs.shape[0] < 2:
        raise ValueError("dense_crf needs at least two classes.")
    if not np.all(np.isfinite(probs)) or probs.min() < -1e-6:
        raise ValueError("dense_crf probabilities must be finite and non-negative.")
    sums = probs.sum(axis=0)
    if np.abs(sums - 1.0).max() > 1e-3:
        raise ValueError(f"dense_crf probabilities must sum to 1 over classes at each pixel "
                         f"(found sums between {sums.min():.4f} and {sums.max():.4f}).")


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams | None = None,
              cancel: CancelToken | None = None) -> np.ndarray:
    """Refine per-pixel class probabilities with a fully connected CRF (the backend of ``params``).

    ``image``: uint8 RGB (H, W, 3). ``probs``: float (C, H, W), summing to 1 over C at each pixel.
    Returns float32 (C, H, W) probabilities after mean-field inference. ``cancel`` is checked between
    iterations (both backends run them one at a time, so SIGTERM's handler and Cancel act within one).
    """
    params = params or CRFParams()
    image = np.asarray(image)
    probs = np.asarray(probs)
    _check_inputs(image, probs)
    if resolve_backend(params) == "torch":
        import torch

        refined = dense_crf_torch(torch.from_numpy(np.require(image, np.uint8, ["C", "W"]))[None],
                                  tensor_of(probs, np.float32)[None], params,
                                  cancel=cancel)
        return refined[0].numpy()
    return _dense_crf_pydensecrf(image, probs, params, cancel)


_HELPER = HelperSlot()  # the process that runs pydensecrf for dense_crf_isolated (started on first use, then kept)
#: why the helper could not start (then every call runs in-process); None while it works or is untried
HELPER_FAILURE: str | None = None
#: seconds the helper may take to start (spawn + imports) before the work falls back to this process
HELPER_START_TIMEOUT = 60.0


def _start_helper():
    """The helper pool, started and proven (a no-op answered) within HELPER_START_TIMEOUT; raises on failure."""
    return start_helper_pool(HELPER_START_TIMEOUT)


def _helper_failure_reason(err: BaseException) -> str:
    """Why the helper did not start, in words: spawn re-imports the main script, which fails when it is not a
    file (python fed on standard input, some notebook and embedding hosts)."""
    import os
    import sys

    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.isfile(main_file):
        return f"the main script '{main_file}' is not a file a new process can import"
    if isinstance(err, TimeoutError) or type(err).__name__ == "TimeoutError":
        return f"it did not answer within {HELPER_START_TIMEOUT:g} s"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def dense_crf_isolated(image: np.ndarray, probs: np.ndarray, params: CRFParams | None = None,
                       cancel: CancelToken | None = None) -> np.ndarray:
    """:func:`dense_crf`, with the pydensecrf backend run in a helper process.

    Why: pydensecrf holds the GIL for a whole image (0.5-0.7 s for 512², measured as napari event-loop
    stalls), so a GUI's worker thread calling it freezes the GUI; waiting on a process releases the GIL. The
    torch backend releases the GIL itself and runs here. The helper is spawned (forking a process that runs Qt
    and torch threads is unsafe) once, on first use, and lives until this process exits. When it cannot start
    (a script fed to python on standard input: spawn cannot re-import it; a sandbox without processes) the
    reason is logged as a warning (the docks show it) and the CRF runs in this process. ``cancel`` is checked
    while waiting; a cancelled CRF's helper is killed (it is restarted on next use).
    """
    global HELPER_FAILURE
    params = params or CRFParams()
    if resolve_backend(params) != "pydensecrf":
        return dense_crf(image, probs, params, cancel)
    image, probs = np.asarray(image), np.asarray(probs)
    _check_inputs(image, probs)  # errors are raised here, in the caller's words, not in the helper
    with _HELPER.lock:
        if _HELPER.pool is None and HELPER_FAILURE is None:
            try:
                _HELPER.pool = _start_helper()
            except Exception as err:  # noqa: BLE001 - any failure to start means: run in-process
                HELPER_FAILURE = _helper_failure_reason(err)
                log.warning("The CRF helper process could not start (%s); the CRF runs in this process instead "
                            "(the window may respond slowly while it runs).", HELPER_FAILURE)
        helper = _HELPER.pool
    if helper is None:
        return dense_crf(image, probs, params, cancel)
    from concurrent.futures import TimeoutError as FutureTimeout
    from concurrent.futures.process import BrokenProcessPool

    try:
        future = helper.submit(_dense_crf_pydensecrf, np.ascontiguousarray(image), np.ascontiguousarray(probs),
                               params)
        while True:
            try:
                return future.result(timeout=0.1)
            except FutureTimeout:
                if cancel is not None and cancel.cancelled:
                    _HELPER.drop(helper)
                    cancel.raise_if_cancelled()
    except BrokenProcessPool as err:  # the helper died: report, and run this one here
        _HELPER.drop(helper)
        log.warning("The CRF helper process stopped (%s); the CRF runs in this process instead.", err)
        return dense_crf(image, probs, params, cancel)
    except BaseException:  # KeyboardInterrupt (SIGTERM in the CLI): do not leave the helper computing
        _HELPER.drop(helper)
        raise


def _dense_crf_pydensecrf(image: np.ndarray, probs: np.ndarray, params: CRFParams,
                          cancel: CancelToken | None = None) -> np.ndarray:
    dcrf = _densecrf_module()
    n_labels, height, width = probs.shape
    # pydensecrf reads the image buffer directly: it must be C-contiguous uint8, and writable (its typed
    # memoryview refuses read-only buffers, e.g. np.asarray of a PIL image).
    image = np.require(image, dtype=np.uint8, requirements=["C", "W"])
    unary = -np.log(np.clip(probs, 1e-8, 1.0)).reshape(n_labels, -1).astype(np.float32)
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=image,
                             compat=params.bilateral_compat)
    # one iteration at a time (same result as crf.inference(n), measured): between two, Python runs SIGTERM's
    # handler and the cancel token is read, so a long CRF stops within one iteration (~60 ms per 512²)
    q, tmp1, tmp2 = crf.startInference()
    for _ in range(int(params.iterations)):
        if cancel is not None:
            cancel.raise_if_cancelled()
        crf.stepInference(q, tmp1, tmp2)
    return np.asarray(q, dtype=np.float32).reshape(n_labels, height, width)


# ------------------------------------------------------------------------------------ torch backend

class PermutohedralLattice:
    """Gaussian filtering out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j, approximately, on a permutohedral lattice:
    a port of densecrf's ``Permutohedral`` (same elevation, rounding, blur order and constant alpha).

    ``features`` (B, N, D) float32; the images of a batch share one lattice, the batch index being part of each
    vertex's key, so no value crosses images. Splat, the d+1 blur passes and slice are sparse CSR matrices
    built once per batch and kernel. Why CSR: a CSR product is a row-wise gather (deterministic, no atomics)
    and measured 5x faster on the CPU than ``index_put_`` and indexing (5 + 3 ms vs 24 + 25 ms, 512² image).
    """

    def __init__(self, features: torch.Tensor) -> None:
        import torch

        b, n, d = features.shape
        dev = features.device
        self.points = points = b * n
        f = features.reshape(points, d).float()
        # elevate onto the hyperplane sum(x) = 0 of R^{d+1}, scaled so that the blur below approximates a
        # Gaussian of standard deviation 1 in feature space (densecrf's constants)
        inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
        scale = torch.tensor([inv_std / math.sqrt((i + 2) * (i + 1)) for i in range(d)], dtype=torch.float32,
                             device=dev)
        cf = f * scale
        tail = cf.flip(1).cumsum(1).flip(1)                                # tail[:, i] = sum_{k >= i} cf_k
        after = torch.cat([tail[:, 1:], torch.zeros_like(tail[:, :1])], 1)
        steps = torch.arange(1, d + 1, device=dev, dtype=torch.float32)
        elevated = torch.cat([tail[:, :1], after - steps * cf], 1)         # (P, d+1)
        # nearest remainder-0 point; C's round() rounds halves away from zero
        down = elevated / (d + 1)
        rounded = torch.sign(down) * torch.floor(down.abs() + 0.5)
        rem0 = rounded * (d + 1)
        total = rounded.sum(1, keepdim=True).long()
        # rank of each coordinate's residual: its place in a stable descending sort, which is densecrf's
        # pairwise rule (ties rank the earlier coordinate first)
        order = (elevated - rem0).sort(dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(d + 1, device=dev).expand(points, d + 1))
        rank = rank + total
        low, high = rank < 0, rank > d
        rank = torch.where(low, rank + d + 1, torch.where(high, rank - d - 1, rank))
        rem0 = torch.where(low, rem0 + d + 1, torch.where(high, rem0 - d - 1, rem0))
        # barycentric weights of the d+1 vertices of the enclosing simplex
        v = (elevated - rem0) / (d + 1)
        bary = torch.zeros(points, d + 2, dtype=torch.float32, device=dev)
        bary.scatter_add_(1, d - rank, v)
        bary.scatter_add_(1, d - rank + 1, -v)
        bary[:, 0] += 1.0 + bary[:, d + 1]
        weights = bary[:, : d + 1]                                         # (P, d+1)
        # vertex r's key (first d coordinates; the last is implied) is rem0 + r, minus d+1 where
        # rank > d - r; encoded with the batch index as one int64 in mixed radix, with room for the
        # blur's +-(d+1) neighbours. Why the sums below: they never materialise the (P, d+1, d) keys.
        rem0_i = rem0[:, :d].long()
        lo = rem0_i.amin(0) - 2 * (d + 1)
        radix = rem0_i.amax(0) - lo + 1 + 2 * (d + 1)
        strides = torch.ones(d, dtype=torch.long, device=dev)
        for i in range(d - 2, -1, -1):
            strides[i] = strides[i + 1] * radix[i + 1]
        span = int(strides[0]) * int(radix[0])
        if span * b >= 2 ** 62:
            raise CRFSettingsError("The CRF's kernels are too narrow for this image (its lattice would overflow); "
                                   "raise the CRF's sxy/srgb or lower the resolution.")
        batch = torch.arange(b, device=dev).repeat_interleave(n)
        base = ((rem0_i - lo) * strides).sum(1) + batch * span             # (P,)
        by_rank = torch.zeros(points, d + 2, dtype=torch.long, device=dev)
        by_rank.scatter_add_(1, rank[:, :d], strides.expand(points, d))
        above = by_rank.flip(1).cumsum(1).flip(1)                          # above[:, t] = sum_{rank_k >= t} stride_k
        r = torch.arange(d + 1, device=dev)
        all_ones = int(strides.sum())
        codes = (base[:, None] + r * all_ones - (d + 1) * above[:, d - r + 1]).reshape(-1)
        # one stable sort gives the distinct vertices, each entry's vertex and the splat's row order
        sorted_codes, entry_order = codes.sort(stable=True)
        new = torch.ones_like(sorted_codes, dtype=torch.bool)
        new[1:] = sorted_codes[1:] != sorted_codes[:-1]
        uniq = sorted_codes[new]
        m = self.vertices = uniq.numel()
        vertex = torch.empty_like(entry_order)
        vertex[entry_order] = new.long().cumsum(0) - 1
        self.blur = [self._blur_matrix(uniq, -all_ones + ((d + 1) * int(strides[j]) if j < d else 0))
                     for j in range(d + 1)]
        self.alpha = 1.0 / (1.0 + 2.0 ** (-d))
        self._slice_crow = torch.arange(0, points * (d + 1) + 1, d + 1, device=dev)
        self._slice_cols = vertex
        self._slice_vals = weights.reshape(-1)
        counts = torch.bincount(vertex, minlength=m)
        self._splat_crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self._splat_order = entry_order
        self._splat_cols = entry_order // (d + 1)
        self.set_scale(None)

    @staticmethod
    def _blur_matrix(uniq: torch.Tensor, delta: int) -> torch.Tensor:
        """(M, M) CSR: v_i + (v_{i-} + v_{i+}) / 2 over the vertices whose code is ``code_i -+ delta``.
        Missing neighbours contribute nothing. Codes are sorted, so a row's columns are too."""
        import torch

        m = uniq.numel()
        rows = torch.arange(m, device=uniq.device)
        found = []
        for target in (uniq - abs(delta), uniq + abs(delta)):
            pos = torch.searchsorted(uniq, target).clamp_(max=m - 1)
            found.append((pos, uniq[pos] == target))
        (low, has_low), (high, has_high) = found
        cols = torch.stack([low, rows, high], 1)
        keep = torch.stack([has_low, torch.ones_like(has_low), has_high], 1)
        vals = torch.tensor([0.5, 1.0, 0.5], device=uniq.device).expand(m, 3)
        crow = torch.cat([rows.new_zeros(1), keep.sum(1).cumsum(0)])
        return _csr(crow, cols[keep], vals[keep], (m, m))

    def set_scale(self, scale: torch.Tensor | None) -> None:
        """Fold a per-point factor s (P,) into splat and slice, so that :meth:`filter` computes s * K(s * v)."""
        d1 = self._slice_vals.numel() // self.points
        vals = self._slice_vals * self.alpha
        splat_vals = self._slice_vals[self._splat_order]
        if scale is not None:
            vals = (vals.view(self.points, d1) * scale[:, None]).reshape(-1)
            splat_vals = splat_vals * scale[self._splat_cols]
        self.slice = _csr(self._slice_crow, self._slice_cols, vals, (self.points, self.vertices))
        self.splat = _csr(self._splat_crow, self._splat_cols, splat_vals, (self.vertices, self.points))

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """(P, C) values -> (P, C) Gaussian-filtered values: splat, blur along the d+1 directions, slice."""
        grid = self.splat @ values
        for blur in self.blur:
            grid = blur @ grid
        return self.slice @ grid


def _csr(crow: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix, without torch's one-time "CSR support is in beta" warning (it works: see the tests)."""
    import warnings

    import torch

    # int32 indices: torch's CPU product converts int64 ones on every call (measured 30% of its time)
    index_type = torch.int32 if max(cols.numel(), *size) < 2 ** 31 else torch.int64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow.to(index_type), cols.to(index_type), vals, size=size,
                                       check_invariants=False)


class _NormalisedKernel:
    """densecrf's ``DenseKernel`` with NORMALIZE_SYMMETRIC: K_norm v = n * K(n * v), n = 1/sqrt(K 1)."""

    def __init__(self, features: torch.Tensor) -> None:
        self.lattice = PermutohedralLattice(features)
        ones = features.new_ones(self.lattice.points, 1)
        self.lattice.set_scale((self.lattice.filter(ones)[:, 0] + 1e-20).rsqrt())

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """(P, C) -> (P, C) normalised Gaussian message."""
        return self.lattice.filter(values)


_POSITION_KERNELS: OrderedDict = OrderedDict()  # (h, w, sxy, device) -> _NormalisedKernel, a small LRU cache
_POSITION_LOCK = threading.Lock()


def _position_kernel(h: int, w: int, sxy: float, device: torch.device) -> _NormalisedKernel:
    """The Gaussian (position-only) kernel of one h x w image. Why cached: it depends on the size alone, and
    training crops and inference tiles repeat a few sizes (building it costs ~10 filter passes)."""
    import torch

    key = (h, w, float(sxy), str(device))
    with _POSITION_LOCK:
        kernel = _POSITION_KERNELS.get(key)
        if kernel is not None:
            _POSITION_KERNELS.move_to_end(key)
            return kernel
    kernel = _NormalisedKernel(_features(torch.zeros(1, h, w, 3, device=device), sxy, None))
    with _POSITION_LOCK:
        _POSITION_KERNELS[key] = kernel
        while len(_POSITION_KERNELS) > 4:
            _POSITION_KERNELS.popitem(last=False)
    return kernel


def _features(images: torch.Tensor, sxy: float, srgb: float | None) -> torch.Tensor:
    """(B, H, W, 3) -> (B, H*W, D) features in pydensecrf's order: x/sxy, y/sxy[, r/srgb, g/srgb, b/srgb]."""
    import torch

    b, h, w, _ = images.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=images.device, dtype=torch.float32),
                            torch.arange(w, device=images.device, dtype=torch.float32), indexing="ij")
    parts = [torch.stack([xs, ys], -1).reshape(1, h * w, 2).expand(b, -1, -1) / float(sxy)]
    if srgb is not None:
        parts.append(images.reshape(b, h * w, 3).float() / float(srgb))
    return torch.cat(parts, -1)


def dense_crf_torch(images: torch.Tensor, probs: torch.Tensor, params: CRFParams | None = None,
                    cancel: CancelToken | None = None) -> torch.Tensor:
    """The dense CRF's mean-field inference in torch, for a batch, on the device of ``probs``.

    ``images``: RGB (B, H, W, 3), uint8 or float in 0..255 (float colours are rounded, as a uint8 image would
    be); ``probs``: (B, C, H, W) class probabilities (renormalised over C here). Returns float32 (B, C, H, W).
    Same model and lattice as pydensecrf (module notes); deterministic for a device; no gradient.
    """
    import torch

    params = params or CRFParams()
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"dense_crf_torch needs RGB images (B, H, W, 3), got {tuple(images.shape)}.")
    if probs.ndim != 4 or probs.shape[0] != images.shape[0] or probs.shape[-2:] != images.shape[1:3]:
        raise ValueError(f"dense_crf_torch needs probabilities (B, C, H, W) = ({images.shape[0]}, C, "
                         f"{images.shape[1]}, {images.shape[2]}), got {tuple(probs.shape)}.")
    with torch.no_grad(), torch.autocast(device_type=probs.device.type, enabled=False):
        b, c, h, w = probs.shape
        n = h * w
        images = images.to(probs.device)
        if images.is_floating_point():
            images = images.round().clamp(0, 255)
        p = probs.float().clamp(0.0, None).reshape(b, c, n)
        p = p / p.sum(1, keepdim=True).clamp_min(1e-8)
        # (B, C, N) layout: the softmax over a few classes is 20x faster across rows than along them
        unary = -p.clamp(1e-8, 1.0).log()
        position = _position_kernel(h, w, params.gaussian_sxy, probs.device)
        # one lattice per image: a batch-wide lattice (batch index in the key) built 3x slower per image on the
        # CPU (measured, 4 x 512²), and the messages cost the same either way
        bilateral = [_NormalisedKernel(_features(images[i:i + 1], params.bilateral_sxy, params.bilateral_srgb))
                     for i in range(b)]
        q = (-unary).softmax(1)
        for _ in range(int(params.iterations)):
            if cancel is not None:  # between iterations: Cancel (and SIGTERM's handler) act within one
                cancel.raise_if_cancelled()
            # the position kernel is one image's: the batch rides along as extra columns
            smooth = position.apply(q.permute(2, 0, 1).reshape(n, b * c)).view(n, b, c).permute(1, 2, 0)
            appearance = torch.stack([kernel.apply(q[i].t()).t() for i, kernel in enumerate(bilateral)])
            q = (float(params.gaussian_compat) * smooth + float(params.bilateral_compat) * appearance
                 - unary).softmax(1)
        return q.reshape(b, c, h, w)
