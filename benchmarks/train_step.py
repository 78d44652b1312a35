"""Time training steps of a preset and how much of a step the CRF pseudo-labelling takes.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_step.py --config cpu-small --steps 8
    python benchmarks/train_step.py --config wsss4luad --steps 20 --device cuda      # GPU check
    python benchmarks/train_step.py --config wsss4luad --steps 20 --device cuda --crf-backend torch,pydensecrf \
        --crf-workers 0,8                                   # issue 9: the CRF's share of a step, both backends

Runs on synthetic patches (150-300 px, WSSS4LUAD naming) made in a temp folder, so it needs no data.
For each --crf-backend and --crf-workers value (the torch backend ignores the workers: it runs in the step)
it prints the mean step time (first step excluded) and the main process's wait for pseudo-labels, in seconds
and as a share of the step.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = np.array([(90, 40, 140), (230, 140, 190), (200, 120, 60), (250, 250, 250)], np.float32)


def synthetic_patches(folder: Path, n: int = 48, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = int(rng.integers(150, 301))
        yy, xx = np.mgrid[:size, :size]
        mask = np.full((size, size), 3, np.uint8)
        present = rng.permutation(3)[: int(rng.integers(1, 4))]
        for c in present:
            cy, cx = rng.integers(0, size, 2)
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 < int(rng.integers(size // 3, size // 2)) ** 2] = c
        flags = [int((mask == c).any()) for c in range(3)]
        if not any(flags):
            flags[int(present[0])] = 1
        rgb = np.clip(COLORS[mask] + rng.normal(0, 10, mask.shape + (3,)), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"{i}-[{', '.join(map(str, flags))}].png")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu-small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--crf-workers", default="0,1", help="comma-separated values to compare")
    parser.add_argument("--no-crf", action="store_true", help="model.use_crf = false (no pydensecrf needed)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--crf-backend", default="auto", help="comma-separated CRF backends to compare")
    args = parser.parse_args()

    import torch

    from napari_wsss_cram.core.train import load_config, train

    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_patches(Path(tmp) / "patches")
        runs = [(backend, int(w)) for backend in args.crf_backend.split(",") for w in args.crf_workers.split(",")
                if backend != "torch" or w == args.crf_workers.split(",")[0]]
        for backend, workers in runs:
            config = load_config(args.config, data=str(data), out=str(Path(tmp) / f"run{backend}{workers}"),
                                 steps=args.steps, crf_workers=workers, device=args.device, workers=2,
                                 checkpoint_every=10 ** 6, batch_size=args.batch_size, weights="none")
            if args.no_crf:
                config.model["use_crf"] = False
            config.model["crf"] = {**config.model.get("crf", {}), "backend": backend}
            times, waits = [], []

            def on_event(event, times=times, waits=waits):
                if event.phase == "train":
                    times.append(event.info["step_seconds"])
                    waits.append(event.info["crf_wait_seconds"])

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            train(config, callback=on_event)
            wall = time.perf_counter() - t0
            step = float(np.mean(times[1:])) if len(times) > 1 else float("nan")
            crf = (waits[-1] - waits[0]) / max(1, len(waits) - 1)
            mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else ""
            print(f"{args.config} backbone={config.model.get('backbone', 'resnet50')} crop={config.crop} "
                  f"batch={config.batch_size} crf={'off' if args.no_crf else backend} crf_workers={workers} "
                  f"threads={torch.get_num_threads()}: step {step:.3f} s, CRF wait {crf:.3f} s/step "
                  f"({100 * crf / step:.0f}% of a step), {args.steps} steps in {wall:.1f} s wall{mem}", flush=True)


if __name__ == "__main__":
    main()
