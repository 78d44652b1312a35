"""The Train dock's calls into the core: presets, dataset scan, the training generator, corrected examples."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
from collections.abc import Generator
from pathlib import Path

import numpy as np

from ..core.errors import DatasetError, WsssCramError
from ..core.progress import CancelToken, Progress

#: Dock label -> shipped preset (presets/<name>.toml): the paper's setting (GPU), a 2-core CPU run, the synthetic demo.
PRESETS = {"paper (wsss4luad)": "wsss4luad", "cpu-small": "cpu-small", "sample": "sample"}
#: Dock label -> TrainConfig.weights (the CLI's --weights); "file" takes the path from the dock's file field.
WEIGHTS = {"ImageNet if cached, else random": "auto", "ImageNet (download if needed)": "imagenet",
           "random": "none", "file…": "file"}


def weights_label(weights: str | None) -> str:
    """The dock label of a TrainConfig.weights value (a path -> "file…")."""
    for label, value in WEIGHTS.items():
        if value == (weights or "none"):
            return label
    return "file…"


def describe_weights(backbone: str, weights: str | None) -> str:
    """What a run starts from, in words (files only, no network)."""
    from ..core.model.backbone import describe_weights as describe

    try:
        text = describe(backbone, weights)
    except Exception as err:  # an unknown backbone name: said, not raised into the event loop
        return f"unknown ({err})"
    # the core speaks the command line; the dock names its own control
    return text.replace("choose ImageNet / --weights imagenet", "choose 'ImageNet' in Weights")


def preset_config(preset: str, corrections: str | None = None, **overrides):
    """The TrainConfig of the preset ``presets/<preset>.toml`` with the dock's fields applied.

    ``corrections``: a folder written by :func:`add_corrected_example`; the patches cut from the corrected
    examples are mixed into the training patches (a CSV listing both is written into the run folder), and
    their corrected masks serve as strong pixel labels during joint training.
    """
    from ..core.train_config import load_config

    config = load_config(PRESETS.get(preset, preset))
    # Training shares the process with the Qt event loop: leave the GUI a core.
    threads = max(1, (os.cpu_count() or 2) - 1)
    extra = {"threads": threads, "workers": 0 if (os.cpu_count() or 2) <= 2 else config.workers}
    config = config.updated(**extra, **overrides)
    if corrections:
        config = config.updated(data=mixed_patch_csv(config.data, corrections, config.out))
    return config


def mixed_patch_csv(data: str, corrections: str | Path, out: str | Path) -> str:
    """Write ``out/training_patches.csv`` listing the patches of ``data`` plus those cut from corrections."""
    from ..core.data.patches import discover_patches

    patches_dir = Path(corrections) / "patches"
    if not patches_dir.is_dir():
        raise DatasetError(f"{corrections} holds no corrected examples yet (no patches/ folder): "
                           "add corrected labels first, or untick 'Mix in patches cut from corrected labels'.")
    base = discover_patches(data)
    with _quiet_logger("napari_wsss_cram.core.data.patches"):
        # its class counts describe only the corrected patches; the trainer checks (and warns about) the whole
        # mixed set when it reads the CSV
        extra = discover_patches(patches_dir, base.classes)
    csv_path = Path(out) / "training_patches.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)  # quotes WSSS4LUAD names, which hold commas
        writer.writerow(["path", *base.classes.names])
        for index in (base, extra):
            writer.writerows([str(p.resolve()), *map(int, flags)]
                             for p, flags in zip(index.paths, index.labels, strict=True))
    return str(csv_path)


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Drop the records of logger ``name`` for the duration (a filter, so other loggers are untouched)."""
    logger = logging.getLogger(name)

    def drop(record) -> bool:
        return False

    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def scan_folder(data: str, val: str | None = None):
    """Discover the patch folder (and check the validation set); return the index and a report for the dock."""
    from ..core.data.patches import discover_patches
    from ..core.data.pixel import discover_pixel_dataset

    if not data:
        raise DatasetError("Choose a folder of image-level-labelled patches first.")
    index = discover_patches(data)
    lines = [f"<b>{len(index)} patches</b> ({index.layout} layout)",
             "per class: " + ", ".join(f"{n} {c}" for n, c in index.counts_per_class().items()),
             "combinations: " + ", ".join(f"{n} {c}" for n, c in index.counts_per_combination().items())]
    lines += [f'<span style="color:#f39800">warning: {w}</span>' for w in index.warnings]
    for name in index.rare_classes():
        message = f"class '{name}' has very few patches: it will be learnt poorly"
        if not any(name in w for w in index.warnings):
            lines.append(f'<span style="color:#f39800">warning: {message}</span>')
    if val:
        pixel = discover_pixel_dataset(val, index.classes)
        lines.append(f"validation: {len(pixel)} pixel-labelled images")
    return index, "<br>".join(lines)


def train_job(config, cancel: CancelToken) -> Generator[Progress, None, str | None]:
    """Run the whole training recipe (a segmentation round alone for a stage-2 config), forwarding its Progress
    events; return the checkpoint to use (the recipe's final.pt)."""
    from ..core.recipe import train_recipe_steps
    from ..core.run_files import is_single_stage_run
    from ..core.train import train_steps
    from ._common import leave_gui_a_core

    with leave_gui_a_core():  # also undoes the trainer's torch.set_num_threads(config.threads)
        # a stage-2 config, or Resume of a folder holding one stage alone, trains that stage; else the recipe
        single = config.stage2 or (config.resume and is_single_stage_run(config.out))
        steps = train_steps(config, cancel=cancel) if single else train_recipe_steps(config, cancel)
        result = yield from steps
    return None if result is None else str(result)


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "image"


