"""Synthetic pixel-labelled mosaics (PistoSeg, Fang et al. 2023): square cells cut from regions whose class is
known, pasted side by side into a training image whose mask is known exactly.

Cells come from two kinds of source, both without a pixel-level annotation:

- **single-label patches** (stage 1): every tissue pixel of a patch labelled with one class is that class;
- **pixel-labelled images** (stage 2's pseudo-labels): a cell whose tissue is at least ``purity`` one class, so that
  tumor cells are not limited to the rare tumor-only patches.

A cell must be at least half tissue; its near-white pixels are background (the tissue rule of ``core.tissue``).
Classes are drawn uniformly, then a cell of that class, so rare classes are seen as often as common ones.
:class:`MosaicMix` replaces a share of a dataset's items with mosaics, passed through the same augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..classes import ClassSpec
from ..errors import DatasetError
from ..tissue import GRAY_WEIGHTS, TISSUE_THRESHOLD

#: gray level above which a pixel is glass (as the pseudo-labels' tissue prior and the engine's default)
WHITE_THRESHOLD = float(TISSUE_THRESHOLD)
#: a cell must be at least this share tissue
MIN_TISSUE = 0.5


def white_pixels(rgb: np.ndarray) -> np.ndarray:
    """bool (H, W): glass, not tissue (gray level above the one tissue threshold of ``core.tissue``)."""
    return (rgb.astype(np.float32) @ np.asarray(GRAY_WEIGHTS, dtype=np.float32)) > WHITE_THRESHOLD


@dataclass
class CellBank:
    """Cells of known class: ``images[s]`` / ``masks[s]`` are source ``s`` (uint8 RGB and class-index masks, K =
    background, 255 = unknown), ``cells[k]`` an (N, 3) array of ``(source, y, x)`` top-left corners of class k."""

    classes: ClassSpec
    cell: int
    images: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    cells: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        """Cells per class name."""
        return {self.classes.names[k]: int(len(v)) for k, v in sorted(self.cells.items())}

    def __bool__(self) -> bool:
        return any(len(v) for v in self.cells.values())

    def keep_classes(self, names: list[str]) -> None:
        """Drop the cells of every class not named (names as in ``classes``, any case)."""
        lower = [n.lower() for n in self.classes.names]
        unknown = [n for n in names if n.lower() not in lower]
        if unknown:
            raise DatasetError(f"synthesis_classes names {', '.join(unknown)}, not among the classes "
                               f"{', '.join(self.classes.names)}.")
        keep = {lower.index(n.lower()) for n in names}
        self.cells = {k: v for k, v in self.cells.items() if k in keep}

    def add_source(self, rgb: np.ndarray, mask: np.ndarray, purity: float) -> None:
        """Index the cells of one labelled image (``mask`` as in the class docstring)."""
        c = self.cell
        h, w = mask.shape
        if h < c or w < c:
            return
        k_bg = self.classes.background_index
        mask = np.where(white_pixels(rgb), np.uint8(k_bg), mask).astype(np.uint8)
        source = len(self.images)
        found: dict[int, list[tuple[int, int, int]]] = {}
        for y in range(0, h - c + 1, c):
            for x in range(0, w - c + 1, c):
                window = mask[y:y + c, x:x + c]
                tissue = (window < k_bg).sum()
                if tissue < MIN_TISSUE * c * c:
                    continue
                counts = np.bincount(window[window < k_bg].ravel(), minlength=k_bg)
                top = int(counts.argmax())
                if counts[top] >= purity * tissue:
                    found.setdefault(top, []).append((source, y, x))
        if not found:
            return
        self.images.append(rgb)
        self.masks.append(mask)
        for k, cells in found.items():
            new = np.asarray(cells, dtype=np.int64)
            self.cells[k] = np.concatenate([self.cells[k], new]) if k in self.cells else new


def cells_from_single_label_patches(paths: list[Path], labels: np.ndarray, classes: ClassSpec,
                                    cell: int) -> CellBank:
    """A bank of the cells of every patch labelled with exactly one class (its tissue is that class)."""
    from .patches import load_patch_rgb

    bank = CellBank(classes, cell)
    for path, flags in zip(paths, labels, strict=True):
        if int(flags.sum()) != 1:
            continue
        rgb = load_patch_rgb(path)
        mask = np.full(rgb.shape[:2], int(np.argmax(flags)), dtype=np.uint8)
        bank.add_source(rgb, mask, purity=1.0)
    return bank


def cells_from_pixel_labels(samples: list, classes: ClassSpec, cell: int, purity: float = 0.9) -> CellBank:
    """A bank of the cells of pixel-labelled samples (e.g. pseudo-labels) whose tissue is >= ``purity`` one class."""
    from .pixel import load_pixel_sample

    bank = CellBank(classes, cell)
    for sample in samples:
        rgb, mask = load_pixel_sample(sample, classes)
        bank.add_source(rgb, mask, purity=purity)
    return bank


def build_mosaic(bank: CellBank, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``size`` x ``size`` mosaic of random cells: ``(rgb uint8, mask uint8 (K = background), labels float32 (K,)
    with 1 for each class whose cells are in it)``. Classes are drawn uniformly among those the bank holds."""
    c = bank.cell
    n = -(-size // c)
    present = sorted(k for k, v in bank.cells.items() if len(v))
    if not present:
        raise ValueError("The mosaic cell bank is empty.")
    rgb = np.empty((n * c, n * c, 3), dtype=np.uint8)
    mask = np.empty((n * c, n * c), dtype=np.uint8)
    labels = np.zeros(bank.classes.num_classes, dtype=np.float32)
    for row in range(n):
        for col in range(n):
            k = present[int(rng.integers(len(present)))]
            source, y, x = bank.cells[k][int(rng.integers(len(bank.cells[k])))]
            rgb[row * c:(row + 1) * c, col * c:(col + 1) * c] = bank.images[source][y:y + c, x:x + c]
            mask[row * c:(row + 1) * c, col * c:(col + 1) * c] = bank.masks[source][y:y + c, x:x + c]
            labels[k] = 1.0
    return rgb[:size, :size], mask[:size, :size], labels


class BankMix:
    """Base of the dataset wrappers that replace a ``share`` of a dataset's items with items made from a cell
    ``bank`` (mosaics, synthesised boundaries): the epoch, the length and every other attribute are the wrapped
    dataset's. ``kind`` names the wrapper in its error message."""

    kind = "mix"

    def __init__(self, dataset, bank: CellBank, share: float, augment_config, stage: int, seed: int = 0) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError(f"{self.kind} share must be in (0, 1], got {share}.")
        self.dataset = dataset
        self.bank = bank
        self.share = float(share)
        self.augment_config = augment_config
        self.stage = int(stage)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        # n_strong, index, samples, weights...: the wrapped dataset's (not while unpickling, before `dataset` is set)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class MosaicMix(BankMix):
    """A dataset wrapper: each item is, with probability ``share``, a mosaic from ``bank`` instead of the wrapped
    dataset's item, augmented like it and given in the same record (stage 1: image-level ``labels`` plus the
    mosaic's exact ``strong_mask``; stage 2: ``target`` and ``weight`` 1). The draw is seeded from
    ``(seed, epoch, index)`` as the wrapped datasets' augmentation is.
    """

    kind = "mosaic"

    def __init__(self, dataset, bank: CellBank, share: float, augment_config, stage: int, seed: int = 0) -> None:
        super().__init__(dataset, bank, share, augment_config, stage, seed)
        # native pixels that still fill the crop after the smallest rescale, plus one cell of slack for the crop
        self.size = int(np.ceil(augment_config.crop / augment_config.scale_min)) + bank.cell

    def __getitem__(self, i: int):
        from .augment import augment

        rng = np.random.default_rng([self.seed, self.epoch, int(i), 0x6D6F73])
        if not self.bank or rng.random() >= self.share:
            return self.dataset[i]
        rgb, mask, _ = build_mosaic(self.bank, self.size, rng)
        rgb, mask = augment(rgb, self.augment_config, rng, mask)
        mask = mask.astype(np.int64)
        if self.stage == 1:
            # the image-level labels of what the crop kept (the strong mask and the labels never disagree)
            labels = np.isin(np.arange(self.bank.classes.num_classes), mask).astype(np.float32)
            return {"image": rgb, "labels": labels, "index": int(i), "strong_mask": mask}
        return {"image": rgb, "target": mask, "weight": np.float32(1.0), "index": int(i)}


__all__ = ["BankMix", "CellBank", "MosaicMix", "build_mosaic", "cells_from_pixel_labels", "cells_from_single_label_patches",
           "white_pixels"]
