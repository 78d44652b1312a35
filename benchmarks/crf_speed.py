"""Dense-CRF speed and agreement: pydensecrf (the reference) vs the torch backend, same parameters and iterations.

For each crop size, a crop of a real WSSS4LUAD image (resized to the size) with realistic probabilities (a
smoothed, noisy one-hot of its true mask), or a synthetic patch when ``../shared`` is absent. Prints ms per crop
(min and median of ``--repeats``, the backends interleaved), the torch backend for a batch of 4 crops, and
the share of pixels whose arg-max agrees with pydensecrf's. ``--alternatives`` also times the option the torch
backend did not take: the bilateral message computed exactly (``losses.dense_gaussian_filter``) on a grid
downsampled to 64x64, upsampled bilinearly.

Usage (from the repository root)::

    PYTHONPATH=src nice -n 10 .venv/bin/python benchmarks/crf_speed.py --sizes 256,512 --alternatives
    PYTHONPATH=src python3 benchmarks/crf_speed.py --sizes 256,513 --device cuda --batch 8   # GPU check

With ``--device cuda`` the torch backend runs there (timed with synchronisation; a batch of ``--batch`` crops,
the paper preset's training batch) and its determinism on that device is checked (two runs, bitwise).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_wsss_cram.core.crf import CRFParams, dense_crf, dense_crf_torch
from napari_wsss_cram.core.losses import dense_gaussian_filter

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wsss4luad" / "2.validation"


def realistic_probs(mask: np.ndarray, classes: int, seed: int = 0) -> np.ndarray:
    """(C, H, W) softmax of a blurred, noisy one-hot of ``mask``: wrong near boundaries, unsure in places."""
    rng = np.random.default_rng(seed)
    onehot = np.eye(classes, dtype=np.float32)[mask].transpose(2, 0, 1)
    logits = torch.from_numpy(3.0 * onehot + rng.normal(0, 2.0, onehot.shape).astype(np.float32))[None]
    logits = F.avg_pool2d(logits, 9, stride=1, padding=4, count_include_pad=False)
    return logits[0].softmax(0).numpy()


def load_case(size: int, name: str = "06") -> tuple[np.ndarray, np.ndarray, str]:
    """(image uint8 (size, size, 3), probs (C, size, size), description)."""
    from PIL import Image

    img_path, mask_path = SHARED / "img" / f"{name}.png", SHARED / "mask" / f"{name}.png"
    if img_path.is_file() and mask_path.is_file():
        image = np.asarray(Image.open(img_path).convert("RGB").resize((size, size), Image.BILINEAR))
        mask = np.asarray(Image.open(mask_path).resize((size, size), Image.NEAREST)).astype(np.int64)
        return np.ascontiguousarray(image), realistic_probs(mask, 4), f"WSSS4LUAD validation {name}.png"
    from napari_wsss_cram.core.sample import make_patch

    rgb, mask = make_patch(0, size, (0, 1))
    return (np.ascontiguousarray(rgb[..., :3]), realistic_probs(np.asarray(mask, np.int64) % 3, 3),
            "synthetic patch")


def downsampled_exact_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams, grid: int = 64) -> np.ndarray:
    """The alternative not taken: the same mean field with the bilateral message computed exactly on a
    ``grid`` x ``grid`` downsampled image (symmetric normalisation, self included as in densecrf's lattice),
    upsampled bilinearly; the Gaussian kernel exactly at full size (it is narrow)."""
    c, h, w = probs.shape
    factor = max(h, w) / grid
    img = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    small = F.interpolate(img, size=(grid, grid), mode="area")
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32) * factor,
                            torch.arange(grid, dtype=torch.float32) * factor, indexing="ij")
    feats = torch.cat([torch.stack([xs, ys]).reshape(2, -1) / params.bilateral_sxy,
                       small.reshape(3, -1) / params.bilateral_srgb]).t()[None].contiguous()
    cell = factor * factor  # each grid point stands for this many pixels
    norm_small = (cell * dense_gaussian_filter(torch.ones(1, grid * grid, 1), feats)).rsqrt()
    radius = int(3 * params.gaussian_sxy)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / params.gaussian_sxy) ** 2)

    def gaussian(v: torch.Tensor) -> torch.Tensor:  # separable, (C, H, W)
        v = F.conv2d(v[:, None], taps.view(1, 1, 1, -1), padding=(0, radius))
        return F.conv2d(v, taps.view(1, 1, -1, 1), padding=(radius, 0))[:, 0]

    ones = torch.ones(1, h, w)
    norm_g = gaussian(ones).rsqrt()
    unary = -torch.from_numpy(probs).clamp(1e-8, 1).log()
    q = (-unary).softmax(0)
    for _ in range(params.iterations):
        qs = F.interpolate(q[None], size=(grid, grid), mode="area")[0].reshape(c, -1).t()[None]
        msg = cell * dense_gaussian_filter(qs * norm_small, feats) * norm_small
        msg = F.interpolate(msg[0].t().reshape(1, c, grid, grid), size=(h, w), mode="bilinear",
                            align_corners=False)[0]
        smooth = gaussian(q * norm_g) * norm_g
        q = (-unary + params.gaussian_compat * smooth + params.bilateral_compat * msg).softmax(0)
    return q.numpy()


def synced(fn, *args):
    """``fn(*args)``, waiting for the GPU (so that a timing is the work's, not its launch's)."""
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def timed(repeats: int, fn, *args) -> list[float]:
    """Wall-clock ms of ``fn(*args)``, ``repeats`` times."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        out.append(1000 * (time.perf_counter() - t0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pydensecrf is single-threaded)")
    parser.add_argument("--image", default="06", help="WSSS4LUAD validation image stem")
    parser.add_argument("--alternatives", action="store_true", help="also time the downsampled exact filter")
    parser.add_argument("--device", default="cpu", help="where the torch backend runs (cpu, cuda)")
    parser.add_argument("--batch", type=int, default=4, help="crops in the torch backend's batch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = CRFParams()
    print(f"torch {torch.__version__}, {args.threads} thread(s); CRF {params}")
    print("| crop | pydensecrf ms (min/median) | torch ms (min/median) | torch batched ms per crop | agreement |"
          + (" downsampled-exact ms | its agreement |" if args.alternatives else ""))
    print("|---|---|---|---|---|" + ("---|---|" if args.alternatives else ""))
    for size in (int(s) for s in args.sizes.split(",")):
        image, probs, what = load_case(size, args.image)
        ref_params = CRFParams(backend="pydensecrf")
        torch_params = CRFParams(backend="torch")
        ref = dense_crf(image, probs, ref_params)
        out = dense_crf(image, probs, torch_params)  # warm-up (and the position-kernel cache)
        agree = float((ref.argmax(0) == out.argmax(0)).mean())
        t_ref, t_torch = [], []
        for _ in range(args.repeats):  # interleaved: both see the same background load
            t_ref += timed(1, dense_crf, image, probs, ref_params)
            t_torch += timed(1, dense_crf, image, probs, torch_params)
        images = torch.from_numpy(image.copy())[None].repeat(args.batch, 1, 1, 1).to(args.device)
        batch_probs = torch.from_numpy(probs)[None].repeat(args.batch, 1, 1, 1).to(args.device)
        first = synced(dense_crf_torch, images, batch_probs, torch_params)
        t_batch = timed(max(1, args.repeats // 2), synced, dense_crf_torch, images, batch_probs, torch_params)
        same = torch.equal(first, synced(dense_crf_torch, images, batch_probs, torch_params))
        on_device = float((first[0].argmax(0).cpu().numpy() == ref.argmax(0)).mean())
        row = (f"| {size}² | {min(t_ref):.0f} / {statistics.median(t_ref):.0f} | {min(t_torch):.0f} / "
               f"{statistics.median(t_torch):.0f} | {min(t_batch) / args.batch:.0f} ({args.device}, batch "
               f"{args.batch}; agreement {100 * on_device:.2f}%, deterministic {same}) | {100 * agree:.2f}% |")
        if args.alternatives:
            alt = downsampled_exact_crf(image, probs, params)
            t_alt = timed(max(1, args.repeats // 2), downsampled_exact_crf, image, probs, params)
            row += f" {min(t_alt):.0f} | {100 * float((ref.argmax(0) == alt.argmax(0)).mean()):.2f}% |"
        print(row + f"  ({what})", flush=True)


if __name__ == "__main__":
    main()