def _image_under_labels(image_layer, labels_layer, shape: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The RGB pixels of ``image_layer`` under a result Labels layer that covers part of it (a field of view) or
    a coarser level: read through the one reader at the labels' level -> (rgb of ``shape``, (y, x, downsample)
    of the region in level-0 pixels). Raises WsssCramError when the labels do not sit on that image's pixels."""
    from ..core.placement import Placement
    from ._segment_job import image_source_of_layer
    from .layers import METADATA_KEY

    meta = labels_layer.metadata.get(METADATA_KEY, {}) if isinstance(labels_layer.metadata, dict) else {}
    placed = Placement.from_metadata(meta.get("placement")) if meta.get("placement") else None
    d = placed.downsample if placed is not None else 0.0
    offset = placed.origin if placed is not None else None
    mismatch = WsssCramError(
        f"'{labels_layer.name}' ({shape[0]}x{shape[1]}) does not sit on the pixels of '{image_layer.name}': choose "
        "the image it was segmented from (a field-of-view result is saved with the image crop under it).")
    if d < 1 or offset is None or meta.get("source") not in (None, image_layer.name):
        raise mismatch
    y0, x0 = float(offset[0]), float(offset[1])
    if abs(d - round(d)) > 1e-6 or abs(y0 - round(y0)) > 1e-6 or abs(x0 - round(x0)) > 1e-6:
        raise mismatch
    d, y0, x0 = int(round(d)), int(round(y0)), int(round(x0))
    # an in-memory pyramid is read at its own level of that downsample (a file: all its levels, lazily)
    factors = [float(f[-2]) for f in image_layer.downsample_factors] if image_layer.multiscale else [1.0]
    layer_level = next((i for i, f in enumerate(factors) if abs(f - d) < 1e-6), 0)
    source, layer_downsample = image_source_of_layer(image_layer, layer_level)
    try:
        full = tuple(int(v * layer_downsample) for v in source.shape)
        if y0 < 0 or x0 < 0 or y0 + shape[0] * d > full[0] + d or x0 + shape[1] * d > full[1] + d:
            raise mismatch
        if layer_downsample != 1.0:  # the source is that level itself
            level = 0 if abs(layer_downsample - d) < 1e-6 else None
        else:
            level = next((i for i, f in enumerate(source.level_downsamples) if abs(f - d) < 1e-6), None)
        if level is None and layer_downsample != 1.0:
            raise mismatch
        if level is not None and y0 % d == 0 and x0 % d == 0:
            rgb = source.read_region(y0 // d, x0 // d, shape[0], shape[1], level)
        else:  # no pyramid level at this downsample: read level 0 and average d x d blocks
            region = source.read_region(y0, x0, shape[0] * d, shape[1] * d, 0).astype(np.float32)
            rgb = region.reshape(shape[0], d, shape[1], d, -1).mean(axis=(1, 3)).round().astype(np.uint8)
    finally:
        source.close()
    if tuple(rgb.shape[:2]) != tuple(shape):
        raise mismatch
    return rgb, (y0, x0, d)


def add_corrected_example(image_layer, labels_layer, folder: str | Path) -> list[str]:
    """Save ``image_layer`` + corrected ``labels_layer`` as ``folder/img/<name>.png`` + ``folder/mask/<name>.png``
    (index PNG, class palette) and cut image-level patches from all examples into ``folder/patches``.

    Returns the image path, the mask path, then the patch paths.
    """
    from PIL import Image

    from ..core.classes import WSSS4LUAD
    from ..core.data.patchify import patchify
    from ..core.data.pixel import discover_pixel_dataset
    from ..core.io.atomic import atomic_path
    from ..core.io.images import to_rgb_uint8
    from ..core.io.png import write_index_png
    from .layers import classes_of_layer

    classes = classes_of_layer(labels_layer) or WSSS4LUAD
    rgb = image_layer.data[0] if image_layer.multiscale else image_layer.data
    mask = labels_layer.data[0] if labels_layer.multiscale else labels_layer.data
    if not image_layer.rgb:
        raise WsssCramError(f"'{image_layer.name}' is not an RGB image: corrected examples need the H&E image.")
    mask = np.asarray(mask)
    stem = _safe_stem(image_layer.name)
    if tuple(mask.shape) != tuple(rgb.shape[:2]):
        # a field-of-view (or coarser-level) result: the image crop under it, from its placement
        rgb, (y, x, d) = _image_under_labels(image_layer, labels_layer, mask.shape)
        stem = _safe_stem(f"{image_layer.name}_fov_y{y}_x{x}" + (f"_d{d}" if d != 1 else ""))
    if int(mask.max(initial=0)) > classes.background_index:
        raise WsssCramError(f"'{labels_layer.name}' holds label {int(mask.max())}, not a class of "
                            f"{', '.join(classes.all_names)}: paint only with values 0..{classes.background_index}.")
    folder = Path(folder)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "mask").mkdir(parents=True, exist_ok=True)
    image_path, mask_path = folder / "img" / f"{stem}.png", folder / "mask" / f"{stem}.png"
    with atomic_path(image_path) as tmp:
        Image.fromarray(to_rgb_uint8(np.asarray(rgb), source=image_layer.name)).save(tmp, format="PNG")
    write_index_png(mask_path, mask.astype(np.uint8), classes)
    # strong_masks: the corrected mask crops go to patches/_strong_masks/; the trainer uses them as pixel
    # labels instead of the pseudo-labels (WSSS-CRAM3)
    result = patchify(discover_pixel_dataset(folder, classes), folder / "patches", overwrite=True,
                      strong_masks=True)
    return [str(image_path), str(mask_path), *map(str, result.paths)]
