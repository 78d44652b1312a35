"""Export a checkpoint as a bioimage.io model package (spec 0.5): TorchScript + state dict, test tensors, cover,
README, class names and colours, for QuPath (bioimage.io extension), deepImageJ, ilastik and bioimageio.core.

The package also loads back wherever this plugin accepts a checkpoint (`predict`, `evaluate`, the Segment dock).
Authors and licence are the user's to give: the command refuses to guess them. Needs the `bioimageio` extra.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a .pt file written by `wsss-cram train`")
    parser.add_argument("--out", required=True, metavar="MODEL.zip", help="the package to write (.zip)")
    parser.add_argument("--author", action="append", default=[], metavar="NAME",
                        help="who made the model, 'Name' or 'Name <email>' (repeat for several; required)")
    parser.add_argument("--license", metavar="SPDX",
                        help="licence of the model, an SPDX identifier such as CC-BY-4.0 or MIT (required)")
    parser.add_argument("--name", help="model name (default: 'WSSS-CRAM <backbone> <classes>')")
    parser.add_argument("--description", help="one-paragraph description (default: written from the checkpoint)")
    parser.add_argument("--check", action="store_true",
                        help="then run bioimage.io's own test on the package (`bioimageio test`) and print it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing package")


def run(args: argparse.Namespace) -> int:
    from ..core.progress import drive
    from ..core.zoo.export import check_export_request, check_package, export_model, require_bioimageio

    # before the extra's import
    check_export_request(args.out, args.author, args.license, args.overwrite, args.checkpoint)
    require_bioimageio()

    def show(event) -> None:
        print(f"export: {event.info.get('step', '')} ({event.done}/{event.total})", file=sys.stderr)

    result = drive(export_model(args.checkpoint, args.out, args.author, args.license, name=args.name,
                                description=args.description, overwrite=args.overwrite), show)
    print(f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB, {len(result.files)} files) in "
          f"{result.seconds:.1f} s")
    if not args.check:
        return 0
    check = check_package(result.path)
    print(check.summary())
    print(f"bioimageio test: {check.status} in {check.seconds:.1f} s")
    return 0 if check.passed else 1
