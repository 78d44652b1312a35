"""patchify: pixel-labelled images -> image-level-labelled patches in the WSSS4LUAD naming."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from napari_wsss_cram.cli import main
from napari_wsss_cram.core.classes import WSSS4LUAD, class_spec_from_names
from napari_wsss_cram.core.data import discover_patches, discover_pixel_dataset
from napari_wsss_cram.core.data.patchify import MASKS_SUBDIR, _positions, patch_labels, patchify
from napari_wsss_cram.core.errors import OutputExistsError
from napari_wsss_cram.core.io.png import read_index_png, write_index_png
from test_data import make_pixel_set


def test_patch_labels_use_share_of_tissue_pixels():
    mask = np.full((10, 10), 3, np.uint8)   # 100 px, background everywhere...
    mask[:5, :8] = 0                        # 40 px tumor
    mask[5:6, :2] = 1                       # 2 px stroma: 2/42 = 4.8% of tissue -> absent at 5%
    mask[9, 9] = 255                        # ignored
    flags, tissue = patch_labels(mask, WSSS4LUAD, 0.05)
    assert tissue == 42 and flags == [1, 0, 0]
    flags, _ = patch_labels(mask, WSSS4LUAD, 0.04)
    assert flags == [1, 1, 0]
    assert patch_labels(np.full((4, 4), 3, np.uint8), WSSS4LUAD, 0.05) == ([0, 0, 0], 0)


def test_patchify_writes_named_patches_that_match_their_masks(tmp_path):
    src = make_pixel_set(tmp_path / "px", n=3, size=100)
    dataset = discover_pixel_dataset(src)
    result = patchify(dataset, tmp_path / "patches", size=(40, 60), overlap=0.5, keep_masks=True)
    assert result.paths and result.labels.shape == (len(result.paths), 3)
    index = discover_patches(tmp_path / "patches")
    assert len(index) == len(result.paths)
    for path, flags in zip(index.paths, index.labels, strict=True):
        side = Image.open(path).size[0]
        assert 40 <= side <= 60
        crop = read_index_png(tmp_path / "patches" / MASKS_SUBDIR / path.name)
        assert patch_labels(crop, WSSS4LUAD, 0.05)[0] == flags.tolist()
    # windows cover each image to its far edge
    assert _positions(100, 57, 28) == [0, 28, 43] and _positions(40, 57, 28) == [0]
    with pytest.raises(OutputExistsError):
        patchify(dataset, tmp_path / "patches")


def test_patchify_cli_with_custom_classes(tmp_path, capsys):
    classes = class_spec_from_names("a,b,c,d")
    (tmp_path / "px" / "img").mkdir(parents=True)
    (tmp_path / "px" / "mask").mkdir()
    mask = np.full((64, 64), 4, np.uint8)
    mask[:, :32] = 3   # class d on the left half
    mask[:10, 40:] = 0
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(tmp_path / "px" / "img" / "im.png")
    write_index_png(tmp_path / "px" / "mask" / "im.png", mask, classes)
    rc = main(["patchify", str(tmp_path / "px"), "--out", str(tmp_path / "out"), "--size", "64",
               "--classes", "a,b,c,d"])
    assert rc == 0
    assert capsys.readouterr().out.strip().endswith("out")
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == ["im-0-0-[1, 0, 0, 1].png"]
    index = discover_patches(tmp_path / "out")  # classes.txt carries the names
    assert index.classes.names == ("a", "b", "c", "d")


def test_a_negative_seed_is_one_clear_error_and_writes_nothing(sample_data_dir, tmp_path, capsys):
    out = tmp_path / "patches"
    code = main(["patchify", str(sample_data_dir / "validation"), "--out", str(out), "--seed", "-5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err == ["error: --seed must be a non-negative integer, got -5."]
    assert not out.exists()
