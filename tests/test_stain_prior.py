"""The stain prior: the hematoxylin density decides tumor against stroma in crops labelled with both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_wsss_cram.core.progress import drive
from napari_wsss_cram.core.pseudo_labels import make_pseudo_labels
from napari_wsss_cram.core.stain_prior import (
    StainPrior,
    apply_stain_prior,
    fit_stain_prior,
    hematoxylin_density,
    pair_indices,
)

DEMO_MODEL = Path(__file__).parents[1] / "src" / "napari_wsss_cram" / "assets" / "demo_model.pt"
PINK = (232, 160, 196)       # eosin-rich stroma
PURPLE = (80, 40, 130)       # a hematoxylin-stained nucleus


def _tissue_patch(size: int = 96, seed: int = 0) -> np.ndarray:
    """Pink tissue with nuclei packed densely on the left half and sparsely on the right half."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((size, size, 3), np.uint8)
    rgb[:] = PINK
    for half, count in ((0, 60), (1, 6)):
        for _ in range(count):
            y = rng.integers(3, size - 3)
            x = rng.integers(3 + half * size // 2, size // 2 - 3 + half * size // 2)
            rgb[y - 2:y + 3, x - 2:x + 3] = PURPLE
    noise = rng.normal(0, 2, rgb.shape)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def test_density_is_high_where_nuclei_are_dense_and_glass_does_not_dilute_it():
    rgb = _tissue_patch()
    tissue = np.ones(rgb.shape[:2], bool)
    density = hematoxylin_density(rgb, tissue)
    assert density[:, 10:38].mean() > 2 * density[:, 58:86].mean()
    # glass (white, not tissue) beside dense tissue: the tissue pixels next to it keep their density
    with_glass = rgb.copy()
    with_glass[:, :8] = 250
    tissue_glass = tissue.copy()
    tissue_glass[:, :8] = False
    near_edge = hematoxylin_density(with_glass, tissue_glass)[:, 10:14].mean()
    diluted = hematoxylin_density(with_glass, tissue)[:, 10:14].mean()
    assert near_edge > 1.2 * diluted


def test_apply_decides_the_pair_leaves_the_middle_unlabelled_and_other_classes_alone():
    prior = StainPrior(dense=0, sparse=1, low=0.2, high=0.4)
    label = np.array([[0, 1, 255, 2, 3, 1]], np.uint8)         # tumor, stroma, unsure, normal, background, stroma
    density = np.array([[0.1, 0.5, 0.5, 0.9, 0.9, 0.3]], np.float32)
    out = apply_stain_prior(label, density, prior, background=3)
    assert out.tolist() == [[1, 0, 0, 2, 3, 255]]
    assert prior.applies_to(np.array([1, 1, 0])) and not prior.applies_to(np.array([0, 1, 1]))


def test_fit_takes_the_band_quantiles_and_refuses_nothing_to_fit():
    prior = fit_stain_prior([np.linspace(0, 1, 1001)], 0, 1, band=(0.25, 0.75))
    assert prior.low == pytest.approx(0.25, abs=1e-3) and prior.high == pytest.approx(0.75, abs=1e-3)
    with pytest.raises(ValueError, match="No crop holds both"):
        fit_stain_prior([], 0, 1)
    with pytest.raises(ValueError, match="band"):
        fit_stain_prior([np.ones(3)], 0, 1, band=(0.7, 0.3))
    assert pair_indices(["Stroma", "Tumor"]) == (1, 0)
    with pytest.raises(ValueError, match="this model's classes are epithelium, fat"):
        pair_indices(["epithelium", "fat"])


def test_make_pseudo_labels_with_the_stain_prior_puts_tumor_where_nuclei_are_dense(tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    for seed in range(2):
        Image.fromarray(_tissue_patch(seed=seed)).save(patches / f"p{seed}-[1, 1, 0].png")
    Image.fromarray(_tissue_patch(seed=5)).save(patches / "s-[0, 1, 0].png")
    plain = drive(make_pseudo_labels(DEMO_MODEL, patches, tmp_path / "plain", device="cpu"))
    events = []
    stain = drive(make_pseudo_labels(DEMO_MODEL, patches, tmp_path / "stain", device="cpu", refine="stain"),
                  events.append)
    # one steady bar: the two tumor+stroma patches of the fit pass, then the three patches
    assert [(e.done, e.total) for e in events] == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    for seed in range(2):
        label = np.asarray(Image.open(stain / "mask" / f"p{seed}-[1, 1, 0].png"))
        tumor, stroma = label == 0, label == 1
        assert tumor.sum() > 0.25 * label.size and stroma.sum() > 0.25 * label.size
        assert tumor[:, :48].sum() > 0.95 * tumor.sum()       # tumor on the nucleus-dense half
        assert stroma[:, 48:].sum() > 0.95 * stroma.sum()     # stroma on the sparse half
        assert (label == 255).any()                           # the band between the quantiles stays unsure
    # a crop with one class of the pair is the model's own labels
    single = "s-[0, 1, 0].png"
    assert np.array_equal(np.asarray(Image.open(stain / "mask" / single)),
                          np.asarray(Image.open(plain / "mask" / single)))


def test_the_stain_prior_is_refused_for_the_maps_source(tmp_path):
    with pytest.raises(ValueError, match="refine 'stain' applies to the segmentation source"):
        drive(make_pseudo_labels(DEMO_MODEL, tmp_path / "patches", tmp_path / "out", source="maps", refine="stain"))
    assert not (tmp_path / "out").exists()
