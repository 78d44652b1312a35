"""Train WSSS-CRAM on image-level-labelled patches: the whole recipe by default (the joint model, its
pseudo-labels, then segmentation rounds; RUN_DIR/final.pt), or one stage alone: --stage 1 (the joint model) or
--stage 2 --pseudo DIR [--pixel-labels IMG_MASK_DIR] (a segmentation model on saved pseudo-labels).

Without --config the defaults are the paper's (resnet50, x2-x3 rescale + 513 crop, SGD lr 1e-3, batch 8);
presets (by name, or a .toml path): wsss4luad, cpu-small (2-core CPU, 60 min for the whole recipe), sample.
Flags override the preset. Ends by printing the path of the checkpoint to use (final.pt; with --stage, the
stage's best or last). Under `torchrun --nproc_per_node N` the same command trains with DDP.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..core.fields import help_of
    from ..core.pseudo_labels import PSEUDO_LABEL_REFINEMENTS
    from ..core.train_config import TrainConfig

    parser.add_argument("data", nargs="?", metavar="DATA_DIR",
                        help="patch folder (<id>-[t, s, n].png), CSV 'path,<classes>' or class sub-folders")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (config, metrics, checkpoints)")
    parser.add_argument("--val", metavar="IMG_MASK_DIR", help="pixel-labelled set for best-by-mIoU checkpoints")
    parser.add_argument("--config", metavar="FILE", help="training preset: a name (wsss4luad, cpu-small, sample: shipped in the package) or a .toml path")
    parser.add_argument("--backbone", help="resnet18 | resnet34 | resnet50 | resnet101")
    length = parser.add_mutually_exclusive_group()
    # the help of the flags the Train dock also shows is TrainConfig's field help (its tooltips say the same)
    length.add_argument("--epochs", type=int, help=help_of(TrainConfig, "epochs"))
    length.add_argument("--steps", type=int, help=help_of(TrainConfig, "steps"))
    parser.add_argument("--minutes", type=float, help=help_of(TrainConfig, "minutes"))
    parser.add_argument("--batch-size", type=int, help=help_of(TrainConfig, "batch_size"))
    parser.add_argument("--crop", type=int, help=help_of(TrainConfig, "crop"))
    parser.add_argument("--lr", type=float, help=help_of(TrainConfig, "lr"))
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
    parser.add_argument("--stage", type=int, choices=(1, 2),
                        help="train one stage alone: 1 = the joint model (image-level labels), 2 = a segmentation "
                             "model on --pseudo DIR (default: the whole recipe, ending in RUN_DIR/final.pt)")
    parser.add_argument("--rounds", type=int,
                        help="segmentation rounds of the recipe after the joint model (0-5; preset's default)")
    parser.add_argument("--pseudo-refine", choices=PSEUDO_LABEL_REFINEMENTS,
                        help="how the recipe refines each round's pseudo-labels: stain decides tumor against stroma "
                             "in patches labelled with both by their hematoxylin density (preset's default)")
    parser.add_argument("--init", metavar="CHECKPOINT|previous",
                        help="start from a trained model's network (a .pt or run folder of the same classes and "
                             "backbone): its backbone and segmentation head replace the initial weights; "
                             "'previous' (the recipe): each segmentation round starts from the model that made its "
                             "pseudo-labels; a stage run alone then starts from --weights (preset's default)")
    parser.add_argument("--stage2", action="store_true", help=argparse.SUPPRESS)  # the old spelling of --stage 2
    parser.add_argument("--pseudo", metavar="DIR", help="stage 2: folder from `wsss-cram pseudo-labels`")
    parser.add_argument("--pixel-labels", metavar="IMG_MASK_DIR", help="stage 2: extra pixel-labelled images")
    parser.add_argument("--pixel-weight", type=float, help="stage 2: loss weight of pixel-labelled samples")


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of a command line: the preset (or TrainConfig's defaults), then the flags given (a flag left
    out is None: the preset's value stands)."""
    from ..core.train import load_config
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
        resume=True if args.resume else None, stage2=True if args.stage2 or args.stage == 2 else None,
        rounds=args.rounds, pseudo_refine=args.pseudo_refine, amp=False if args.no_amp else None, init=args.init)
    if args.stage == 1 and config.stage2:
        config = config.updated(stage2=False)  # --stage 1 over a run whose config.toml says stage 2
    return config


def run(args: argparse.Namespace) -> int:
    from ..core.progress import drive
    from ..core.recipe import train_recipe_steps
    from ..core.run_files import is_single_stage_run
    from ..core.train import train

    config = config_from_args(args)
    if not config.stage2 and not config.data:
        raise SystemExit("wsss-cram train: DATA_DIR is required (or --stage 2 --pseudo DIR).")

    reporter = _Reporter()
    try:
        if args.stage is None and not config.stage2 and not (config.resume and is_single_stage_run(config.out)):
            path = drive(train_recipe_steps(config), reporter)
        else:
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
        self.recipe_stage = None

    def __call__(self, event) -> None:
        from tqdm import tqdm

        recipe = event.info.get("recipe")
        if recipe is not None and (recipe["index"], event.phase == "pseudo-labels") != self.recipe_stage:
            # a new stage of the recipe: a fresh bar under a heading
            self.close()
            self.recipe_stage = (recipe["index"], event.phase == "pseudo-labels")
            doing = "pseudo-labels for " if event.phase == "pseudo-labels" else ""
            print(f"== stage {recipe['index'] + 1}/{recipe['stages']}: {doing}{recipe['title']}", file=sys.stderr)
        if event.phase == "pseudo-labels":
            if self.bar is None:
                self.bar = tqdm(total=event.total, desc="pseudo-labels", unit="patch", dynamic_ncols=True,
                                file=sys.stderr)
            self.bar.update(event.done - self.bar.n)
        elif event.phase == "data":
            print(event.info.get("summary", ""), file=sys.stderr)
            minutes = event.info.get("minutes")
            length = f"{event.total} steps" if event.total < 10 ** 9 else "no step limit"
            if minutes:
                length += f", at most {minutes:g} minutes"
            print(f"device {event.info.get('device')}, {length} "
                  f"({event.info.get('steps_per_epoch')} per epoch)", file=sys.stderr)
            if event.info.get("weights"):
                print(f"starting from {event.info['weights']}", file=sys.stderr)
        elif event.phase == "train":
            if self.bar is None:
                self.bar = tqdm(total=event.total, initial=event.done - 1, desc="train", unit="step",
                                dynamic_ncols=True, file=sys.stderr)
            if self.bar.total != event.total:  # a time budget: the total is an estimate that settles
                self.bar.total = event.total
            self.bar.update(event.done - self.bar.n)
            losses = event.info.get("losses", {})
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()} | {"lr": f"{event.info['lr']:.2g}",
                                                                                   "ep": event.info.get("epoch")})
        elif event.phase == "val":
            per_class = ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}"
                                  for k, v in event.info.get("per_class", {}).items())
            msg = f"step {event.done}: val mIoU {event.info['mIoU']:.4f} ({per_class})"
            (self.bar.write if self.bar is not None else print)(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
