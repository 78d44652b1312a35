"""The one image-suffix list: names, the napari reader, `predict` folders, patches and masks agree on it."""

from __future__ import annotations

import numpy as np
from PIL import Image

from napari_wsss_cram._reader import napari_get_reader, read_layer
from napari_wsss_cram.commands.predict import collect_inputs
from napari_wsss_cram.core.data.patches import discover_patches
from napari_wsss_cram.core.io.formats import (
    FLAT_SUFFIXES,
    IMAGE_SUFFIXES,
    MASK_SUFFIXES,
    SLIDE_SUFFIXES,
    image_stem,
    image_suffix,
)


def test_suffixes_of_names():
    assert image_suffix("A.OME.TIF") == ".ome.tif" and image_stem("a.b.ome.tiff") == "a.b"
    assert image_suffix("x.tiff") == ".tiff" and image_stem("slide.svs") == "slide"
    assert image_suffix("notes.txt") == "" and image_stem("notes.txt") == "notes.txt"
    assert set(SLIDE_SUFFIXES).isdisjoint(FLAT_SUFFIXES) and set(MASK_SUFFIXES) <= set(FLAT_SUFFIXES)
    assert set(IMAGE_SUFFIXES) == set(FLAT_SUFFIXES) | set(SLIDE_SUFFIXES)


def test_reader_predict_and_patches_use_the_one_list(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a-[1, 0].bmp")
    Image.fromarray(rgb).save(tmp_path / "b-[0, 1].png")
    Image.fromarray(rgb).save(tmp_path / ".hidden-[1, 1].png")  # e.g. a temporary or a macOS resource fork
    (tmp_path / "slide.svs").write_bytes(b"II*\x00")
    (tmp_path / "notes.txt").write_text("not an image")
    assert napari_get_reader(str(tmp_path / "a-[1, 0].bmp")) is not None
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert read_layer(tmp_path / "a-[1, 0].bmp")[1]["name"] == "a-[1, 0]"
    assert [p.name for p in collect_inputs([str(tmp_path)])] == ["a-[1, 0].bmp", "b-[0, 1].png", "slide.svs"]
    index = discover_patches(tmp_path, ["tumor", "stroma"])
    assert sorted(p.name for p in index.paths) == ["a-[1, 0].bmp", "b-[0, 1].png"]  # never a slide
