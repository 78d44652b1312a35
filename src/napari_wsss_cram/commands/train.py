"""Train WSSS-CRAM on image-level-labelled patches (stage 1), or the independent segmentation model on saved
pseudo-labels (stage 2: --stage2 --pseudo DIR [--pixel-labels IMG_MASK_DIR]).

Without --config the defaults are the paper's (resnet50, x2-x3 rescale + 513 crop, SGD lr 1e-3, batch 8);
presets (by name, or a .toml path): wsss4luad, cpu-small (2-core CPU, < 30 min), sample.
Flags override the preset. Ends by printing the path of the best (or last) checkpoint.
Under `torchrun --nproc_per_node N` the same command trains with DDP.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", metavar="DATA_DIR",
                        help="patch folder (<id>-[t, s, n].png), CSV 'path,<classes>' or class sub-folders")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (config, metrics, checkpoints)")
    parser.add_argument("--val", metavar="IMG_MASK_DIR", help="pixel-labelled set for best-by-mIoU checkpoints")
    parser.add_argument("--config", metavar="FILE", help="training preset: a name (wsss4luad, cpu-small, sample: shipped in the package) or a .toml path")
    parser.add_argument("--backbone", help="resnet18 | resnet34 | resnet50 | resnet101")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="number of epochs")
    length.add_argument("--steps", type=int, help="number of optimiser steps (overrides epochs)")
    parser.add_argument("--minutes", type=float,
                        help="wall-clock budget: training (and its learning-rate schedule) ends when it is spent; "
                             "with --steps or --epochs, whichever comes first")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--crop", type=int, help="training crop size in pixels")
    parser.add_argument("--lr", type=float, help="base learning rate")
    parser.add_argument("--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR exactly in schedule")
    parser.add_argument("--classes", help="class names 'a,b,c' (default: from the data)")
    parser.add_argument("--weights", metavar="auto|imagenet|none|PATH",
                        help="backbone start: auto (default: ImageNet if already in the torch hub cache, else "
                             "random; never downloads), imagenet (download torchvision's ImageNet weights into "
                             "the torch hub cache if needed), none (random), or a local .pth file")
    parser.add_argument("--workers", type=int, help="DataLoader worker processes")
    parser.add_argument("--crf-workers", type=int, help="processes making CRF pseudo-labels with the pydensecrf backend (0 = in-process; "
                             "the torch backend runs in the step)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    parser.add_argument("--stage2", action="store_true", help="train the independent segmentation model")
    parser.add_argument("--pseudo", metavar="DIR", help="stage 2: folder from `wsss-cram pseudo-labels`")
    parser.add_argument("--pixel-labels", metavar="IMG_MASK_DIR", help="stage 2: extra pixel-labelled images")
    parser.add_argument("--pixel-weight", type=float, help="stage 2: loss weight of pixel-labelled samples")


def run(args: argparse.Namespace) -> int:
    from ..core.train import load_config, train
    from ..core.train_config import TrainConfig

    config_file = args.config
    run_config = Path(args.out) / "config.toml"
    if args.resume and config_file is None and run_config.is_file():
        config_file = run_config  # --resume alone continues with the run's own settings
    base = load_config(config_file)
    data = base.to_dict()
    if args.epochs is not None:
        data["epochs"], data["steps"] = args.epochs, None
    config = TrainConfig.from_dict(data).updated(
        data=args.data, out=args.out, val=args.val, backbone=args.backbone, steps=args.steps, minutes=args.minutes,
        batch_size=args.batch_size, crop=args.crop, lr=args.lr, device=args.device, classes=args.classes,
        weights=args.weights, workers=args.workers, crf_workers=args.crf_workers, threads=args.threads,
        seed=args.seed, pseudo=args.pseudo, pixel_labels=args.pixel_labels, pixel_weight=args.pixel_weight,
        resume=True if args.resume else None, stage2=True if args.stage2 else None,
        amp=False if args.no_amp else None)
    if not config.stage2 and not config.data:
        raise SystemExit("wsss-cram train: DATA_DIR is required (or --stage2 --pseudo DIR).")

    reporter = _Reporter()
    try:
        path = train(config, callback=reporter)
    finally:
        reporter.close()
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks
        print(path)
    return 0


class _Reporter:
    """Prints the dataset summary, a tqdm bar for steps, and one line per validation."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, event) -> None:
        from tqdm import tqdm

        if event.stage == "data":
            print(event.info.get("summary", ""), file=sys.stderr)
            minutes = event.info.get("minutes")
            length = f"{event.total} steps" if event.total < 10 ** 9 else "no step limit"
            if minutes:
                length += f", at most {minutes:g} minutes"
            print(f"device {event.info.get('device')}, {length} "
                  f"({event.info.get('steps_per_epoch')} per epoch)", file=sys.stderr)
            if event.info.get("weights"):
                print(f"starting from {event.info['weights']}", file=sys.stderr)
        elif event.stage == "train":
            if self.bar is None:
                self.bar = tqdm(total=event.total, initial=event.done - 1, desc="train", unit="step",
                                dynamic_ncols=True, file=sys.stderr)
            if self.bar.total != event.total:  # a time budget: the total is an estimate that settles
                self.bar.total = event.total
            self.bar.update(event.done - self.bar.n)
            losses = event.info.get("losses", {})
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()} | {"lr": f"{event.info['lr']:.2g}",
                                                                                   "ep": event.info.get("epoch")})
        elif event.stage == "val":
            per_class = ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}"
                                  for k, v in event.info.get("per_class", {}).items())
            msg = f"step {event.done}: val mIoU {event.info['mIoU']:.4f} ({per_class})"
            (self.bar.write if self.bar is not None else print)(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
