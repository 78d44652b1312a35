"""Boundary synthesis (HisynSeg): Bezier regions of one class pasted into images of another, with exact labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.data.augment import AugmentConfig
from napari_wsss_cram.core.data.mosaic import (
    CellBank,
    cells_from_pixel_labels,
    cells_from_single_label_patches,
)
from napari_wsss_cram.core.data.patches import PatchDataset, discover_patches
from napari_wsss_cram.core.data.pixel import PixelDataset, discover_pixel_dataset
from napari_wsss_cram.core.data.synthesis import SynthesisMix, bezier_blob, paste_blobs
from napari_wsss_cram.core.errors import DatasetError
from napari_wsss_cram.core.io.png import write_index_png
from napari_wsss_cram.core.progress import drive
from napari_wsss_cram.core.train import train_steps
from napari_wsss_cram.core.train_config import TrainConfig

#: flat H&E-like colours of tumor, stroma, normal
CLASS_RGB = np.array([(90, 40, 140), (230, 140, 190), (200, 120, 60)], np.uint8)


def test_bezier_blob_is_one_smooth_closed_region_and_seeded():
    masks = [bezier_blob(64, np.random.default_rng(seed)) for seed in range(20)]
    for mask in masks:
        _, regions = ndimage.label(mask)
        assert regions == 1  # one piece
        assert np.array_equal(ndimage.binary_fill_holes(mask), mask)  # closed: no hole inside
        assert 0.1 < mask.mean() < 0.8  # a region, neither a speck nor the whole square
        assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()
    # not a box: the outline is curved, so the region fills well under its bounding box
    for mask in masks:
        ys, xs = np.nonzero(mask)
        assert mask.sum() < 0.95 * (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
    assert np.array_equal(masks[3], bezier_blob(64, np.random.default_rng(3)))
    assert not np.array_equal(masks[3], masks[4])


def _bank_of(k: int, cell: int = 32, n: int = 2) -> CellBank:
    bank = CellBank(WSSS4LUAD, cell)
    for _ in range(n):
        bank.add_source(np.full((cell, cell, 3), CLASS_RGB[k], np.uint8), np.full((cell, cell), k, np.uint8), 1.0)
    return bank


def test_paste_blobs_labels_exactly_the_pasted_pixels():
    canvas = np.full((80, 80, 3), CLASS_RGB[1], np.uint8)
    canvas_mask = np.ones((80, 80), np.uint8)
    canvas_mask[:, 70:] = 3  # a strip of glass stays background unless pasted over
    canvas[:, 70:] = 250
    bank = _bank_of(0)
    for k in (1, 2):  # the stroma canvas' own class is not pasted while another exists
        extra = _bank_of(k)
        bank.add_source(extra.images[0], extra.masks[0], 1.0)
    for seed in range(10):
        rgb, mask = paste_blobs(canvas, canvas_mask, bank, np.random.default_rng(seed), count=2)
        changed = (rgb != canvas).any(-1)
        assert changed.any() and (mask != canvas_mask).any()
        assert not (mask == 1)[changed].any()  # no stroma pasted into stroma
        for k in (0, 2):  # every pixel labelled with a pasted class has that class' colour, and only those
            assert np.array_equal(mask == k, (rgb == CLASS_RGB[k]).all(-1))
        assert np.array_equal(mask != canvas_mask, changed & (mask != canvas_mask))
    # the canvas given is not modified, and a canvas smaller than the regions is returned as it is
    assert (canvas_mask == 1).sum() == 80 * 70
    small = canvas[:20, :20], canvas_mask[:20, :20]
    rgb, mask = paste_blobs(*small, bank, np.random.default_rng(0))
    assert rgb is small[0] and mask is small[1]


def test_keep_classes_limits_what_is_pasted():
    bank = _bank_of(0)
    for k in (1, 2):
        extra = _bank_of(k)
        bank.add_source(extra.images[0], extra.masks[0], 1.0)
    bank.keep_classes(["Tumor", "stroma"])
    assert bank.counts == {"tumor": 2, "stroma": 1}
    canvas, canvas_mask = np.full((64, 64, 3), CLASS_RGB[2], np.uint8), np.full((64, 64), 2, np.uint8)
    for seed in range(10):
        _, mask = paste_blobs(canvas, canvas_mask, bank, np.random.default_rng(seed), count=2)
        assert set(np.unique(mask).tolist()) <= {0, 1, 2} and (mask != 2).any()
    with pytest.raises(DatasetError, match="lymphocyte"):
        bank.keep_classes(["tumor", "lymphocyte"])


def _pixel_folder(root: Path) -> Path:
    """Two stroma-only images with their masks and one tumor-only (the source of tumor regions)."""
    for d in ("img", "mask"):
        (root / d).mkdir(parents=True)
    for name, k in (("a", 1), ("b", 1), ("c", 0)):
        Image.fromarray(np.full((64, 64, 3), CLASS_RGB[k], np.uint8)).save(root / "img" / f"{name}.png")
        write_index_png(root / "mask" / f"{name}.png", np.full((64, 64), k, np.uint8), WSSS4LUAD)
    return root


def test_synthesis_mix_stage2_gives_boundaries_with_exact_targets(tmp_path):
    index = discover_pixel_dataset(_pixel_folder(tmp_path / "pl"), WSSS4LUAD)
    aug = AugmentConfig(1.0, 1.0, 48, False, False, 0.0)
    base = PixelDataset(index.samples, index.classes, aug, weights=[1.0, 2.0, 1.0])
    bank = cells_from_pixel_labels(index.samples, index.classes, 32, 0.9)
    mixed = SynthesisMix(base, bank, 1.0, aug, stage=2, seed=0)
    assert len(mixed) == 3 and mixed.samples == base.samples
    item = mixed[1]
    assert set(item) == {"image", "target", "weight", "index"} and item["weight"] == 2.0
    target, image = item["target"], item["image"]
    assert {0, 1} <= set(np.unique(target).tolist())  # a tumor region inside the stroma image
    for k in (0, 1):
        assert np.all(image[target == k] == CLASS_RGB[k])
    assert np.array_equal(mixed[1]["target"], target)  # seeded
    plain = SynthesisMix(base, bank, 1e-9, aug, stage=2)[1]
    assert set(np.unique(plain["target"]).tolist()) == {1}  # share ~0: the dataset's own item
    with pytest.raises(ValueError):
        SynthesisMix(base, bank, 0.0, aug, stage=2)


def test_synthesis_mix_stage1_uses_single_label_patches_only(tmp_path):
    folder = tmp_path / "patches"
    folder.mkdir()
    for k in range(3):
        rgb = np.full((64, 64, 3), 250, np.uint8)
        rgb[:, :48] = CLASS_RGB[k]
        flags = [0, 0, 0]
        flags[k] = 1
        Image.fromarray(rgb).save(folder / f"p{k}-{flags}.png")
    Image.fromarray(np.full((64, 64, 3), CLASS_RGB[0], np.uint8)).save(folder / "m-[1, 1, 0].png")
    index = discover_patches(folder, "tumor,stroma,normal")
    aug = AugmentConfig(1.0, 1.0, 64, False, False, 0.0)
    base = PatchDataset(index, aug)
    bank = cells_from_single_label_patches(index.paths, index.labels, index.classes, 32)
    mixed = SynthesisMix(base, bank, 1.0, aug, stage=1)
    for i, path in enumerate(index.paths):
        item = mixed[i]
        if path.name.startswith("m-"):  # several classes: no pixel labels known, the patch as it is
            assert (item["strong_mask"] == 255).all()
            assert np.array_equal(item["labels"], index.labels[i].astype(np.float32))
            continue
        mask, image = item["strong_mask"], item["image"]
        own = int(np.argmax(index.labels[i]))
        present = set(np.unique(mask).tolist())
        assert own in present and len(present - {own, 3}) >= 1  # its class plus a pasted one (and its glass)
        for k in range(3):
            assert np.all(image[mask == k] == CLASS_RGB[k])
        assert np.all(image[mask == 3] == 250)
        assert np.array_equal(item["labels"], np.isin(np.arange(3), mask).astype(np.float32))


def test_trainer_synthesises_boundaries_in_both_stages(tmp_path, sample_data_dir):
    common = dict(out="", weights="none", device="cpu", steps=2, batch_size=2, crop=48, scale_min=1.0,
                  scale_max=1.0, workers=0, threads=1, crf_workers=0, synthesis_share=1.0, synthesis_region=32,
                  model={"backbone": "resnet18", "output_stride": 16, "aspp_channels": 16, "attention_dim": 16})
    events = []
    run1 = tmp_path / "s1"
    drive(train_steps(TrainConfig(**{**common, "out": str(run1), "data": str(sample_data_dir / "patches"),
                                     "joint_warmup_steps": 0})), events.append)
    summary = next(e for e in events if e.phase == "data").info["summary"]
    assert "boundary synthesis: 100% of items, regions" in summary and (run1 / "last.pt").is_file()
    events = []
    run2 = tmp_path / "s2"
    drive(train_steps(TrainConfig(**{**common, "out": str(run2), "stage2": True, "mosaic_purity": 0.8,
                                     "pseudo": str(sample_data_dir / "validation")})), events.append)
    summary = next(e for e in events if e.phase == "data").info["summary"]
    assert "boundary synthesis: 100% of items, regions" in summary and (run2 / "last.pt").is_file()
    with pytest.raises(Exception, match="synthesis_share"):
        TrainConfig(synthesis_share=1.5)
