"""`wsss-cram demo --headless`: segments the sample and writes labels, activation maps and an overlay."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from napari_wsss_cram.cli import main
from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.io.png import read_index_png
from widget_helpers import he_like_image, make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


def test_headless_demo_writes_labels_maps_and_overlay(tmp_path, tiny_checkpoint, capsys):
    image = tmp_path / "he.png"
    Image.fromarray(he_like_image(96)).save(image)
    out = tmp_path / "demo_output"
    code = main(["demo", "--headless", "--out", str(out), "--checkpoint", str(tiny_checkpoint),
                 "--image", str(image), "--no-crf"])
    assert code == 0
    labels = read_index_png(out / "he_labels.png")
    assert labels.shape == (96, 96) and labels.max() <= WSSS4LUAD.background_index
    for name in WSSS4LUAD.names:
        heat = np.asarray(Image.open(out / f"he_{name}_activation.png"))
        assert heat.shape == (96, 96, 3)
    overlay = np.asarray(Image.open(out / "he_overlay.png"))
    assert overlay.shape == (96, 192, 3)
    np.testing.assert_array_equal(overlay[:, :96], he_like_image(96))
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed and "he_overlay.png" in printed


def test_demo_without_bundled_model_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WSSS_CRAM_DEMO_MODEL", str(tmp_path / "absent.pt"))
    code = main(["demo", "--headless", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "absent.pt" in err and "--checkpoint" in err
    assert not (tmp_path / "out").exists()
