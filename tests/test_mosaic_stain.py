"""Two training levers of issue 13: H&E stain jitter and PistoSeg-style mosaics of cells of known class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.data.augment import AugmentConfig, stain_jitter
from napari_wsss_cram.core.data.mosaic import (
    CellBank,
    MosaicMix,
    build_mosaic,
    cells_from_pixel_labels,
    cells_from_single_label_patches,
)
from napari_wsss_cram.core.data.patches import PatchDataset, discover_patches
from napari_wsss_cram.core.data.pixel import PixelDataset, discover_pixel_dataset
from napari_wsss_cram.core.io.png import write_index_png
from napari_wsss_cram.core.progress import drive
from napari_wsss_cram.core.train import train_steps
from napari_wsss_cram.core.train_config import TrainConfig

#: flat H&E-like colours of tumor, stroma, normal
CLASS_RGB = np.array([(90, 40, 140), (230, 140, 190), (200, 120, 60)], np.uint8)


def _he_like(size: int = 64, seed: int = 0) -> np.ndarray:
    """Stained tissue on the left, white glass on the right."""
    rng = np.random.default_rng(seed)
    rgb = np.full((size, size, 3), 250, np.uint8)
    rgb[:, : size // 2] = np.clip(CLASS_RGB[0] + rng.normal(0, 8, (size, size // 2, 3)), 0, 255).astype(np.uint8)
    return rgb


# ----------------------------------------------------------------------------------------------- stain jitter

def test_stain_jitter_changes_stain_keeps_glass_and_is_seeded():
    rgb = _he_like()
    assert np.array_equal(stain_jitter(rgb, 0.0, np.random.default_rng(0)), rgb)
    a = stain_jitter(rgb, 0.2, np.random.default_rng(3))
    b = stain_jitter(rgb, 0.2, np.random.default_rng(3))
    assert np.array_equal(a, b) and a.dtype == np.uint8 and a.shape == rgb.shape
    tissue, glass = (slice(None), slice(0, 32)), (slice(None), slice(32, None))
    changes = [np.abs(stain_jitter(rgb, 0.2, np.random.default_rng(s)).astype(int) - rgb)[tissue].mean()
               for s in range(5)]
    assert min(changes) > 1.0  # the stain moves on tissue for every draw
    for s in range(5):
        out = stain_jitter(rgb, 0.2, np.random.default_rng(s))
        assert np.abs(out[glass].astype(int) - rgb[glass]).max() <= 6  # glass stays glass (gray > 200)


def test_stain_is_a_training_setting_that_reaches_the_augmentation():
    config = TrainConfig(stain=0.15, jitter=0.0, crop=32)
    assert config.augment_config().stain == 0.15
    with pytest.raises(Exception, match="stain"):
        TrainConfig(stain=1.5)


# ----------------------------------------------------------------------------------------------- mosaics

def _single_label_patches(folder: Path, size: int = 64) -> Path:
    """Three single-label patches (flat class colour on the left half, glass on the right) and one mixed."""
    folder.mkdir(parents=True)
    for k in range(3):
        rgb = np.full((size, size, 3), 250, np.uint8)
        rgb[:, : size // 2] = CLASS_RGB[k]
        flags = [0, 0, 0]
        flags[k] = 1
        Image.fromarray(rgb).save(folder / f"p{k}-{flags}.png")
    mixed = np.full((size, size, 3), 250, np.uint8)
    mixed[:, : size // 2] = CLASS_RGB[0]
    mixed[:, size // 2:] = CLASS_RGB[1]
    Image.fromarray(mixed).save(folder / "m-[1, 1, 0].png")
    return folder


def test_single_label_cells_are_their_class_and_mosaic_masks_are_exact(tmp_path):
    index = discover_patches(_single_label_patches(tmp_path / "patches"), "tumor,stroma,normal")
    bank = cells_from_single_label_patches(index.paths, index.labels, index.classes, cell=16)
    # left half of each single-label patch is tissue: 2 columns x 4 rows of 16 px cells; the mixed patch is skipped
    assert bank.counts == {"tumor": 8, "stroma": 8, "normal": 8}
    rgb, mask, labels = build_mosaic(bank, 40, np.random.default_rng(0))
    assert rgb.shape == (40, 40, 3) and mask.shape == (40, 40)
    for k in range(3):
        # every pixel labelled k has class k's colour: the mask is exact
        assert np.all(rgb[mask == k] == CLASS_RGB[k])
    assert set(np.unique(mask)) <= {0, 1, 2}
    assert np.array_equal(labels, np.isin(np.arange(3), np.unique(mask)).astype(np.float32))


def test_pixel_label_cells_need_purity_and_tissue(tmp_path):
    rgb = np.full((32, 64, 3), 250, np.uint8)
    rgb[:, :48] = CLASS_RGB[1]
    mask = np.full((32, 64), 3, np.uint8)
    mask[:, :32] = 1
    mask[:16, 32:48] = 0  # cell (0, 32): all tumor
    mask[16:, 32:40] = 0  # cell (16, 32): half tumor, half labelled background: just enough tissue, pure tumor
    for d in ("img", "mask"):
        (tmp_path / d).mkdir()
    Image.fromarray(rgb).save(tmp_path / "img" / "a.png")
    write_index_png(tmp_path / "mask" / "a.png", mask, WSSS4LUAD)
    samples = discover_pixel_dataset(tmp_path, WSSS4LUAD).samples
    bank = cells_from_pixel_labels(samples, WSSS4LUAD, cell=16, purity=0.9)
    assert bank.counts == {"tumor": 2, "stroma": 4}  # the last column is glass: no cell
    cells = {tuple(c) for c in bank.cells[0].tolist()}
    assert cells == {(0, 0, 32), (0, 16, 32)}
    empty = CellBank(WSSS4LUAD, 16)
    assert not empty
    with pytest.raises(ValueError, match="empty"):
        build_mosaic(empty, 32, np.random.default_rng(0))


def test_mosaic_mix_replaces_a_share_of_items_with_exact_strong_labels(tmp_path):
    index = discover_patches(_single_label_patches(tmp_path / "patches"), "tumor,stroma,normal")
    aug = AugmentConfig(1.0, 1.0, 32, False, False, 0.0)
    base = PatchDataset(index, aug)
    bank = cells_from_single_label_patches(index.paths, index.labels, index.classes, cell=16)
    mixed = MosaicMix(base, bank, 0.5, aug, stage=1, seed=0)
    assert len(mixed) == len(base) and mixed.n_strong == base.n_strong
    items = []
    for epoch in range(4):
        mixed.set_epoch(epoch)
        items += [mixed[i] for i in range(len(mixed))]
    mosaics = [it for it in items if (it["strong_mask"] != 255).any()]
    assert mosaics, "no mosaic drawn at share 0.5"
    for it in mosaics:
        present = np.unique(it["strong_mask"])
        assert set(present.tolist()) <= {0, 1, 2}
        assert np.array_equal(it["labels"], np.isin(np.arange(3), present).astype(np.float32))
    assert all(np.array_equal(mixed[i]["image"], mixed[i]["image"]) for i in range(len(mixed)))  # seeded
    with pytest.raises(ValueError):
        MosaicMix(base, bank, 0.0, aug, stage=1)


def test_trainer_mixes_mosaics_in_both_stages(tmp_path, sample_data_dir):
    common = dict(out="", weights="none", device="cpu", steps=2, batch_size=2, crop=48, scale_min=1.0,
                  scale_max=1.0, workers=0, threads=1, crf_workers=0, mosaic_share=1.0, mosaic_cell=16,
                  model={"backbone": "resnet18", "output_stride": 16, "aspp_channels": 16, "attention_dim": 16})
    run1 = tmp_path / "s1"
    events = []
    drive(train_steps(TrainConfig(**{**common, "out": str(run1), "data": str(sample_data_dir / "patches"),
                                     "joint_warmup_steps": 0})), events.append)
    summary = next(e for e in events if e.phase == "data").info["summary"]
    assert "mosaics: 100% of items" in summary and (run1 / "last.pt").is_file()

    # stage 2: cells from a pixel-labelled folder (here the sample's validation masks stand in for pseudo-labels)
    run2 = tmp_path / "s2"
    events = []
    drive(train_steps(TrainConfig(**{**common, "out": str(run2), "stage2": True,
                                     "pseudo": str(sample_data_dir / "validation"), "mosaic_purity": 0.8})),
          events.append)
    summary = next(e for e in events if e.phase == "data").info["summary"]
    assert "mosaics: 100% of items" in summary and (run2 / "last.pt").is_file()
    assert any(e.phase == "train" for e in events)


def test_pixel_dataset_wrapped_gives_stage2_records(tmp_path, sample_data_dir):
    index = discover_pixel_dataset(sample_data_dir / "validation")
    aug = AugmentConfig(1.0, 1.0, 32, False, False, 0.0)
    base = PixelDataset(index.samples, index.classes, aug)
    bank = cells_from_pixel_labels(index.samples, index.classes, 16, 0.8)
    item = MosaicMix(base, bank, 1.0, aug, stage=2)[0]
    assert set(item) == {"image", "target", "weight", "index"} and item["target"].shape == (32, 32)
