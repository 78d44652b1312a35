"""Segment patches or whole slides with a checkpoint.

For each input (files, or folders of images), writes into --out, named after the input's stem:
STEM.png (index PNG, class palette; skipped for slides streamed to disk), STEM.ome.tif (pyramidal uint8
labels with the pixel size), STEM.geojson (QuPath annotations), STEM_probs.ome.tif (with --format ...,probs),
STEM_composition.json (area per class, tumor-stroma ratio), and predict_summary.csv over all inputs.
Existing outputs are never overwritten without --overwrite. Without --scale/--mpp the model runs at the
checkpoint's default resolution (``core.checkpoint.default_resolution``), which is printed.

Under `torchrun --nproc_per_node N wsss-cram predict ...` the inputs are sharded across ranks (one device per
rank); each rank writes its own files and rank 0 writes the summary.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..core.batch import (  # noqa: F401 (the names this command has always offered)
    IMAGE_SUFFIXES,
    SUMMARY_NAME,
    collect_inputs,
    iter_predict_many,
    shard,
    stem_of,
    summary_csv,
)
from ..core.inference.settings import BATCH_PER_DEVICE, PredictSettings
from ..core.io.formats import READERS
from ..core.io.writers import DEFAULT_FORMATS, FORMATS

log = logging.getLogger(__name__)

TTA_SCALES = (0.75, 1.0, 1.25)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="model checkpoint (.pt) written by `wsss-cram train`")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="images, slides or folders of them")
    parser.add_argument("--out", required=True, help="output folder")
    res = parser.add_mutually_exclusive_group()
    res.add_argument("--scale", type=float, default=None,
                     help="resample the input by this factor before the model (default: the checkpoint's "
                          "training µm/px when it records one and the image states its µm/px, else its mean "
                          "training rescale, e.g. 2.5 for the paper's x2-x3 preset)")
    res.add_argument("--mpp", nargs="?", const="model", default=None, metavar="UM_PER_PX",
                     help="instead of --scale, process at this µm/px (default when given without a value: "
                          "the model's training µm/px), reading the closest pyramid level")
    # Defaults are None = "the dataclass's" (PredictSettings, CRFParams): each value is written once, there.
    parser.add_argument("--tile", type=int, default=None,
                        help=f"tile size in model pixels (default {PredictSettings.tile})")
    parser.add_argument("--overlap", type=int, default=None,
                        help=f"tile overlap in model pixels (default {PredictSettings.overlap})")
    parser.add_argument("--batch", type=int, default=None,
                        help="tiles per batch (default by device: "
                             + ", ".join(f"{n} on {d.upper()}" for d, n in BATCH_PER_DEVICE.items()) + ")")
    parser.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None,
                        help="refine the labels with the dense CRF (default off: after the recipe's stage 2 it "
                             "did not help on WSSS4LUAD, at several times the cost; see the README)")
    parser.add_argument("--crf-params", default=None, metavar="K=V,...",
                        help="CRF settings, e.g. bilateral_sxy=80,bilateral_srgb=13,iterations=10,backend=torch "
                             "(backend: auto = torch, torch, or pydensecrf, the C++ reference)")
    parser.add_argument("--format", default=None,
                        help=f"comma-separated outputs among {','.join(FORMATS)} (default {','.join(DEFAULT_FORMATS)}; "
                             "the composition JSON is always written)")
    parser.add_argument("--device", default=None,
                        help=f"auto, cpu, cuda or cuda:N (default {PredictSettings.device})")
    parser.add_argument("--output-level", type=int, default=None,
                        help=f"pyramid level the outputs are written at (default {PredictSettings.output_level}, "
                             "full resolution)")
    parser.add_argument("--tissue-threshold", type=int, default=None,
                        help="gray level above which low-res pixels are background; tiles without tissue "
                             f"are skipped (default {PredictSettings.tissue_threshold})")
    parser.add_argument("--no-tissue-mask", action="store_true",
                        help="run the model on every tile, and let its background channel decide background")
    parser.add_argument("--background", choices=("tissue", "model"), default=None,
                        help="tissue (default): background is where the tissue mask says, every tissue pixel gets "
                             "a tissue class; model: the model's background channel competes (the paper)")
    parser.add_argument("--gate", action=argparse.BooleanOptionalAction, default=None,
                        help="zero the classes the image-level classifier calls absent in a tile")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: the model at x0.75, x1, x1.25 and mirrored, averaged (6x slower)")
    parser.add_argument("--no-amp", action="store_true", help="disable CUDA mixed precision")
    parser.add_argument("--work-dir", default=None,
                        help="folder for the temporary disk-backed arrays of large slides (default: system temp)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--channels", type=_channels, default=None, metavar="R,G,B",
                        help="the red, green and blue channels (from 0) of images with more than 3 channels, which "
                             "are refused without them, e.g. 2,1,0")
    parser.add_argument("--reader", choices=READERS, default="auto",
                        help="slide reader: auto (default: OpenSlide for MRXS/NDPI/SCN/BIF/DICOM, tifffile for "
                             "TIFF/SVS), tifffile, or openslide (also for SVS; needs the openslide extra)")


def _channels(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"--channels must be three channel numbers R,G,B from 0, got '{text}'")
    return values  # type: ignore[return-value]


def _progress_printer(rank: int, show_progress: bool):
    """The CLI's view of a batch's events: notes and failed inputs on stderr, a tqdm bar per input (a tty)."""
    bar = None

    def on_progress(event) -> None:
        nonlocal bar
        if event.phase == "warning":  # a note, or an input that failed (the others go on)
            print(f"{'error' if event.info.get('error') else 'note'}: {event.info['message']}", file=sys.stderr)
            return
        if not show_progress:
            return
        if event.phase == "file":
            if bar is not None:
                bar.close()
            bar = None
            if event.info.get("name"):
                from tqdm import tqdm

                bar = tqdm(desc=event.info["name"], unit="tile", leave=False, position=rank, file=sys.stderr)
        elif bar is not None:
            bar.total = event.total
            bar.n = event.done
            bar.refresh()

    def close() -> None:
        if bar is not None:
            bar.close()

    return on_progress, close


def _dist_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _parse_crf_params(text: str | None):
    from ..core.crf import BACKENDS, CRFParams
    from ..core.errors import WsssCramError

    if not text:
        return CRFParams()
    values: dict[str, float | str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in CRFParams.__dataclass_fields__ or not value:
            raise WsssCramError(f"Bad --crf-params item '{item}'; known settings: "
                                f"{', '.join(CRFParams.__dataclass_fields__)} (as name=value).")
        if key == "backend":
            if value.strip() not in BACKENDS:
                raise WsssCramError(f"--crf-params backend must be one of {', '.join(BACKENDS)}, got '{value}'.")
            values[key] = value.strip()
            continue
        try:
            values[key] = int(value) if key == "iterations" else float(value)
        except ValueError:
            raise WsssCramError(f"--crf-params {key} needs a number, got '{value}'.") from None
    return CRFParams(**values)


def resolution_from_args(args: argparse.Namespace, info: Any):
    """The resolution asked for on the command line, or the checkpoint's default (``default_resolution``)."""
    from ..core.checkpoint import Resolution, default_resolution
    from ..core.errors import WsssCramError

    if args.scale is not None:
        return Resolution(scale=float(args.scale), origin="--scale")
    if args.mpp is None:
        return default_resolution(info)
    if args.mpp == "model":
        if info.model_config.mpp is None:
            raise WsssCramError("--mpp was given without a value but the checkpoint does not record the "
                                "training µm/px; pass --mpp X or use --scale.")
        return Resolution(mpp=float(info.model_config.mpp), origin="--mpp: the checkpoint's training µm/px")
    try:
        return Resolution(mpp=float(args.mpp), origin="--mpp")
    except ValueError:
        raise WsssCramError(f"--mpp needs a number of µm per pixel, got '{args.mpp}'.") from None


