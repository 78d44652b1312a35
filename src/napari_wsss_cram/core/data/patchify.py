"""Cut image-level-labelled patches out of pixel-labelled images (``img/`` + ``mask/`` [+ ``background-mask/``]).

A patch is labelled with every tissue class that covers at least ``min_frac`` of its *tissue* pixels (the
WSSS4LUAD protocol uses 5%), and written in the WSSS4LUAD naming ``<image>-<y>-<x>-[t, s, n].png``, so that
corrected masks from napari become training data. Patch sides are drawn from ``size`` (150-300 px like the
challenge's patches) per image; ``overlap`` lets small image sets give more patches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..classes import IGNORE_INDEX, ClassSpec
from ..errors import DatasetError
from ..io.guard import OutputSet
from ..progress import CancelToken, Progress
from .patches import write_classes_file
from .pixel import PixelIndex, load_pixel_sample

MASKS_SUBDIR = "_masks"  # mask crops kept for checking pseudo-labels; never trained on
STRONG_MASKS_SUBDIR = "_strong_masks"  # mask crops the trainer uses as strong labels (WSSS-CRAM3)


@dataclass
class PatchifyResult:
    out_dir: Path
    paths: list[Path]
    labels: np.ndarray
    skipped: int


def patch_labels(mask: np.ndarray, classes: ClassSpec, min_frac: float) -> tuple[list[int], int]:
    """0/1 flag per tissue class (share of tissue pixels >= ``min_frac``) and the tissue pixel count."""
    k = classes.num_classes
    valid = mask[(mask != IGNORE_INDEX) & (mask < k)]
    tissue = int(valid.size)
    if tissue == 0:
        return [0] * k, 0
    counts = np.bincount(valid.astype(np.int64), minlength=k)[:k]
    return [int(c / tissue >= min_frac) for c in counts], tissue


def _positions(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]
    pos = list(range(0, length - size + 1, stride))
    if pos[-1] != length - size:
        pos.append(length - size)  # cover the far edge too
    return pos


def patchify(
    dataset: PixelIndex,
    out_dir: str | Path,
    min_frac: float = 0.05,
    size: tuple[int, int] = (150, 300),
    overlap: float = 0.0,
    min_tissue: float = 0.05,
    seed: int = 0,
    keep_masks: bool = False,
    strong_masks: bool = False,
    overwrite: bool = False,
    callback: Callable[[Progress], None] | None = None,
    cancel: CancelToken | None = None,
) -> PatchifyResult:
    """Write labelled patches of every image of ``dataset`` into ``out_dir`` (atomically: a temp folder renamed).

    Patches with less than ``min_tissue`` tissue, or no class reaching ``min_frac``, are skipped. With
    ``keep_masks`` the mask crops go to ``out_dir/_masks/`` under the same names (for pseudo-label checks).
    With ``strong_masks`` they go to ``out_dir/_strong_masks/``, where the trainer finds them and uses them as
    pixel labels instead of the pseudo-labels: for corrected masks (WSSS-CRAM3), never for a weak-label benchmark.
    """
    out_dir = Path(out_dir)
    smin, smax = int(min(size)), int(max(size))
    if smin < 8:
        raise DatasetError(f"Patch size {size} is too small; use sides of at least 8 px (WSSS4LUAD: 150-300).")
    from ..validate import check_number

    # a negative --min-frac labelled every patch with every class, silently (core.validate.RANGES)
    check_number(min_frac, "min_frac", label="--min-frac", error=DatasetError)
    check_number(min_tissue, "min_tissue", label="--min-tissue", error=DatasetError)
    check_number(overlap, "patch_overlap", label="--overlap", error=DatasetError)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DatasetError(f"--seed must be a non-negative integer, got {seed}.")
    classes = dataset.classes
    rng = np.random.default_rng(seed)
    paths, labels, skipped = [], [], 0
    # the one output guard: never into or over the input set, --overwrite replaces only an earlier patchify set
    # (the set's img/, mask/ and background-mask/ folders are its inputs: a patches/ folder beside them is fine,
    # as the Train dock's corrections/patches is)
    inputs = [dataset.root / d for d in ("img", "mask", "background-mask")]
    inputs += [p for s in dataset.samples for p in (s.image, s.mask, s.background) if p is not None]
    guard = OutputSet(out_dir, inputs, "wsss-cram patchify", overwrite)
    with guard:
        tmp = guard.build
        mask_dirs = [d for d, on in ((MASKS_SUBDIR, keep_masks), (STRONG_MASKS_SUBDIR, strong_masks)) if on]
        for d in mask_dirs:
            (tmp / d).mkdir()
        for n, sample in enumerate(dataset.samples):
            if cancel is not None:
                cancel.raise_if_cancelled()
            rgb, mask = load_pixel_sample(sample, classes)
            h, w = mask.shape
            side = min(int(rng.integers(smin, smax + 1)), h, w)
            stride = max(1, round(side * (1.0 - overlap)))
            for y in _positions(h, side, stride):
                for x in _positions(w, side, stride):
                    m = mask[y:y + side, x:x + side]
                    flags, tissue = patch_labels(m, classes, min_frac)
                    if tissue < min_tissue * m.size or not any(flags):
                        skipped += 1
                        continue
                    name = f"{sample.name}-{y}-{x}-[{', '.join(map(str, flags))}].png"
                    Image.fromarray(np.ascontiguousarray(rgb[y:y + side, x:x + side])).save(tmp / name)
                    for d in mask_dirs:
                        from ..io.png import write_index_png

                        write_index_png(tmp / d / name, np.ascontiguousarray(m), classes)
                    paths.append(out_dir / name)
                    labels.append(flags)
            if callback is not None:
                callback(Progress("patchify", n + 1, len(dataset.samples), {"patches": len(paths)}))
        if not paths:
            raise DatasetError(f"{dataset.root}: no patch held enough tissue; lower --min-frac or the patch size.")
        write_classes_file(tmp, classes)
        guard.commit()
    return PatchifyResult(out_dir, paths, np.asarray(labels, np.uint8), skipped)
