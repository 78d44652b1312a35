"""Generate the synthetic H&E sample data: labelled patches, pixel-labelled validation images, and a
pyramidal OME-TIFF slide with its mask. Deterministic: the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..core.fields import parameter_defaults
    from ..core.sample import make_sample_data

    # defaults None = make_sample_data's (its signature is their one owner)
    d = parameter_defaults(make_sample_data)
    parser.add_argument("--out", required=True, help="output folder (e.g. sample_data)")
    parser.add_argument("--slide-size", type=int,
                        help=f"side of the square slide in pixels (0: no slide; default {d['slide_size']})")
    parser.add_argument("--n-patches", type=int, help=f"number of training patches (default {d['n_patches']})")
    parser.add_argument("--n-validation", type=int,
                        help=f"number of pixel-labelled validation images (default {d['n_validation']})")
    parser.add_argument("--seed", type=int, help=f"random seed (default {d['seed']})")
    parser.add_argument("--montage", default=None, help="also write a montage PNG of some patches here")
    parser.add_argument("--slide-only", action="store_true",
                        help="only (re)generate the slide, into OUT/slide/")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..core.errors import WsssCramError
    from ..core.fields import given, parameter_defaults
    from ..core.sample import check_sample_folder, make_sample_data, make_slide

    chosen = given(slide_size=args.slide_size, n_patches=args.n_patches, n_validation=args.n_validation,
                   seed=args.seed)
    if any(v < 0 for k, v in chosen.items() if k != "seed"):
        raise WsssCramError("--slide-size, --n-patches and --n-validation must not be negative.")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise WsssCramError(f"--out '{out}' exists and is not a folder.")

    def report(phase: str, done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{phase}: {done}/{total}   ", end="", file=sys.stderr, flush=True)

    if args.slide_only:
        check_sample_folder(out)  # never replaces a file it did not write
        size = args.slide_size or parameter_defaults(make_slide)["size"]
        slide, mask = make_slide(out / "slide" / "sample_slide.ome.tif", size=size,
                                 seed=chosen.get("seed", parameter_defaults(make_slide)["seed"]),
                                 mask_path=out / "slide" / "sample_slide_mask.ome.tif",
                                 progress=lambda d, t: report("slide", d, t))
        print(f"\nWrote {slide} and {mask}.")
        return 0
    summary = make_sample_data(out, montage_path=args.montage, progress=report, **chosen)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    secs = summary["seconds"]
    print(f"Wrote {summary['patches']} patches to {out / 'patches'} ({secs['patches']} s), "
          f"{summary['validation_images']} validation images to {out / 'validation'} ({secs['validation']} s)"
          + (f", and a {summary['slide_size']}x{summary['slide_size']} slide to {out / 'slide'} ({secs['slide']} s)"
             if summary.get("slide_size") else "") + ".")
    print(f"Patch labels (tumor, stroma, normal): {summary['patch_label_counts']}")
    return 0
