"""Peak memory of `wsss-cram predict` on synthetic slides of growing size (target: flat, < 2 GiB).

For each size, makes the sample slide with the project's streaming generator (``core.sample.make_slide``,
pyramidal OME-TIFF at 0.25 µm/px; skipped when it already exists), then runs the real command under
``/usr/bin/time -v`` with a random-init resnet18 checkpoint and reads "Maximum resident set size".
Outputs are written at level 0 (full resolution): label OME-TIFF and GeoJSON, streamed through disk-backed
arrays above 64 MP. The model reads the pyramid level closest to ``--mpp`` (default 4 µm/px, so that a 32k
slide is a few minutes on a CPU; memory does not depend on it: the band held in memory is one tile high).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/predict_memory.py --sizes 4096,16384,32768 --dir /tmp/wsss-mem

Needs GNU time (`apt-get install -y time`). Generating the 32k slide takes tens of minutes of CPU.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_slide(folder: Path, size: int) -> Path:
    path = folder / f"slide{size}.ome.tif"
    if not path.exists():
        from napari_wsss_cram.core.sample import make_slide

        start = time.perf_counter()
        make_slide(path, size=size)
        print(f"generated {path.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def ensure_checkpoint(folder: Path, backbone: str) -> Path:
    path = folder / f"random-{backbone}.pt"
    if not path.exists():
        import torch

        from napari_wsss_cram.core.checkpoint import save_checkpoint
        from napari_wsss_cram.core.classes import WSSS4LUAD
        from napari_wsss_cram.core.model.config import ModelConfig
        from napari_wsss_cram.core.model.cram import CRAMNet

        torch.manual_seed(0)
        save_checkpoint(path, CRAMNet(WSSS4LUAD, ModelConfig(backbone=backbone), weights=None))
    return path


def timed_predict(checkpoint: Path, slide: Path, out: Path, extra: list[str]) -> dict:
    time_bin = shutil.which("time") or "/usr/bin/time"
    if not Path(time_bin).exists():
        sys.exit("GNU time is missing: apt-get install -y time")
    cmd = [time_bin, "-v", sys.executable, "-m", "napari_wsss_cram.cli", "predict", str(checkpoint), str(slide),
           "--out", str(out), "--overwrite", "--device", "cpu", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"predict failed on {slide.name}:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    seconds = sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall.split(":"))))
    with open(out / "predict_summary.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    return {**row, "rss_mib": rss_kb / 1024, "wall_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,16384,32768")
    parser.add_argument("--dir", default="/tmp/wsss-mem", help="where slides and outputs go (needs ~3 GB)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--mpp", default="4.0", help="processing µm/px (default 4.0)")
    parser.add_argument("--format", default="ome-tiff,geojson")
    parser.add_argument("--batch", default="1",
                        help="tiles per batch (default 1: the model's activations then cost the same for every "
                             "size, and the table shows the engine's own growth; batch 4 adds ~300 MiB)")
    args = parser.parse_args()

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = ensure_checkpoint(folder, args.backbone)
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    print(f"Peak RSS of `wsss-cram predict` ({args.backbone}, random init, --mpp {args.mpp}, --batch {args.batch}, "
          f"outputs at level 0: {args.format}; OMP_NUM_THREADS={threads})")
    print(f"{'slide':>12} {'MP':>7} {'tiles':>6} {'skipped':>7} {'seconds':>8} {'peak RSS MiB':>12}")
    for size in (int(s) for s in args.sizes.split(",")):
        slide = ensure_slide(folder, size)
        res = timed_predict(checkpoint, slide, folder / f"out{size}", ["--mpp", args.mpp, "--format", args.format,
                                                                      "--batch", args.batch])
        print(f"{size:>6}x{size:<5} {size * size / 1e6:>7.0f} {res['tiles']:>6} {res['skipped_tiles']:>7} "
              f"{res['wall_s']:>8.0f} {res['rss_mib']:>12.0f}", flush=True)


if __name__ == "__main__":
    main()
