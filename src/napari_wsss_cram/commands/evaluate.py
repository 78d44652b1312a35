"""Score a checkpoint on pixel-labelled images (img/ + mask/ [+ background-mask/]): one confusion matrix over
all images, IoU per tissue class, mIoU over tissue classes, background pixels left out (the challenge's rule).
Prints a table; --json writes {"mIoU", "per_class", "confusion", "classes"}.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a .pt file written by `wsss-cram train`")
    parser.add_argument("data", metavar="DATA_DIR", help="pixel-labelled folder with img/ and mask/")
    parser.add_argument("--scale", type=float,
                        help="rescale images by this factor before predicting (default: the checkpoint's mean "
                             "training rescale; 2.5 for the paper's setting)")
    parser.add_argument("--crf", action="store_true", help="refine predictions with the dense CRF")
    parser.add_argument("--json", metavar="OUT", help="write the scores as JSON")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--classes", help="class names 'a,b,c' (default: the checkpoint's)")


def default_scale(train_config: dict | None) -> float:
    """The mean training rescale recorded in a checkpoint (the paper's x2-x3 gives 2.5); 1.0 if unknown."""
    if train_config and "scale_min" in train_config and "scale_max" in train_config:
        return 0.5 * (float(train_config["scale_min"]) + float(train_config["scale_max"]))
    return 1.0


def run(args: argparse.Namespace) -> int:
    from ..core.checkpoint import load_checkpoint
    from ..core.classes import class_spec_from_names
    from ..core.data.pixel import discover_pixel_dataset
    from ..core.io.outputs import atomic_path
    from ..core.progress import drive
    from ..core.train import evaluate_model, resolve_device

    model, info = load_checkpoint(args.checkpoint,
                                  expect_classes=class_spec_from_names(args.classes) if args.classes else None)
    dataset = discover_pixel_dataset(args.data, info.classes)
    scale = args.scale if args.scale is not None else default_scale(info.train_config)
    device = resolve_device(args.device)
    model.to(device)
    print(f"evaluating {args.checkpoint} on {len(dataset)} images of {args.data} at scale {scale:g}"
          f"{' with CRF' if args.crf else ''}", file=sys.stderr)
    cm = drive(evaluate_model(model, dataset, scale=scale, crf=args.crf, device=device))
    print(cm.table())
    if args.json:
        result = cm.to_dict()
        result.update({"checkpoint": str(args.checkpoint), "data": str(args.data), "scale": scale,
                       "crf": bool(args.crf), "images": len(dataset)})
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0
