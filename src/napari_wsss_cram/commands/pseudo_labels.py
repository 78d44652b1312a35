"""Write a model's pseudo-labels of a patch folder as palette PNGs (255 = unreliable): OUT/mask/<name>.png with
the patches linked under OUT/img/, ready for `wsss-cram train --stage 2 --pseudo OUT`. The model is the joint
(stage-1) one, or a segmentation round's for a further self-training round. `wsss-cram train` runs this step
itself between the recipe's stages; the command is for running the stages one by one.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..core.pseudo_labels import PSEUDO_LABEL_REFINEMENTS

    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a checkpoint (or run folder) from `wsss-cram train`: the joint model, or a segmentation "
                             "round's (segmentation source only)")
    parser.add_argument("patches", metavar="PATCH_DIR", help="image-level-labelled patches (any training layout)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (img/ + mask/)")
    parser.add_argument("--scale", type=float, help="rescale patches by this factor (default: the training mean)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--crf-workers", type=int, default=0, help="processes for the pydensecrf CRF backend (0 = in-process)")
    parser.add_argument("--source", choices=("segmentation", "maps"), default="segmentation",
                        help="segmentation: the segmentation branch restricted to each patch's classes and tissue "
                             "(default); maps: the paper's reliable labels of the activation maps (alpha/beta + CRF)")
    parser.add_argument("--refine", choices=PSEUDO_LABEL_REFINEMENTS, default="none",
                        help="segmentation source: par refines the probabilities by colour affinities (pixel-adaptive "
                             "refinement) before the arg-max; stain decides tumor against stroma in patches labelled "
                             "with both by their hematoxylin density (default: none)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..core.pseudo_labels import make_pseudo_labels

    gen = make_pseudo_labels(args.checkpoint, args.patches, args.out, scale=args.scale, device=args.device,
                             crf_workers=args.crf_workers, overwrite=args.overwrite, source=args.source,
                             refine=args.refine)
    bar = None
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                out = stop.value
                break
            if bar is None:
                bar = tqdm(total=event.total, desc="pseudo-labels", unit="patch", file=sys.stderr)
            bar.update(event.done - bar.n)
    finally:
        if bar is not None:
            bar.close()
    print(out)
    return 0
