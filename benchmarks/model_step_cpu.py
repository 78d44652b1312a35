"""CPU cost of a WSSS-CRAM training step at 224 px: forward+backward per batch for resnet18 and resnet50,
and the share of the step taken by the reliable pseudo-labels (dense CRF) and by the dense energy loss.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/model_step_cpu.py [--batch 8] [--size 224] [--repeats 2]

Prints one table; the figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch

from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.crf import CRFParams
from napari_wsss_cram.core.losses import joint_loss
from napari_wsss_cram.core.model import CRAMNet, ModelConfig, to_input_tensor
from napari_wsss_cram.core.pseudo_labels import batch_pseudo_labels


def synthetic_batch(batch: int, size: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Smooth random-colour images (so the CRF has edges to follow) and random image-level labels."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(60, 255, (batch, size // 16, size // 16, 3)).astype(np.uint8)
    images = coarse.repeat(16, axis=1).repeat(16, axis=2)
    labels = torch.from_numpy((rng.random((batch, 3)) < 0.6).astype(np.float32))
    return np.ascontiguousarray(images), labels


def time_step(backbone: str, batch: int, size: int, repeats: int) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-init warning: weights do not change the timing
        model = CRAMNet(WSSS4LUAD, ModelConfig(backbone=backbone), weights="auto")
    cfg = model.config
    images, labels = synthetic_batch(batch, size)
    x = to_input_tensor(images, cfg)
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    times: dict[str, list[float]] = {"fwd": [], "pseudo": [], "loss": [], "bwd": [], "step": []}
    for i in range(repeats + 1):  # the first round warms up allocators and kernels
        t0 = time.perf_counter()
        out = model(x)
        t1 = time.perf_counter()
        pseudo = batch_pseudo_labels(out["cam"], images, labels, cfg.alpha, cfg.beta, CRFParams(),
                                     cfg.tissue_threshold)
        t2 = time.perf_counter()
        loss, _ = joint_loss(out, labels, torch.from_numpy(pseudo).long(), x, cfg)
        t3 = time.perf_counter()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        t4 = time.perf_counter()
        if i:
            for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                times[key].append(value)
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backbones", default="resnet18,resnet50")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), batch {args.batch}, "
          f"{args.size} px, output stride 8, full joint model (DA + attention + CRF pseudo-labels + energy)")
    print(f"{'backbone':<10}{'fwd s':>8}{'bwd+opt s':>10}{'fwd+bwd s':>11}{'CRF s':>8}{'energy+ce s':>13}"
          f"{'step s':>8}{'CRF share':>11}")
    for backbone in args.backbones.split(","):
        t = time_step(backbone.strip(), args.batch, args.size, args.repeats)
        print(f"{backbone:<10}{t['fwd']:>8.2f}{t['bwd']:>10.2f}{t['fwd'] + t['bwd']:>11.2f}{t['pseudo']:>8.2f}"
              f"{t['loss']:>13.2f}{t['step']:>8.2f}{t['pseudo'] / t['step']:>10.0%}", flush=True)


if __name__ == "__main__":
    main()
