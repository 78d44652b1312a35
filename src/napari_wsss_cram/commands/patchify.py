"""Cut image-level-labelled patches out of pixel-labelled images (img/ + mask/ [+ background-mask/]), in the
WSSS4LUAD naming <image>-<y>-<x>-[t, s, n].png. A patch is labelled with each tissue class covering at least
--min-frac of its tissue pixels. Corrected masks from napari become training data this way.
"""

from __future__ import annotations

import argparse
import sys


def _size_range(text: str) -> tuple[int, int]:
    parts = text.replace(",", "-").split("-")
    try:
        values = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be N or MIN-MAX pixels, got '{text}'") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 8:
        raise argparse.ArgumentTypeError(f"--size must be N or MIN-MAX pixels (>= 8), got '{text}'")
    return min(values), max(values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..core.data.patchify import patchify
    from ..core.fields import parameter_defaults

    # defaults None = the core function's (its signature is their one owner)
    d = parameter_defaults(patchify)
    parser.add_argument("data", metavar="IMG_MASK_DIR", help="folder with img/ and mask/ (+ background-mask/)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output patch folder")
    parser.add_argument("--min-frac", type=float,
                        help=f"a class is present when it covers this share of the patch's tissue (default "
                             f"{d['min_frac']})")
    parser.add_argument("--size", type=_size_range,
                        help=f"patch side MIN-MAX px (default {d['size'][0]}-{d['size'][1]})")
    parser.add_argument("--overlap", type=float, help=f"overlap of neighbouring patches, 0-0.9 (default {d['overlap']})")
    parser.add_argument("--min-tissue", type=float,
                        help=f"skip patches with less tissue than this share (default {d['min_tissue']})")
    parser.add_argument("--classes", help="class names 'a,b,c' (default: classes.txt or WSSS4LUAD)")
    parser.add_argument("--masks", action="store_true",
                        help="also write the mask crops to DIR/_masks/ (for checking pseudo-labels; not trained on)")
    parser.add_argument("--strong-masks", action="store_true",
                        help="also write the mask crops to DIR/_strong_masks/: `wsss-cram train` then uses them as "
                             "pixel labels (corrected masks, WSSS-CRAM3); never for a weak-label benchmark")
    parser.add_argument("--seed", type=int, help=f"random seed of the patch grid's offsets (default {d['seed']})")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def run(args: argparse.Namespace) -> int:
    from ..core.data.patches import PatchIndex
    from ..core.data.patchify import patchify
    from ..core.data.pixel import discover_pixel_dataset
    from ..core.fields import given

    dataset = discover_pixel_dataset(args.data, args.classes)
    result = patchify(dataset, args.out, keep_masks=args.masks, strong_masks=args.strong_masks,
                      overwrite=args.overwrite, **given(min_frac=args.min_frac, size=args.size, overlap=args.overlap,
                                                        min_tissue=args.min_tissue, seed=args.seed))
    index = PatchIndex(result.paths, result.labels, dataset.classes, result.out_dir, "wsss4luad")
    print(index.summary(), file=sys.stderr)
    print(f"{len(result.paths)} patches from {len(dataset)} images ({result.skipped} windows skipped)",
          file=sys.stderr)
    print(result.out_dir)
    return 0
