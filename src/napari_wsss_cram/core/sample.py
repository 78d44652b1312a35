"""The project's synthetic sample data: patches, validation images, a pyramidal slide, a README.

The tissue itself (deterministic H&E-like drawing with exact pixel truth) is drawn by :mod:`.sample_tissue`;
this module writes it out as the datasets and the slide the tests, the demo and the docks use. The drawing's
public names are re-exported here, where the rest of the project imports them.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .classes import WSSS4LUAD
from .sample_tissue import (  # noqa: F401  (re-exported: the drawing's public names)
    BACKGROUND,
    NORMAL,
    OD_BLOOD,
    OD_EOSIN,
    OD_GLASS,
    OD_HEMATOXYLIN,
    STROMA,
    TUMOR,
    TissueLayout,
    _salt,
    fbm,
    image_labels,
    make_patch,
    noise_1d,
    patch_name,
    render_region,
    value_noise,
)


def make_slide(path: str | Path, size: int = 4096, seed: int = 0, mask_path: str | Path | None = None,
               mpp: float = 0.25, tile: int = 512, texture_period: int | None = -1,
               progress: Callable[[int, int], None] | None = None) -> tuple[Path, Path]:
    """Render a ``size`` x ``size`` slide tile by tile into a pyramidal OME-TIFF, and its label mask.

    Memory stays bounded whatever the size: rows of ``tile`` px are rendered in ``tile``-wide pieces; the
    labels of each row go to a raw temporary file that feeds the mask writer afterwards.
    ``texture_period`` (default: None up to 8192 px, 1024 above) repeats class textures for speed.
    """
    if texture_period == -1:
        texture_period = None if size <= 8192 else 1024
    import tempfile

    from .io.atomic import atomic_path
    from .io.ometiff import write_pyramidal_ome_tiff

    path = Path(path)
    mask_path = Path(mask_path) if mask_path is not None else path.with_name(
        path.name.replace(".ome.tif", "") + "_mask.ome.tif")
    layout = TissueLayout(seed=_salt(seed, 1234), region_scale=max(400.0, size / 6), slide_size=size,
                          slide_radius=size / 2.0, bias=(0.0, 0.05, -0.02, -0.3),
                          texture_period=texture_period)
    ome_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"napari-wsss-cram/sample-slide/{seed}/{size}"))
    mask_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"napari-wsss-cram/sample-slide-mask/{seed}/{size}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".slide-labels-", dir=path.parent) as tdir:
        raw = Path(tdir) / "labels.raw"
        with open(raw, "wb") as labels_file:
            def rgb_rows(y: int, x: int, h: int, w: int) -> np.ndarray:
                out = np.empty((h, w, 3), np.uint8)
                row_labels = np.empty((h, w), np.uint8)
                for xx in range(x, x + w, tile):
                    ww = min(tile, x + w - xx)
                    out[:, xx - x: xx - x + ww], row_labels[:, xx - x: xx - x + ww] = \
                        render_region(layout, y, xx, h, ww)
                row_labels.tofile(labels_file)
                labels_file.flush()
                return out

            def report(done: int, total: int) -> None:
                if progress is not None:
                    progress(done, 2 * total)

            write_pyramidal_ome_tiff(path, rgb_rows, shape=(size, size, 3), mpp=mpp, tile=256,
                                     progress=report, ome_uuid=ome_id)

        def label_rows(y: int, x: int, h: int, w: int) -> np.ndarray:
            rows = np.fromfile(raw, np.uint8, count=h * size, offset=y * size).reshape(h, size)
            return rows[:, x: x + w]

        with atomic_path(mask_path) as tmp_mask:
            write_pyramidal_ome_tiff(tmp_mask, label_rows, shape=(size, size), mpp=mpp, tile=256,
                                     labels=True, ome_uuid=mask_id, channel_names=None,
                                     progress=None if progress is None else lambda d, t: progress(t + d, 2 * t))
    return path, mask_path


# ---------------------------------------------------------------------------- the sample data set
def _save_png(path: Path, array: np.ndarray, palette: list[int] | None = None) -> None:
    from PIL import Image

    img = Image.fromarray(array)
    if palette is not None:
        img.putpalette(palette)
    from .io.atomic import atomic_path

    with atomic_path(path) as tmp:  # a killed run never leaves a half-written PNG under a sample's name
        img.save(tmp, format="PNG", optimize=True)


def make_montage(images: list[np.ndarray], out_path: str | Path, columns: int = 8, cell: int = 150,
                 captions: list[str] | None = None) -> Path:
    """Tile images (centre-cropped/padded to ``cell``) into one PNG."""
    from PIL import Image, ImageDraw

    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        y, x = max(0, (h - cell) // 2), max(0, (w - cell) // 2)
        crop = img[y: y + cell, x: x + cell]
        sheet.paste(Image.fromarray(crop), ((i % columns) * cell, (i // columns) * cell))
        if captions:
            draw.text(((i % columns) * cell + 3, (i // columns) * cell + 2), captions[i], fill=(0, 0, 0))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG", optimize=True)
    return out


#: what make_sample_data writes, by folder: the only files it ever replaces or deletes (by name)
SAMPLE_FILES = {
    "patches": re.compile(r"sample\d{4,}-\[[01](, [01])*\]\.png"),
    "validation/img": re.compile(r"\d{2,}\.png"),
    "validation/mask": re.compile(r"\d{2,}\.png"),
    "validation/background-mask": re.compile(r"\d{2,}\.png"),
    "slide": re.compile(r"sample_slide(_mask)?\.ome\.tif"),
}
README_TITLE = "# Synthetic H&E sample data"


def check_sample_folder(out_dir: str | Path) -> dict[str, list[Path]]:
    """The files an earlier ``make_sample_data`` left in ``out_dir``, by folder; raises ``WsssCramError`` when
    one of its folders holds other files (someone's data: they would be mixed into the sample set, and the old
    code deleted every PNG there), or when ``README.md`` is not the sample set's."""
    from .errors import WsssCramError

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise WsssCramError(f"--out '{out}' exists and is not a folder.")
    own: dict[str, list[Path]] = {}
    tops = {"README.md", *(sub.split("/")[0] for sub in SAMPLE_FILES)}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in tops and not p.name.startswith(".")) \
        if out.is_dir() else []
    if foreign:
        raise WsssCramError(f"'{out}' holds files that make-sample-data did not write ({', '.join(foreign[:3])}"
                            f"{' and more' if len(foreign) > 3 else ''}); choose an empty or new --out folder.")
    for sub, pattern in SAMPLE_FILES.items():
        folder = out / sub
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        foreign = [p.name for p in files if not (p.is_file() and pattern.fullmatch(p.name))]
        if foreign:
            raise WsssCramError(f"'{folder}' holds files that make-sample-data did not write "
                                f"({', '.join(foreign[:3])}{' and more' if len(foreign) > 3 else ''}); it never "
                                "deletes them. Choose an empty or new --out folder.")
        own[sub] = files
    readme = out / "README.md"
    if readme.exists() and not readme.read_text(encoding="utf-8", errors="replace").startswith(README_TITLE):
        raise WsssCramError(f"'{readme}' is not the sample set's README; choose an empty or new --out folder.")
    return own