def settings_from_args(args: argparse.Namespace, info: Any):
    """(PredictSettings, fallback) from the command line through the one builder
    (``core.inference.build_predict_settings``): a flag left out keeps the dataclass default, no --scale/--mpp
    the checkpoint's default resolution (``fallback``: the training scale for images that state no µm/px)."""
    from ..core.inference import build_predict_settings

    given = {"tile": args.tile, "overlap": args.overlap, "batch": args.batch, "crf": args.crf,
             "device": args.device, "output_level": args.output_level, "work_dir": args.work_dir,
             "tissue_threshold": args.tissue_threshold, "background": args.background, "gate_classes": args.gate}
    fields = {k: v for k, v in given.items() if v is not None}
    if args.crf_params:
        fields["crf_params"] = _parse_crf_params(args.crf_params)
    if args.no_tissue_mask:
        fields["tissue_threshold"] = None
    if args.no_amp:
        fields["amp"] = False
    if args.tta:
        fields["tta_scales"], fields["tta_flip"] = TTA_SCALES, True
    explicit = None if args.scale is None and args.mpp is None else resolution_from_args(args, info)
    return build_predict_settings(info, explicit, with_probs="probs" in args.formats, **fields)


def _gather_rows(rows: list[dict], world: int) -> list[dict] | None:
    """All ranks' rows on rank 0 (None elsewhere); a no-op without torch.distributed."""
    if world <= 1:
        return rows
    import torch.distributed as dist

    gathered: list[Any] = [None] * world if dist.get_rank() == 0 else None  # type: ignore[assignment]
    dist.gather_object(rows, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    return [row for part in gathered for row in part]


def run(args: argparse.Namespace) -> int:
    from ..core.batch import predict_batch
    from ..core.io.writers import parse_formats
    from ..core.progress import drive

    rank, world = _dist_env()
    args.formats = parse_formats(args.format) if args.format is not None else DEFAULT_FORMATS
    _parse_crf_params(args.crf_params)  # refused before any work (the full settings need the checkpoint)
    out_dir = Path(args.out)
    initialized_here = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            # gloo is enough: ranks only exchange their summary rows; each rank uses its own device.
            dist.init_process_group("gloo")
            initialized_here = True

    def load() -> tuple:
        """The checkpoint and the settings, once every check of inputs and outputs passed."""
        from ..core.checkpoint import load_checkpoint
        from ..core.inference import resolve_device

        device = resolve_device(args.device)
        model, info = load_checkpoint(args.checkpoint, map_location=device)
        settings, fallback = settings_from_args(args, info)
        for s in (settings, fallback):  # the device this rank resolved (cuda:N under torchrun)
            if s is not None:
                s.device = str(device)
        if rank == 0:
            print(f"Predicting at {resolution_from_args(args, info).describe()}.", file=sys.stderr)
        return model, info, settings, fallback

    on_progress, close = _progress_printer(rank, sys.stderr.isatty())
    try:
        rows, summary_path = drive(predict_batch(
            None, None, list(args.inputs), out_dir, None, args.formats, args.overwrite, rank=rank, world=world,
            gather=lambda mine: _gather_rows(mine, world), given=[args.checkpoint], where="--out folder",
            load=load, reader=getattr(args, "reader", None) or "auto", channels=getattr(args, "channels", None)),
            on_progress)
        failed = sum(1 for r in rows if r.get("status") != "ok")
        if rank == 0:
            print(f"Predicted {len(rows) - failed} of {len(rows)} input(s) into {out_dir} "
                  f"(summary: {summary_path.name}).")
        if initialized_here:
            # Every rank waits for the others before leaving the group: a rank that tears gloo down while a peer's
            # gather is still in flight aborts in C++ ("terminate called without an active exception").
            dist.barrier()
    finally:
        close()
        if initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 2 if failed else 0
