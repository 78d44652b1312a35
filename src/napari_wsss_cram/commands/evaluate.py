"""Score a checkpoint on pixel-labelled images (img/ + mask/ [+ background-mask/]): one confusion matrix over
all images, IoU per tissue class, mIoU over tissue classes, background pixels left out (the challenge's rule).
Prints a table; --json writes {"mIoU", "per_class", "confusion", "classes"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a .pt file written by `wsss-cram train`")
    parser.add_argument("data", metavar="DATA_DIR", help="pixel-labelled folder with img/ and mask/")
    parser.add_argument("--scale", type=float,
                        help="rescale images by this factor before predicting (default: the checkpoint's mean "
                             "training rescale, e.g. 2.5 for the paper's x2-x3 preset)")
    parser.add_argument("--crf", action="store_true", help="refine predictions with the dense CRF")
    parser.add_argument("--json", metavar="OUT", help="write the scores as JSON (an existing file needs --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--classes", help="class names 'a,b,c' (default: the checkpoint's)")


def run(args: argparse.Namespace) -> int:
    from ..core.checkpoint import Resolution, default_resolution, load_checkpoint
    from ..core.classes import class_spec_from_names
    from ..core.data.pixel import discover_pixel_dataset
    from ..core.device import resolve_device
    from ..core.evaluate import evaluate_model
    from ..core.io.atomic import atomic_path
    from ..core.io.guard import check_output_file, ensure_writable_folder
    from ..core.progress import drive

    if args.json:
        # before the evaluation, not after it: a folder, a read-only place or an existing file fails at once
        check_output_file(args.json, [args.checkpoint, args.data], args.overwrite, "--json")
        ensure_writable_folder(Path(args.json).resolve().parent, "folder of --json")
    model, info = load_checkpoint(args.checkpoint,
                                  expect_classes=class_spec_from_names(args.classes) if args.classes else None)
    dataset = discover_pixel_dataset(args.data, info.classes)
    # evaluation images are read without their µm/px, so the default is the training scale
    resolution = Resolution(scale=args.scale, origin="--scale") if args.scale is not None \
        else default_resolution(info, image_has_mpp=False)
    scale = float(resolution.scale)
    device = resolve_device(args.device)
    model.to(device)
    print(f"evaluating {args.checkpoint} on {len(dataset)} images of {args.data} at {resolution.describe()}"
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
