"""Training data: patch discovery (WSSS4LUAD names, CSV, class folders), pixel-labelled sets, augmentation."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_wsss_cram.core.classes import IGNORE_INDEX, WSSS4LUAD, class_spec_from_names
from napari_wsss_cram.core.data import (
    AugmentConfig,
    PatchDataset,
    PixelDataset,
    augment,
    discover_patches,
    discover_pixel_dataset,
    load_pixel_sample,
    parse_patch_name,
)
from napari_wsss_cram.core.errors import DatasetError, ImageReadError
from napari_wsss_cram.core.io.png import write_index_png

#: flat colours of the synthetic classes (tumor purple, stroma pink, normal orange, background white)
COLORS = np.array([(90, 40, 140), (230, 140, 190), (200, 120, 60), (250, 250, 250)], np.float32)


def make_pixel_set(root: Path, n: int = 6, size: int = 96, seed: int = 0, background_masks: bool = False) -> Path:
    """A tiny pixel-labelled set (img/ mask/ [background-mask/]) of coloured discs on white, exact masks."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for d in ("img", "mask") + (("background-mask",) if background_masks else ()):
        (root / d).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        mask = np.full((size, size), 3, np.uint8)
        for c in rng.permutation(3)[: int(rng.integers(1, 4))]:
            cy, cx = rng.integers(0, size, 2)
            r = int(rng.integers(size // 4, size // 2))
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = c
        rgb = np.clip(COLORS[mask] + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(root / "img" / f"{i:02d}.png")
        write_index_png(root / "mask" / f"{i:02d}.png", mask, WSSS4LUAD)
        if background_masks:
            Image.fromarray((mask == 3).astype(np.uint8)).save(root / "background-mask" / f"{i:02d}.png")
    return root


def write_patch(path: Path, rgb: np.ndarray | None = None, size: int = 40, value: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if rgb is None:
        rgb = np.full((size, size, 3), value, np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def test_wsss4luad_names_counts_and_summary(tmp_path):
    for name in ["1-2-3-[1, 1, 0].png", "4-5-6-[1, 1, 0].png", "7-[0, 1, 0].png", "8-[0, 0, 1].png",
                 "9-[1,0,1].png"]:
        write_patch(tmp_path / name)
    index = discover_patches(tmp_path)
    assert index.classes.names == ("tumor", "stroma", "normal")
    assert len(index) == 5
    assert index.counts_per_class() == {"tumor": 3, "stroma": 3, "normal": 2}
    assert index.counts_per_combination() == {"tumor+stroma": 2, "stroma": 1, "normal": 1, "tumor+normal": 1}
    summary = index.summary()
    assert "tumor 3" in summary and "tumor+stroma 2" in summary
    assert parse_patch_name(Path("436219-9328-56427-[1, 1, 0].png")) == ("436219-9328-56427", [1, 1, 0])


def test_malformed_name_is_named(tmp_path):
    write_patch(tmp_path / "1-[1, 0, 0].png")
    bad = write_patch(tmp_path / "2-tumor.png")
    with pytest.raises(DatasetError, match=str(bad.name).replace("[", r"\[")):
        discover_patches(tmp_path)


def test_inconsistent_and_empty_flags_are_named(tmp_path):
    write_patch(tmp_path / "a" / "1-[1, 0, 0].png")
    write_patch(tmp_path / "a" / "2-[1, 0].png")
    with pytest.raises(DatasetError, match=r"2-\[1, 0\]\.png"):
        discover_patches(tmp_path / "a")
    write_patch(tmp_path / "b" / "1-[0, 0, 0].png")
    with pytest.raises(DatasetError, match="no class flag"):
        discover_patches(tmp_path / "b")


def test_empty_and_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="no patches found"):
        discover_patches(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        discover_patches(tmp_path / "nope")
    (tmp_path / "tumor").mkdir()
    with pytest.raises(DatasetError, match="no patches found"):
        discover_patches(tmp_path)


def test_single_class_and_classes_option(tmp_path, caplog):
    for i in range(3):
        write_patch(tmp_path / f"{i}-[1].png", value=100 + i)
    with pytest.raises(DatasetError, match="--classes"):
        discover_patches(tmp_path)  # one flag, no names: must be told
    with caplog.at_level(logging.WARNING):
        index = discover_patches(tmp_path, classes="lesion")
    assert index.classes.names == ("lesion",) and index.labels.shape == (3, 1)
    assert index.rare_classes() == ["lesion"]
    assert any("only 3 patches" in w for w in index.warnings)
    assert "only 3 patches" in caplog.text


def test_classes_file_gives_names_for_k4(tmp_path):
    (tmp_path / "classes.txt").write_text("tumor\nstroma\nnormal\nnecrosis\n")
    write_patch(tmp_path / "1-[0, 0, 0, 1].png")
    write_patch(tmp_path / "2-[1, 0, 0, 1].png")
    index = discover_patches(tmp_path)
    assert index.classes.names == ("tumor", "stroma", "normal", "necrosis")
    assert index.counts_per_class()["necrosis"] == 2
    with pytest.raises(DatasetError, match="4 class flags but 3 classes"):
        discover_patches(tmp_path, classes="a,b,c")


def test_csv_layout(tmp_path):
    write_patch(tmp_path / "p" / "x.png")
    write_patch(tmp_path / "p" / "y.png", value=50)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,epithelium,stroma\np/x.png,1,0\np/y.png,1,1\n")
    index = discover_patches(csv)
    assert index.classes.names == ("epithelium", "stroma")
    assert index.labels.tolist() == [[1, 0], [1, 1]]
    assert index.layout == "csv"
    csv.write_text("path,epithelium,stroma\np/x.png,1,0\np/missing.png,1,1\n")
    with pytest.raises(DatasetError, match="line 3.*missing.png"):
        discover_patches(csv)
    csv.write_text("path,epithelium,stroma\np/x.png,1,2\n")
    with pytest.raises(DatasetError, match="line 2"):
        discover_patches(tmp_path)  # the folder's only CSV is found too


def test_class_folders_dedupe_multilabel_by_hash(tmp_path):
    shared = np.random.default_rng(0).integers(0, 255, (30, 30, 3), dtype=np.uint8)
    write_patch(tmp_path / "tumor" / "a.png", shared)
    write_patch(tmp_path / "stroma" / "copy_of_a.png", shared)
    write_patch(tmp_path / "stroma" / "b.png", value=10)
    write_patch(tmp_path / "normal" / "c.png", value=20)
    index = discover_patches(tmp_path, classes="tumor,stroma,normal")
    assert len(index) == 3
    labels = {p.name: row.tolist() for p, row in zip(index.paths, index.labels, strict=True)}
    multi = labels.get("a.png") or labels.get("copy_of_a.png")
    assert multi == [1, 1, 0]
    assert index.counts_per_combination()["tumor+stroma"] == 1
    with pytest.raises(DatasetError, match="not one of the classes"):
        discover_patches(tmp_path, classes="tumor,stroma")


def test_grayscale_rgba_16bit_patches_are_converted(tmp_path):
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(tmp_path / "g-[1, 0, 0].png")
    Image.fromarray(np.full((32, 32, 4), 200, np.uint8)).save(tmp_path / "r-[0, 1, 0].png")
    Image.fromarray(np.full((32, 32), 65535, np.uint16)).save(tmp_path / "s-[0, 0, 1].png")
    index = discover_patches(tmp_path)
    dataset = PatchDataset(index, AugmentConfig(1.0, 1.0, 32, False, False, 0.0))
    by_name = {p.name[0]: i for i, p in enumerate(index.paths)}
    # RGBA 200 at opacity 200/255 is blended onto white (issue 21: transparent is background): 200*200/255 + 55
    for key, expected in (("g", 90), ("r", 212), ("s", 255)):
        item = dataset[by_name[key]]
        rgb, labels, strong = item["image"], item["labels"], item["strong_mask"]
        assert (strong == 255).all()  # no _masks/ folder: no strong labels
        assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
        assert int(rgb.mean()) == expected
        assert labels.dtype == np.float32 and labels.sum() == 1


def test_unreadable_patch_names_the_file(tmp_path):
    (tmp_path / "bad-[1, 0, 0].png").write_bytes(b"not a png at all")
    index = discover_patches(tmp_path)
    with pytest.raises(ImageReadError, match="bad"):
        PatchDataset(index, AugmentConfig(crop=16))[0]


def test_pixel_dataset_pairs_masks_and_background(tmp_path):
    root = make_pixel_set(tmp_path / "px", n=3, size=48, background_masks=True)
    index = discover_pixel_dataset(root)
    assert len(index) == 3 and all(s.background is not None for s in index.samples)
    rgb, mask = load_pixel_sample(index.samples[0], index.classes)
    assert rgb.shape == (48, 48, 3) and mask.shape == (48, 48)
    assert set(np.unique(mask)) <= {0, 1, 2, 3}
    # the background mask is what marks background
    Image.fromarray(np.ones((48, 48), np.uint8)).save(root / "background-mask" / "00.png")
    _, mask = load_pixel_sample(index.samples[0], index.classes)
    assert (mask == 3).all()
    (root / "mask" / "01.png").unlink()
    with pytest.raises(DatasetError, match="01.png"):
        discover_pixel_dataset(root)


def test_pixel_mask_with_unknown_class_is_rejected(tmp_path):
    root = make_pixel_set(tmp_path / "px", n=1, size=32)
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(root / "mask" / "00.png")
    index = discover_pixel_dataset(root)
    with pytest.raises(DatasetError, match="class index 7"):
        load_pixel_sample(index.samples[0], index.classes)
    with pytest.raises(DatasetError, match="img/"):
        discover_pixel_dataset(tmp_path)


def test_augment_shapes_determinism_and_padding():
    rgb = np.random.default_rng(0).integers(0, 200, (50, 70, 3), dtype=np.uint8)
    cfg = AugmentConfig(scale_min=2.0, scale_max=3.0, crop=96)
    a, _ = augment(rgb, cfg, np.random.default_rng(3))
    b, _ = augment(rgb, cfg, np.random.default_rng(3))
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8 and a.flags.c_contiguous
    assert np.array_equal(a, b)
    small, mask = augment(rgb, AugmentConfig(0.5, 0.5, 64, jitter=0.0), np.random.default_rng(1),
                          mask=np.zeros((50, 70), np.uint8))
    # a 25x35 rescale padded to 64: white glass around, IGNORE in the mask
    assert (small == 255).all(axis=2).sum() == (mask == IGNORE_INDEX).sum() > 0


def test_augment_keeps_mask_aligned_with_image():
    """Flips, rotations, rescale and crop move image and mask together (mask = a function of the colour)."""
    mask = np.zeros((60, 60), np.uint8)
    mask[:20] = 1
    mask[:, 40:] = 2
    rgb = COLORS[mask].astype(np.uint8)
    for seed in range(6):
        img, m = augment(rgb, AugmentConfig(1.0, 1.0, 48, jitter=0.0), np.random.default_rng(seed), mask=mask)
        assert np.array_equal(img, COLORS[m].astype(np.uint8))  # no resampling: exact
        img, m = augment(rgb, AugmentConfig(1.3, 1.6, 48, jitter=0.0), np.random.default_rng(seed), mask=mask)
        close = np.abs(img.astype(int) - COLORS[m]).max(axis=2) <= 3
        assert close.mean() > 0.9  # only pixels on region edges are blended by the bilinear rescale


def test_pixel_dataset_items_and_weights(tmp_path):
    root = make_pixel_set(tmp_path / "px", n=2, size=40)
    index = discover_pixel_dataset(root)
    ds = PixelDataset(index.samples, class_spec_from_names(None), AugmentConfig(1.0, 1.0, 32), weights=[1.0, 3.0])
    item = ds[1]
    rgb, mask, weight, i = item["image"], item["target"], item["weight"], item["index"]
    assert rgb.shape == (32, 32, 3) and mask.shape == (32, 32) and mask.dtype == np.int64
    assert weight == np.float32(3.0) and i == 1
