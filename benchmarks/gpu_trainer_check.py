"""GPU check of the trainer, as one short script (the lead's GPU slot):

    PYTHONPATH=src python3 benchmarks/gpu_trainer_check.py [--sample-steps 300]

1. the sample preset on sample_data/ (CUDA + AMP, DataLoader workers, CRF pool, validation on CUDA): val mIoU
   per validation and wall time — what the bundled demo model gets;
2. the paper setting (resnet50, 513 crop, batch 8): step time, CRF share, CRF pool vs in-process, peak memory;
3. out-of-memory: an oversized run must end with the OutOfMemoryError that says what to lower;
4. `wsss-cram evaluate --crf` of the model from 1 on CUDA.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sample-steps", type=int, default=300)
    parser.add_argument("--paper-steps", type=int, default=8)
    args = parser.parse_args()

    import torch

    from napari_wsss_cram.cli import main as cli
    from napari_wsss_cram.core.errors import OutOfMemoryError
    from napari_wsss_cram.core.train import load_config, train

    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}", flush=True)
    tmp = Path(tempfile.mkdtemp())
    sample = ROOT / "sample_data"

    # 1. sample preset, full length, on CUDA
    t0 = time.perf_counter()

    def show(event):
        if event.phase == "val":
            print(f"  sample preset step {event.done}: val mIoU {event.info['mIoU']:.4f} "
                  f"{ {k: round(v, 3) if v is not None else None for k, v in event.info['per_class'].items()} } "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        elif event.phase == "train" and event.done % 100 == 0:
            print(f"  step {event.done}: {event.info['losses']} crf wait {event.info['crf_wait_seconds']:.1f} s",
                  flush=True)

    config = load_config("sample", data=str(sample / "patches"), val=str(sample / "validation"),
                         out=str(tmp / "sample"), steps=args.sample_steps, device="cuda", workers=4,
                         crf_workers=4, threads=4)
    best = train(config, callback=show)
    print(f"1. sample preset: {args.sample_steps} steps in {time.perf_counter() - t0:.0f} s -> {best}", flush=True)

    # 2. paper setting step time (synthetic patches), CRF in-process vs a pool of 4
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--config", "wsss4luad",
                    "--steps", str(args.paper_steps), "--device", "cuda", "--crf-workers", "0,4"], check=False)

    # 3. out of memory
    try:
        big = load_config("wsss4luad", data=str(sample / "patches"), out=str(tmp / "oom"), steps=2,
                          device="cuda", batch_size=96, crop=1025, backbone="resnet101", workers=2,
                          crf_workers=0, weights="none")
        big.model["use_crf"] = False
        train(big)
        print("3. OOM check: no out-of-memory happened (the GPU is larger than assumed)")
    except OutOfMemoryError as err:
        print(f"3. OOM check OK: {err}")
    torch.cuda.empty_cache()

    # 4. evaluate with CRF on CUDA
    rc = cli(["evaluate", str(best), str(sample / "validation"), "--crf", "--device", "cuda",
              "--json", str(tmp / "eval.json")])
    print(f"4. evaluate --crf rc={rc}: {(tmp / 'eval.json').read_text()[:300] if rc == 0 else ''}")


if __name__ == "__main__":
    main()
