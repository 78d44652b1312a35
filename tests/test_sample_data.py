"""The synthetic H&E generator: determinism, seamless tiles, WSSS4LUAD conventions, slide, CLI, committed data."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_wsss_cram.cli import main
from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.io.images import ImageSource, read_rgb
from napari_wsss_cram.core.io.png import read_index_png
from napari_wsss_cram.core.sample import (
    TissueLayout,
    image_labels,
    make_patch,
    make_sample_data,
    make_slide,
    render_region,
)

NAME = re.compile(r"^(?P<id>.+)-\[(?P<t>[01]), (?P<s>[01]), (?P<n>[01])\]\.png$")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_patch_is_deterministic_and_seed_dependent():
    rgb1, mask1 = make_patch(7, (160, 200))
    rgb2, mask2 = make_patch(7, (160, 200))
    assert rgb1.shape == (160, 200, 3) and rgb1.dtype == np.uint8 and mask1.shape == (160, 200)
    assert np.array_equal(rgb1, rgb2) and np.array_equal(mask1, mask2)
    rgb3, _ = make_patch(8, (160, 200))
    assert not np.array_equal(rgb1, rgb3)
    assert set(np.unique(mask1)) <= {0, 1, 2, 3}


def test_regions_render_seamlessly():
    """Any region renders the same pixels as a crop of a larger one: slides can be made tile by tile."""
    layout = TissueLayout(seed=3, region_scale=120)
    big_rgb, big_mask = render_region(layout, 1000, 2000, 300, 340)
    rgb, mask = render_region(layout, 1000 + 123, 2000 + 77, 150, 200)
    assert np.array_equal(rgb, big_rgb[123:273, 77:277])
    assert np.array_equal(mask, big_mask[123:273, 77:277])


def test_pixel_truth_matches_appearance():
    """Background truth is white glass; tumor is darker and more purple than stroma (as in real H&E)."""
    rgb, mask = render_region(TissueLayout(seed=11, region_scale=140), 0, 0, 400, 400)
    present = set(np.unique(mask).tolist())
    assert {0, 1, 3} <= present
    gray = rgb.mean(axis=2)
    assert gray[mask == 3].mean() > 215
    assert gray[mask == 0].mean() < gray[mask == 1].mean() - 15
    tumor, stroma = rgb[mask == 0].mean(0), rgb[mask == 1].mean(0)
    assert tumor[2] > tumor[1] and stroma[0] > stroma[1]  # purple-blue tumor, pink stroma


def test_image_labels_follow_the_5_percent_protocol():
    mask = np.full((100, 100), 3, np.uint8)
    mask[:50] = 1           # 5000 stroma
    mask[50:60, :] = 0      # 1000 tumor -> 1000/6250 = 16%
    mask[60:62, :25] = 2    # 50 normal -> < 5% of tissue
    mask[62:64, :] = 1      # +200 stroma
    assert image_labels(mask) == [1, 1, 0]
    assert image_labels(np.full((5, 5), 3, np.uint8)) == [0, 0, 0]


def test_make_sample_data_layout_and_reproducibility(tmp_path):
    kwargs = dict(n_patches=6, n_validation=2, slide_size=0, seed=5)
    summary = make_sample_data(tmp_path / "a", **kwargs)
    make_sample_data(tmp_path / "b", **kwargs)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # same seed, same bytes
    patches = sorted((tmp_path / "a" / "patches").glob("*.png"))
    assert len(patches) == 6 and summary["patches"] == 6
    for p in patches:
        m = NAME.match(p.name)
        assert m, p.name
        h, w = read_rgb(p).shape[:2]
        assert 150 <= h <= 300 and 150 <= w <= 300
        assert any(m.group(k) == "1" for k in "tsn")
    for name in ("00.png", "01.png"):
        img = read_rgb(tmp_path / "a" / "validation" / "img" / name)
        mask = read_index_png(tmp_path / "a" / "validation" / "mask" / name)
        bg = read_index_png(tmp_path / "a" / "validation" / "background-mask" / name)
        assert img.shape[:2] == mask.shape == bg.shape
        assert np.array_equal(bg == 1, mask == 3)
        with Image.open(tmp_path / "a" / "validation" / "mask" / name) as im:
            assert im.mode == "P" and im.getpalette()[:12] == WSSS4LUAD.palette()[:12]


def test_small_slide_is_a_pyramidal_ome_tiff_with_its_mask(tmp_path):
    slide, mask = make_slide(tmp_path / "s.ome.tif", size=700, seed=2)
    with ImageSource.open(slide) as src:
        assert src.shape == (700, 700) and src.mpp == pytest.approx(0.25)
        assert src.n_levels == 3  # 700 -> 350 -> 175 (fits a 256 tile)
        rgb = src.read_level(0)
    labels = tifffile.imread(mask)
    assert labels.shape == (700, 700) and set(np.unique(labels)) <= {0, 1, 2, 3}
    with tifffile.TiffFile(mask) as tif:
        assert len(tif.series[0].levels) == 3
    # the slide pixels and truth are the generator's, whatever the tiling
    assert (rgb.mean(axis=2)[labels == 3] > 200).mean() > 0.95
    again, _ = make_slide(tmp_path / "again.ome.tif", size=700, seed=2)
    assert again.read_bytes() == slide.read_bytes()


def test_cli_make_sample_data(tmp_path, capsys):
    rc = main(["make-sample-data", "--out", str(tmp_path), "--n-patches", "3", "--n-validation", "1",
               "--slide-size", "0", "--seed", "1"])
    assert rc == 0
    assert len(list((tmp_path / "patches").glob("sample*.png"))) == 3
    assert (tmp_path / "validation" / "mask" / "00.png").is_file()
    assert "3 patches" in capsys.readouterr().out
    assert main(["make-sample-data", "--out", str(tmp_path), "--slide-only", "--slide-size", "300"]) == 0
    with ImageSource.open(tmp_path / "slide" / "sample_slide.ome.tif") as src:
        assert src.shape == (300, 300) and src.n_levels == 2
    assert main(["make-sample-data", "--out", str(tmp_path / "x.png"), "--n-patches", "-1"]) == 2


def test_committed_sample_data(sample_data_dir):
    patches = sorted((sample_data_dir / "patches").glob("*.png"))
    assert len(patches) >= 200
    labels = np.array([[int(NAME.match(p.name).group(k)) for k in "tsn"] for p in patches])
    assert labels.sum(0).min() >= 40  # every class is well represented
    assert (labels.sum(1) >= 2).mean() > 0.3  # mixtures are common, as in WSSS4LUAD
    masks = sorted((sample_data_dir / "validation" / "mask").glob("*.png"))
    assert len(masks) >= 15
    counts = sum(np.bincount(read_index_png(m).ravel(), minlength=4)[:4] for m in masks)
    assert (counts > 0).all()


def test_synthetic_colours_are_close_to_real_wsss4luad(wsss4luad_dir, sample_data_dir):
    """Per-class mean colour of the synthetic validation set is near the real one (same stains)."""

    def class_means(img_dir: Path, mask_dir: Path) -> np.ndarray:
        sums, counts = np.zeros((4, 3)), np.zeros(4)
        for p in sorted(img_dir.glob("*.png")):
            rgb = read_rgb(p).reshape(-1, 3).astype(float)
            mask = read_index_png(mask_dir / p.name).ravel()
            for c in range(4):
                sums[c] += rgb[mask == c].sum(0)
                counts[c] += (mask == c).sum()
        return sums / counts[:, None]

    real = class_means(wsss4luad_dir / "2.validation" / "img", wsss4luad_dir / "2.validation" / "mask")
    synth = class_means(sample_data_dir / "validation" / "img", sample_data_dir / "validation" / "mask")
    for c in (0, 1, 3):  # tumor, stroma, background
        assert np.abs(real[c] - synth[c]).max() < 45, (c, real[c], synth[c])