def make_sample_data(out_dir: str | Path, n_patches: int = 240, n_validation: int = 20,
                     slide_size: int = 4096, seed: int = 0, patch_size: tuple[int, int] = (150, 224),
                     validation_size: tuple[int, int] = (250, 400), posterize: int = 8,
                     montage_path: str | Path | None = None,
                     progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Write the synthetic sample set; returns a summary (counts, sizes, seconds).

    ``out_dir/patches/<id>-[t, s, n].png``: image-level-labelled training patches (label = classes covering
    >= 5% of the tissue pixels); ``out_dir/validation/{img,mask,background-mask}/NN.png``: pixel truth in the
    WSSS4LUAD palette convention; ``out_dir/slide/sample_slide.ome.tif`` (+ ``_mask``), a pyramidal OME-TIFF at
    0.25 µm/px (skipped when ``slide_size`` is 0). Same arguments, same bytes.

    The defaults keep the committed PNGs near 7 MB: patches of 150-224 px (inside WSSS4LUAD's 150-300 range)
    with colours rounded to multiples of ``posterize`` (invisible, ~2x smaller PNGs).
    """
    out = Path(out_dir)
    own = check_sample_folder(out)  # before anything is written: refuse a folder holding someone's files
    t0 = time.perf_counter()
    rng = np.random.default_rng(_salt(seed, 1))
    patch_dir = out / "patches"
    patch_dir.mkdir(parents=True, exist_ok=True)
    for old in own.get("patches", []):
        old.unlink()
    label_counts = np.zeros(3, int)
    montage: list[np.ndarray] = []
    captions: list[str] = []
    index = 0
    attempt = 0
    while index < n_patches:
        attempt += 1
        h, w = (int(v) for v in rng.integers(patch_size[0], patch_size[1] + 1, 2))
        rgb, mask = make_patch(_salt(seed, 2, attempt), (h, w), posterize=posterize)
        labels = image_labels(mask)
        if not any(labels):
            continue  # WSSS4LUAD patches always show tissue
        index += 1
        _save_png(patch_dir / patch_name(index, labels), rgb)
        label_counts += labels
        if len(montage) < 24:
            montage.append(rgb)
            captions.append(str(labels))
        if progress is not None:
            progress("patches", index, n_patches)
    t_patches = time.perf_counter() - t0

    val = out / "validation"
    for sub in ("img", "mask", "background-mask"):
        (val / sub).mkdir(parents=True, exist_ok=True)
        for old in own.get(f"validation/{sub}", []):
            old.unlink()
    bg_palette = [0, 0, 0, 255, 255, 255] + [0] * 762
    val_pixels = np.zeros(4, np.int64)
    val_rng = np.random.default_rng(_salt(seed, 4))  # independent of n_patches: 00.png is always the same
    for i in range(n_validation):
        h, w = (int(v) for v in val_rng.integers(validation_size[0], validation_size[1] + 1, 2))
        mix = ((TUMOR, STROMA, NORMAL), (TUMOR, STROMA), (STROMA, NORMAL), (TUMOR, NORMAL))[i % 4]
        rgb, mask = make_patch(_salt(seed, 3, i), (h, w), classes_present=mix, posterize=posterize)
        name = f"{i:02d}.png"
        _save_png(val / "img" / name, rgb)
        _save_png(val / "mask" / name, mask, WSSS4LUAD.palette())
        _save_png(val / "background-mask" / name, (mask == BACKGROUND).astype(np.uint8), bg_palette)
        val_pixels += np.bincount(mask.ravel(), minlength=4)[:4]
        if progress is not None:
            progress("validation", i + 1, n_validation)
    t_val = time.perf_counter() - t0 - t_patches

    slide_seconds = 0.0
    if slide_size:
        t1 = time.perf_counter()
        make_slide(out / "slide" / "sample_slide.ome.tif", size=slide_size, seed=seed,
                   mask_path=out / "slide" / "sample_slide_mask.ome.tif",
                   progress=None if progress is None else (lambda d, t: progress("slide", d, t)))
        slide_seconds = time.perf_counter() - t1
    if montage_path is not None:
        make_montage(montage, montage_path, captions=captions)
    summary = {
        "seed": seed,
        "patches": n_patches,
        "patch_label_counts": dict(zip(WSSS4LUAD.names, label_counts.tolist(), strict=True)),
        "validation_images": n_validation,
        "validation_pixel_share": dict(zip(WSSS4LUAD.all_names,
                                           np.round(val_pixels / max(1, val_pixels.sum()), 3).tolist(),
                                           strict=True)),
        "slide_size": slide_size,
        "seconds": {"patches": round(t_patches, 1), "validation": round(t_val, 1),
                    "slide": round(slide_seconds, 1)},
    }
    write_readme(out, summary)
    return summary


def write_readme(out_dir: str | Path, summary: dict) -> Path:
    """``README.md`` of a generated sample folder: what is there and how to regenerate it."""
    facts = {k: v for k, v in summary.items() if k != "seconds"}
    text = f"""{README_TITLE} (generated, not patient data)

Made by `wsss-cram make-sample-data --out THIS_FOLDER --seed {summary['seed']}` (`core/sample.py`);
the same command gives the same bytes. Classes: 0 tumor, 1 stroma, 2 normal, 3 background (WSSS4LUAD).

- `patches/<id>-[tumor, stroma, normal].png`: image-level-labelled training patches (a class is 1 when it
  covers >= 5% of the patch's tissue pixels, the WSSS4LUAD protocol).
- `validation/img/NN.png`, `validation/mask/NN.png` (palette, 0..3), `validation/background-mask/NN.png`
  (palette, 1 = background): exact pixel truth.
- `slide/sample_slide.ome.tif` and `slide/sample_slide_mask.ome.tif`: a pyramidal tiled OME-TIFF at
  0.25 µm/px and its labels (git-ignored; regenerate with the command above, or `--slide-only`).

```json
{json.dumps(facts, indent=2)}
```
"""
    from .io.atomic import atomic_path

    path = Path(out_dir) / "README.md"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
