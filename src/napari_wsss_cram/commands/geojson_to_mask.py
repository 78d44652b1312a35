"""Rasterise QuPath annotations (File > Export objects as GeoJSON: classified annotations in level-0 pixels) into
a class mask: a palette PNG or a labels OME-TIFF, the pixel-labelled format `patchify` and `train` read. Class names
match the model's ignoring case ("Tumor" -> tumor); --map renames others. The Segment dock's "Import QuPath
annotations…" does the same in napari.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("geojson", metavar="GEOJSON", help="QuPath GeoJSON export (FeatureCollection or list)")
    parser.add_argument("--out", required=True, metavar="MASK",
                        help="mask file to write: .png (palette) or .ome.tif (pyramidal labels)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--image", metavar="IMAGE", help="the image the annotations were drawn on (its size and µm/px)")
    size.add_argument("--shape", metavar="HxW", help="mask size in level-0 pixels, e.g. 4096x4096")
    parser.add_argument("--downsample", type=int, default=1,
                        help="write the mask at 1/N of the level-0 size (a power of two for slides; default 1)")
    parser.add_argument("--classes", help="class names 'a,b,c' (default: the checkpoint's, else WSSS4LUAD's)")
    parser.add_argument("--checkpoint", metavar="PT", help="take the class names from this model checkpoint")
    parser.add_argument("--map", default="", metavar="'QuPath=class,...'",
                        help="QuPath class names that are not the model's: 'Tumour=tumor, Immune cells=skip'")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing mask file")


MAX_SIDE = 1_000_000
#: the largest mask rasterised in memory (uint8): beyond it --downsample is asked for, not a MemoryError
MAX_MASK_PIXELS = 2 ** 32


def _shape(text: str) -> tuple[int, int]:
    from ..core.errors import WsssCramError

    try:
        h, w = (int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise WsssCramError(f"--shape must be HEIGHTxWIDTH in pixels, e.g. 4096x4096 (got '{text}').") from None
    if h < 1 or w < 1:
        raise WsssCramError(f"--shape must be positive, got '{text}'.")
    if max(h, w) > MAX_SIDE:  # the largest slides are ~200k px a side; beyond, a typo (or µm typed as px)
        raise WsssCramError(f"--shape {h}x{w} exceeds {MAX_SIDE} px a side; give the image's level-0 size in "
                            "pixels (or --image).")
    return h, w


def run(args: argparse.Namespace) -> int:
    from .._writer import export_labels
    from ..core.classes import WSSS4LUAD, ClassSpec, class_spec_from_names
    from ..core.errors import WsssCramError
    from ..core.io.guard import check_output_file
    from ..core.io.qupath import parse_class_map, qupath_to_labels
    from ..core.placement import Placement

    if args.downsample < 1:
        raise WsssCramError("--downsample must be 1 or more.")
    # the one output guard, before any work: never onto an input, an existing file only with --overwrite
    check_output_file(args.out, [args.geojson, args.image, args.checkpoint], args.overwrite, "--out")
    classes: ClassSpec = WSSS4LUAD
    if args.classes:
        classes = class_spec_from_names(args.classes)
    elif args.checkpoint:
        from ..core.checkpoint import read_checkpoint_payload

        classes = ClassSpec.from_dict(read_checkpoint_payload(args.checkpoint)["classes"])
    mpp = None
    if args.image:
        from ..core.io.images import ImageSource

        with ImageSource.open(args.image) as source:
            shape, mpp = tuple(source.shape[:2]), source.mpp
    else:
        shape = _shape(args.shape)
    d = args.downsample
    level_shape = (-(-shape[0] // d), -(-shape[1] // d))
    if level_shape[0] * level_shape[1] > MAX_MASK_PIXELS:
        raise WsssCramError(f"A {level_shape[0]}x{level_shape[1]} mask needs "
                            f"{level_shape[0] * level_shape[1] / 2 ** 30:.0f} GiB of memory; pass --downsample "
                            f"{2 * d} or more.")
    imported = qupath_to_labels(args.geojson, level_shape, classes, scale=float(d),
                                class_map=parse_class_map(args.map))
    written = export_labels(args.out, imported.labels, classes, mpp=None if mpp is None else mpp * d,
                            overwrite=args.overwrite, placement=Placement(downsample=float(d), mpp0=mpp))
    print(imported.summary(), file=sys.stderr)
    print(written)
    return 0
