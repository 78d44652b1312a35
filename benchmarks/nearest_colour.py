"""Nearest-colour baselines for pixel-labelled H&E sets: a floor that any weakly-supervised pipeline must beat.

Two lookups, both fitted on the *pixel masks* of the fitting images (so they are given more supervision than the
weak pipeline, which sees image-level labels only) and scored with THE metric (``core.metrics.ConfusionMatrix``):

- ``mean``: each pixel takes the class (background included) whose mean RGB colour is nearest;
- ``histogram``: RGB quantised to ``bins``^3 cells; each cell takes the majority class of the fitting pixels that
  fell in it; cells never seen fall back to the nearest mean colour.

Run alone: ``python benchmarks/nearest_colour.py [--data ../shared/data/wsss4luad] [--fit 00-20] [--test 21-30]``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_wsss_cram.core.classes import IGNORE_INDEX, ClassSpec
from napari_wsss_cram.core.data.pixel import PixelIndex, load_pixel_sample
from napari_wsss_cram.core.metrics import ConfusionMatrix

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "wsss4luad"


@dataclass
class ColourLookup:
    """A fitted colour -> class lookup (see the module docstring)."""

    classes: ClassSpec
    means: np.ndarray  # (K+1, 3) float, NaN rows for classes never seen
    cell_class: np.ndarray  # (bins**3,) uint8, 255 where no fitting pixel fell
    bins: int

    def predict_mean(self, rgb: np.ndarray) -> np.ndarray:
        """Nearest mean colour, (H, W) uint8 in 0..K."""
        flat = rgb.reshape(-1, 3).astype(np.float32)
        means = np.where(np.isnan(self.means), np.inf, self.means).astype(np.float32)
        dist = ((flat[:, None, :] - means[None]) ** 2).sum(-1)
        return dist.argmin(1).astype(np.uint8).reshape(rgb.shape[:2])

    def predict_histogram(self, rgb: np.ndarray) -> np.ndarray:
        """Majority class of the pixel's colour cell, nearest mean colour where the cell is empty."""
        labels = self.cell_class[_cells(rgb, self.bins)].reshape(rgb.shape[:2])
        unseen = labels == IGNORE_INDEX
        if unseen.any():
            labels = labels.copy()
            labels[unseen] = self.predict_mean(rgb[unseen][None])[0]
        return labels


def _cells(rgb: np.ndarray, bins: int) -> np.ndarray:
    q = (rgb.reshape(-1, 3).astype(np.int64) * bins) // 256
    return (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]


def fit_colour_lookup(dataset: PixelIndex, bins: int = 16) -> ColourLookup:
    """Fit both lookups on every labelled pixel (background included, 255 skipped) of ``dataset``."""
    classes = dataset.classes
    n = classes.num_outputs
    votes = np.zeros((bins ** 3, n), np.int64)
    sums = np.zeros((n, 3), np.float64)
    counts = np.zeros(n, np.int64)
    for sample in dataset.samples:
        rgb, mask = load_pixel_sample(sample, classes)
        keep = mask.reshape(-1) != IGNORE_INDEX
        target = mask.reshape(-1)[keep].astype(np.int64)
        cells = _cells(rgb, bins)[keep]
        np.add.at(votes, (cells, target), 1)
        counts += np.bincount(target, minlength=n)[:n]
        for k in range(n):
            sums[k] += rgb.reshape(-1, 3)[keep][target == k].sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    cell_class = np.where(votes.sum(1) > 0, votes.argmax(1), IGNORE_INDEX).astype(np.uint8)
    return ColourLookup(classes, means, cell_class, bins)


def score_colour_lookup(lookup: ColourLookup, dataset: PixelIndex) -> dict[str, ConfusionMatrix]:
    """Confusion matrices (one over all images) of the ``mean`` and ``histogram`` lookups on ``dataset``."""
    result = {"mean": ConfusionMatrix(dataset.classes), "histogram": ConfusionMatrix(dataset.classes)}
    for sample in dataset.samples:
        rgb, mask = load_pixel_sample(sample, dataset.classes)
        result["mean"].update(lookup.predict_mean(rgb), mask)
        result["histogram"].update(lookup.predict_histogram(rgb), mask)
    return result


def image_names(spec: str) -> list[str]:
    """``"00-20"`` -> ``["00", ..., "20"]``; ``"03,07"`` -> ``["03", "07"]`` (two-digit WSSS4LUAD names)."""
    names: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-")
            names += [f"{i:02d}" for i in range(int(a), int(b) + 1)]
        elif part:
            names.append(f"{int(part):02d}")
    return names


def main(argv: list[str] | None = None) -> int:
    from napari_wsss_cram.core.data.pixel import discover_pixel_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the WSSS4LUAD sample folder")
    parser.add_argument("--fit", default="00-20", help="validation images whose masks fit the lookup")
    parser.add_argument("--test", default="21-30", help="validation images scored")
    parser.add_argument("--bins", type=int, default=16, help="histogram cells per RGB channel")
    args = parser.parse_args(argv)
    val = args.data / "2.validation"
    if not (val / "img").is_dir():
        print(f"error: {val} not found; pass --data pointing at the WSSS4LUAD sample "
              "(../shared/data/wsss4luad).", file=sys.stderr)
        return 2
    dataset = discover_pixel_dataset(val)
    lookup = fit_colour_lookup(dataset.subset(image_names(args.fit)), args.bins)
    for name, cm in score_colour_lookup(lookup, dataset.subset(image_names(args.test))).items():
        print(f"== nearest colour ({name}), fitted on masks {args.fit}, scored on {args.test}")
        print(cm.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
