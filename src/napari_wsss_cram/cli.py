"""`wsss-cram`: the headless command line. Each subcommand lives in ``napari_wsss_cram.commands.<name>``
and exposes ``add_arguments(parser)`` and ``run(args) -> int``; heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import warnings

from . import __version__

#: subcommand -> (module in napari_wsss_cram.commands, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "open napari on the sample data, or segment it headless into an output folder"),
    "train": ("train", "train WSSS-CRAM on image-level-labelled patches (or stage 2 on pseudo-labels)"),
    "predict": ("predict", "segment patches or whole slides with a checkpoint"),
    "evaluate": ("evaluate", "score a checkpoint on pixel-labelled images (mIoU, per-class IoU)"),
    "pseudo-labels": ("pseudo_labels", "write reliable pseudo-labels of a trained joint model"),
    "patchify": ("patchify", "cut image-level-labelled patches out of pixel-labelled images"),
    "export-model": ("export_model", "write a checkpoint as a bioimage.io model package (for QuPath and the zoo)"),
    "geojson-to-mask": ("geojson_to_mask", "rasterise QuPath GeoJSON annotations into a class mask (PNG/OME-TIFF)"),
    "make-sample-data": ("make_sample_data", "generate the synthetic H&E sample data and slide"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsss-cram",
        description="WSSS-CRAM: pixel-level tissue maps of H&E images from image-level labels.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(f"napari_wsss_cram.commands.{module_name}")
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``wsss-cram`` script."""
    from .core.errors import WsssCramError
    from .core.progress import Cancelled

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    if not args.verbose:
        # "warning: <what>" without the source path and code line of the library that raised it
        warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
        # tifffile logs each damaged tag it skips; the reader's own error (or the image) is what the user needs
        logging.getLogger("tifffile").setLevel(logging.ERROR)
    previous = _stop_on_sigterm()
    try:
        return int(args._module.run(args) or 0)
    except WsssCramError as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Cancelled):
        print("Interrupted.", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm():
    """SIGTERM (``timeout``, SLURM, ``docker stop``) stops a command as Ctrl-C does: training saves its
    checkpoint, outputs and temporary stores are cleaned up. Returns the previous handler (None off the main
    thread, where signals cannot be set)."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (e.g. called from a test runner's worker)
        return None


if __name__ == "__main__":
    sys.exit(main())
