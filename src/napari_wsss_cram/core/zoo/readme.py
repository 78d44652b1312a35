"""The human side of a model package: its cover image and its README (training data, recipe, validation,
background rule, resolution, how to run it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: overlay opacity of the class colours on the cover
COVER_ALPHA = 0.45


def write_cover(path: Path, rgb: np.ndarray, probs: np.ndarray, classes: Any, side: int = 512) -> Path:
    """A 2:1 cover: the sample patch (left) and the same patch with the arg-max class colours over its tissue
    (right; background = not tissue stays bare), with a legend of the class names."""
    from PIL import Image, ImageDraw

    labels = probs.argmax(axis=0)
    palette = np.array([*classes.colors, classes.background_color], dtype=np.float32)
    tissue = (labels != classes.background_index)[..., None]
    overlay = rgb.astype(np.float32) * (1 - COVER_ALPHA * tissue) + palette[labels] * COVER_ALPHA * tissue
    left = Image.fromarray(rgb).resize((side, side), Image.NEAREST)
    right = Image.fromarray(overlay.round().clip(0, 255).astype(np.uint8)).resize((side, side), Image.NEAREST)
    cover = Image.new("RGB", (2 * side, side), "white")
    cover.paste(left, (0, 0))
    cover.paste(right, (side, 0))
    draw = ImageDraw.Draw(cover)
    x, y = side + 8, side - 8 - 18 * classes.num_classes
    draw.rectangle((x - 4, y - 4, x + 120, side - 4), fill=(255, 255, 255))
    for i, (name, color) in enumerate(zip(classes.names, classes.colors, strict=True)):
        draw.rectangle((x, y + 18 * i, x + 12, y + 18 * i + 12), fill=tuple(color), outline=(0, 0, 0))
        draw.text((x + 18, y + 18 * i), name, fill=(0, 0, 0))
    cover.save(path)
    return path


def _recipe(train: dict) -> list[str]:
    keys = ("steps", "epochs", "batch_size", "crop", "lr", "optimizer", "scale_min", "scale_max", "weights",
            "init", "stage2", "pseudo_refine", "pixel_labels", "seed")
    return [f"`{key}` = `{train[key]}`" for key in keys if train.get(key) not in (None, "", False)]


def write_readme(path: Path, info: Any, name: str) -> Path:
    """The package's README.md (the spec asks for a '# Validation' section)."""
    from ..checkpoint import default_resolution, model_card
    from .export import HALO, SAMPLE_SIDE, TILE_MIN, TILE_STEP, engine_padding

    before, after = engine_padding(SAMPLE_SIDE)

    config, classes, train, extra = info.model_config, info.classes, info.train_config or {}, info.extra or {}
    mpp = getattr(config, "mpp", None)
    resolution = default_resolution(info)
    data = train.get("data")
    miou = extra.get("val_mIoU", extra.get("best_mIoU"))
    per_class = extra.get("per_class") or {}
    notes = [text for kind, text in model_card(info) if kind in ("note", "warning")]
    rows = "\n".join(f"| {i} | {n} | rgb{tuple(c)} |" for i, (n, c) in enumerate(
        zip(classes.all_names, (*classes.colors, classes.background_color), strict=True)))
    lines = [
        f"# {name}", "",
        "A tissue segmentation model for H&E images trained with napari-wsss-cram (WSSS-CRAM, Pan et al. 2024) "
        "from image-level labels only, exported as a bioimage.io model package.", "",
        *[f"> **{note}**\n" for note in notes],
        "## What it computes", "",
        f"- Network: dilated {config.backbone} (output stride {config.output_stride}) + DeepLab v3 segmentation "
        f"head, stage {config.stage} of WSSS-CRAM; at inference only these run.",
        "- Input `rgb`: axes `b,c,y,x`, 8-bit RGB (0..255). Preprocessing (in the package): cast to float32, "
        f"subtract the mean {[round(v * 255, 3) for v in config.mean]} and divide by the std "
        f"{[round(v * 255, 3) for v in config.std]} per channel (ImageNet normalisation on 0..255).",
        "- Output `probabilities`: axes `b,c,y,x` at the input's size, float32 in 0..1, one channel per class "
        "(table below), summing to 1 at each pixel.",
        "- **Background is \"not tissue\".** The last channel is 1 where the pixel is near-white (gray level, "
        "ITU-R BT.601, above 200 after a 5x5 majority vote: glass, alveolar air) and 0 elsewhere; on tissue the "
        "tissue classes share the probability (the segmentation head's softmax renormalised over the tissue "
        "classes). This is what `wsss-cram predict` outputs by default (`--background tissue`). The "
        "network's own background channel is a training device and is not used.",
        f"- Tiles: any size of {TILE_MIN} + n x {TILE_STEP} pixels; crop a halo of {HALO} pixels from each side "
        "of an output tile (`wsss-cram predict` overlaps 512-pixel tiles by 64 and pads the image border by "
        "replicating its edge pixels).",
        (f"- **Resolution: {mpp:g} µm per pixel** (the training resolution; stated as the spatial axes' scale)."
         if mpp else
         "- **Resolution**: the checkpoint records no µm/px; "
         + ("it was trained on patches at their own pixel size: apply it at the pixel size of its training "
            "images" if resolution.scale == 1 else
            f"it was trained on patches rescaled by {resolution.scale:g}: apply it to images rescaled by that "
            "factor") + " (WSSS4LUAD patches are about 0.25 µm/px, 40x)."), "",
        f"- Test tensors: a synthetic H&E patch of {SAMPLE_SIDE} pixels (generated, not real tissue) padded "
        f"by {before}/{after} pixels of edge replication, as `wsss-cram predict` pads a patch before the network; "
        "the cover shows the patch and its output (tissue classes coloured, background bare).", "",
        "| channel | class | colour |", "|---|---|---|", rows, "",
        "## Training data and recipe", "",
        f"- Data: `{'/'.join(Path(str(data)).parts[-2:])}`" if data else "- Data: not recorded",
        f"- Settings: {', '.join(_recipe(train)) or 'not recorded'}",
        f"- Exported from napari-wsss-cram {info.package_version} checkpoint format {info.format_version}.", "",
        "## Validation", "",
    ]
    if isinstance(miou, int | float) and miou >= 0:
        lines.append(f"Validation mIoU recorded in the checkpoint: **{miou:.3f}** (mean IoU over tissue classes, "
                     "background pixels left out, as in the WSSS4LUAD challenge).")
        scores = [f"| {k} | {v:.3f} |" for k, v in per_class.items() if isinstance(v, int | float)]
        if scores:
            lines += ["", "| class | IoU |", "|---|---|", *scores]
    else:
        lines.append("The checkpoint records no validation score. Score the model on pixel-labelled images with "
                     "`wsss-cram evaluate MODEL.zip IMG_MASK_DIR`.")
    lines += [
        "", "To validate on your data: `wsss-cram evaluate model.zip IMG_MASK_DIR` (folders `img/` + `mask/`).", "",
        "## How to run it", "",
        "- napari-wsss-cram: `wsss-cram predict model.zip slide.svs --out results/`, `wsss-cram evaluate`, or "
        "the Segment dock's checkpoint field accept this zip as they accept the `.pt` checkpoint.",
        "- Python: `bioimageio.core` (`bioimageio predict`, `bioimageio test model.zip`).",
        "- QuPath 0.5+: the bioimage.io extension with Deep Java Library (PyTorch engine), *Extensions > "
        "Bioimage Model Zoo > Create pixel classifier*, at the resolution above. See the napari-wsss-cram "
        "README, section *QuPath*.", "",
        "## Citation", "",
        "Pan et al. (2024), WSSS-CRAM: precise segmentation of histopathological images via class region "
        "activation mapping. Front. Microbiol. 15:1483052. doi:10.3389/fmicb.2024.1483052", "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
