"""Boundary synthesis (HisynSeg, Fang et al. 2024): a random closed Bezier region of one class pasted into a
training image of another, so that the network sees tissue boundaries whose labels are known on both sides.

The pasted regions come from a :class:`~.mosaic.CellBank` whose cells are ``region`` px squares of one class:
single-label patches (stage 1) or windows of the pseudo-labels that are at least ``purity`` one class (stage 2),
so tumor regions are not limited to the rare tumor-only patches but also come from the confident parts of mixed
ones. The canvas is the dataset's own item before augmentation, with its pixel labels (stage 2: its pseudo-labels;
stage 1: a single-label patch, whose tissue is its class; other stage-1 patches are left as they are). Inside the
blob both the pixels and their labels are the source's (its glass stays background), outside they are the canvas'.
:class:`SynthesisMix` does this for a share of a dataset's items, then augments them as the dataset does.
"""

from __future__ import annotations

import numpy as np

from .mosaic import BankMix, CellBank

#: control points of a blob's outline, and their distance from its centre as a share of the region side
BLOB_POINTS = (5, 9)
BLOB_RADIUS = (0.3, 0.5)
#: samples of each quadratic Bezier segment of the outline
SEGMENT_SAMPLES = 12


def bezier_blob(size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``size`` x ``size`` boolean mask of one random closed region with a smooth outline: control points at
    sorted random angles and radii around the centre, joined by quadratic Bezier segments between their midpoints
    (the outline is star-shaped, so it never crosses itself)."""
    from skimage.draw import polygon

    n = int(rng.integers(BLOB_POINTS[0], BLOB_POINTS[1] + 1))
    angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, n))
    radii = rng.uniform(*BLOB_RADIUS, n) * (size - 1)
    centre = (size - 1) / 2.0
    points = centre + radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (n, 2) as (x, y)
    mids = (points + np.roll(points, -1, axis=0)) / 2.0
    t = np.linspace(0.0, 1.0, SEGMENT_SAMPLES, endpoint=False)[:, None]
    outline = []
    for i in range(n):
        start, control, end = mids[i - 1], points[i], mids[i]
        outline.append((1 - t) ** 2 * start + 2 * (1 - t) * t * control + t ** 2 * end)
    outline = np.concatenate(outline)
    mask = np.zeros((size, size), dtype=bool)
    rr, cc = polygon(outline[:, 1], outline[:, 0], (size, size))
    mask[rr, cc] = True
    return mask


def _dominant_class(mask: np.ndarray, k_bg: int) -> int | None:
    tissue = mask[mask < k_bg]
    return int(np.bincount(tissue).argmax()) if tissue.size else None


def paste_blobs(rgb: np.ndarray, mask: np.ndarray, bank: CellBank, rng: np.random.Generator,
                count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb, mask)`` with ``count`` Bezier regions of other classes pasted in (see the module docstring): each
    region's class is drawn uniformly among the bank's classes other than the canvas' dominant one, then one of
    that class' cells; its pixels and labels replace the canvas' inside a blob drawn at a random place. A canvas
    smaller than the bank's cells is returned unchanged."""
    c = bank.cell
    h, w = mask.shape
    present = sorted(k for k, v in bank.cells.items() if len(v))
    if h < c or w < c or not present:
        return rgb, mask
    rgb, mask = rgb.copy(), mask.copy()
    dominant = _dominant_class(mask, bank.classes.background_index)
    choices = [k for k in present if k != dominant] or present
    for _ in range(int(count)):
        k = choices[int(rng.integers(len(choices)))]
        source, sy, sx = bank.cells[k][int(rng.integers(len(bank.cells[k])))]
        blob = bezier_blob(c, rng)
        y, x = int(rng.integers(h - c + 1)), int(rng.integers(w - c + 1))
        rgb[y:y + c, x:x + c][blob] = bank.images[source][sy:sy + c, sx:sx + c][blob]
        mask[y:y + c, x:x + c][blob] = bank.masks[source][sy:sy + c, sx:sx + c][blob]
    return rgb, mask


class SynthesisMix(BankMix):
    """A dataset wrapper: item ``i`` is, with probability ``share``, the dataset's own image with one or two Bezier
    regions of other classes pasted in (:func:`paste_blobs`), augmented as the dataset augments and given in its
    record with the composite's exact labels (stage 1: ``strong_mask`` and the image-level ``labels`` of what the
    crop kept; stage 2: ``target``). Items without a pixel-labelled source (``dataset.labelled_source(i)`` is None:
    stage-1 patches of several classes) are the dataset's. Seeded from ``(seed, epoch, index)``.
    """

    kind = "synthesis"

    def __getitem__(self, i: int):
        from .augment import augment

        rng = np.random.default_rng([self.seed, self.epoch, int(i), 0x626C6F62])
        if not self.bank or rng.random() >= self.share:
            return self.dataset[i]
        source = self.dataset.labelled_source(i)
        if source is None:
            return self.dataset[i]
        rgb, mask = paste_blobs(*source, self.bank, rng, count=int(rng.integers(1, 3)))
        rgb, mask = augment(rgb, self.augment_config, rng, mask)
        mask = mask.astype(np.int64)
        if self.stage == 1:
            labels = np.isin(np.arange(self.bank.classes.num_classes), mask).astype(np.float32)
            return {"image": rgb, "labels": labels, "index": int(i), "strong_mask": mask}
        weight = np.float32(self.dataset.weights[i]) if hasattr(self.dataset, "weights") else np.float32(1.0)
        return {"image": rgb, "target": mask, "weight": weight, "index": int(i)}


__all__ = ["SynthesisMix", "bezier_blob", "paste_blobs"]
