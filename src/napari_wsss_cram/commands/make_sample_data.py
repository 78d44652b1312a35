"""Generate the synthetic H&E sample data: labelled patches, pixel-labelled validation images, and a
pyramidal OME-TIFF slide with its mask. Deterministic: the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (e.g. sample_data)")
    parser.add_argument("--slide-size", type=int, default=4096,
                        help="side of the square slide in pixels (0: no slide; default 4096)")
    parser.add_argument("--n-patches", type=int, default=240, help="number of training patches (default 240)")
    parser.add_argument("--n-validation", type=int, default=20,
                        help="number of pixel-labelled validation images (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--montage", default=None, help="also write a montage PNG of some patches here")
    parser.add_argument("--slide-only", action="store_true",
                        help="only (re)generate the slide, into OUT/slide/")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..core.errors import WsssCramError
    from ..core.sample import check_sample_folder, make_sample_data, make_slide

    if args.slide_size < 0 or args.n_patches < 0 or args.n_validation < 0:
        raise WsssCramError("--slide-size, --n-patches and --n-validation must not be negative.")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise WsssCramError(f"--out '{out}' exists and is not a folder.")

    def report(phase: str, done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{phase}: {done}/{total}   ", end="", file=sys.stderr, flush=True)

    if args.slide_only:
        check_sample_folder(out)  # never replaces a file it did not write
        size = args.slide_size or 4096
        slide, mask = make_slide(out / "slide" / "sample_slide.ome.tif", size=size, seed=args.seed,
                                 mask_path=out / "slide" / "sample_slide_mask.ome.tif",
                                 progress=lambda d, t: report("slide", d, t))
        print(f"\nWrote {slide} and {mask}.")
        return 0
    summary = make_sample_data(out, n_patches=args.n_patches, n_validation=args.n_validation,
                               slide_size=args.slide_size, seed=args.seed, montage_path=args.montage,
                               progress=report)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    secs = summary["seconds"]
    print(f"Wrote {summary['patches']} patches to {out / 'patches'} ({secs['patches']} s), "
          f"{summary['validation_images']} validation images to {out / 'validation'} ({secs['validation']} s)"
          + (f", and a {args.slide_size}x{args.slide_size} slide to {out / 'slide'} ({secs['slide']} s)"
             if args.slide_size else "") + ".")
    print(f"Patch labels (tumor, stroma, normal): {summary['patch_label_counts']}")
    return 0
