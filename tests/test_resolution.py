"""One resolution rule (core.checkpoint.default_resolution) for predict, evaluate, pseudo-labels, demo and the dock."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from napari_wsss_cram.cli import main
from napari_wsss_cram.core.checkpoint import (
    CheckpointInfo,
    Resolution,
    default_resolution,
    load_checkpoint,
    save_checkpoint,
)
from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.model.config import ModelConfig


def _save(path, train_config=None, **overrides):
    import torch

    from napari_wsss_cram.core.model.cram import CRAMNet

    torch.manual_seed(0)
    config = ModelConfig(backbone="resnet18", output_stride=16, aspp_channels=16, attention_dim=16,
                         aspp_rates=(2, 4), **overrides)
    return save_checkpoint(path, CRAMNet(WSSS4LUAD, config, weights=None).eval(), train_config=train_config)


@pytest.fixture(scope="module")
def scale_checkpoint(tmp_path_factory):
    """Trained at x1.5 (no µm/px recorded)."""
    return _save(tmp_path_factory.mktemp("scale") / "scale.pt", {"scale_min": 1.0, "scale_max": 2.0},
                 train_scale=1.5)


@pytest.fixture(scope="module")
def mpp_checkpoint(tmp_path_factory):
    """Trained at 0.5 µm/px (patches rescaled x2)."""
    return _save(tmp_path_factory.mktemp("mpp") / "mpp.pt", train_scale=2.0, mpp=0.5)


def _info(train_config=None, **overrides) -> CheckpointInfo:
    return CheckpointInfo(classes=WSSS4LUAD, model_config=ModelConfig(backbone="resnet18", **overrides),
                          train_config=train_config or {})


def _png(path, h=40, w=48, seed=0):
    rgb = (np.random.default_rng(seed).random((h, w, 3)) * 180).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def test_rule_on_a_checkpoint_with_a_training_scale(scale_checkpoint):
    _, info = load_checkpoint(scale_checkpoint)
    res = default_resolution(info)
    assert res == Resolution(scale=1.5, origin="the checkpoint's training scale")
    assert res.mpp is None and res.describe() == "scale 1.5x (the checkpoint's training scale)"
    assert default_resolution(info, image_has_mpp=False) == res  # no µm/px recorded: the image's does not matter


def test_rule_on_a_checkpoint_with_a_training_mpp(mpp_checkpoint):
    _, info = load_checkpoint(mpp_checkpoint)
    res = default_resolution(info)
    assert res.mpp == 0.5 and res.scale is None
    assert res.describe() == "0.5 µm/px (the checkpoint's training µm/px)"
    fallback = default_resolution(info, image_has_mpp=False)  # an image without µm/px: the training scale
    assert fallback.scale == 2.0 and fallback.mpp is None


def test_rule_falls_back_to_the_recorded_scale_range_then_one():
    assert default_resolution(_info({"scale_min": 2.0, "scale_max": 3.0})).scale == 2.5  # paper preset
    assert default_resolution(_info({"scale_min": 2.0, "scale_max": 3.0}, train_scale=1.25)).scale == 1.25
    assert default_resolution(_info()).scale == 1.0
    assert default_resolution(_info({"lr": 0.1})).scale == 1.0
    with pytest.raises(ValueError):
        Resolution(scale=1.0, mpp=0.5)


def test_predict_defaults_match_evaluate_at_the_rule(tmp_path, scale_checkpoint, capsys):
    from napari_wsss_cram.core.evaluate import predict_labels
    from napari_wsss_cram.core.io.png import read_index_png, write_index_png

    rgb = _png(tmp_path / "img.png")
    assert main(["predict", str(scale_checkpoint), str(tmp_path / "img.png"), "--out", str(tmp_path / "out"),
                 "--format", "png"]) == 0
    assert "at scale 1.5x (the checkpoint's training scale)" in capsys.readouterr().err
    model, info = load_checkpoint(scale_checkpoint)
    written = read_index_png(tmp_path / "out" / "img.png", WSSS4LUAD)
    expected = predict_labels(model, rgb, scale=default_resolution(info).scale)
    assert written.shape == rgb.shape[:2]
    np.testing.assert_array_equal(written, expected)

    # evaluate (evaluate_model -> predict_labels) uses the same rule and says so
    data = tmp_path / "val"
    (data / "img").mkdir(parents=True)
    (data / "mask").mkdir()
    Image.fromarray(rgb).save(data / "img" / "a.png")
    write_index_png(data / "mask" / "a.png", np.zeros(rgb.shape[:2], np.uint8), WSSS4LUAD)
    assert main(["evaluate", str(scale_checkpoint), str(data), "--json", str(tmp_path / "s.json")]) == 0
    assert "at scale 1.5x (the checkpoint's training scale)" in capsys.readouterr().err
    assert json.loads((tmp_path / "s.json").read_text())["scale"] == 1.5


def test_predict_defaults_use_the_training_mpp_or_fall_back_with_a_note(tmp_path, mpp_checkpoint, capsys):
    from napari_wsss_cram.core.evaluate import predict_labels
    from napari_wsss_cram.core.inference import PredictSettings, predict_array
    from napari_wsss_cram.core.io.ometiff import write_pyramidal_ome_tiff
    from napari_wsss_cram.core.io.png import read_index_png
    from napari_wsss_cram.core.progress import drive

    model, info = load_checkpoint(mpp_checkpoint)
    # an image with its µm/px (0.25): processed at the checkpoint's 0.5 µm/px
    rgb = (np.random.default_rng(1).random((64, 64, 3)) * 180).astype(np.uint8)
    write_pyramidal_ome_tiff(tmp_path / "slide.ome.tif", rgb, mpp=0.25)
    assert main(["predict", str(mpp_checkpoint), str(tmp_path / "slide.ome.tif"), "--out", str(tmp_path / "a"),
                 "--format", "png"]) == 0
    err = capsys.readouterr().err
    assert "at 0.5 µm/px (the checkpoint's training µm/px)" in err and "note:" not in err
    expected = drive(predict_array(model, info, rgb, PredictSettings(mpp=0.5), mpp=0.25)).labels
    np.testing.assert_array_equal(read_index_png(tmp_path / "a" / "slide.png", WSSS4LUAD), np.asarray(expected))

    # a PNG without µm/px: the training scale (2.0), with a one-line note instead of an error
    png = _png(tmp_path / "patch.png", seed=2)
    assert main(["predict", str(mpp_checkpoint), str(tmp_path / "patch.png"), "--out", str(tmp_path / "b"),
                 "--format", "png"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "patch.png" in notes[0] and "scale 2x (the checkpoint's training scale)" in notes[0]
    np.testing.assert_array_equal(read_index_png(tmp_path / "b" / "patch.png", WSSS4LUAD),
                                  predict_labels(model, png, scale=2.0))

    # an explicit --mpp on such an image stays an error (asked for, not defaulted)
    assert main(["predict", str(mpp_checkpoint), str(tmp_path / "patch.png"), "--out", str(tmp_path / "c"),
                 "--mpp"]) == 2
    assert "does not state its pixel size" in capsys.readouterr().err


@pytest.mark.gui
def test_segment_dock_takes_the_rule_when_a_model_is_picked(make_napari_viewer, scale_checkpoint, mpp_checkpoint,
                                                           tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_CRAM_SETTINGS_FILE", str(tmp_path / "settings.ini"))
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-wsss-cram", "Segment")
    assert widget.set_checkpoint(scale_checkpoint), widget.message.text()
    assert widget.resolution_combo.currentText() == "scale" and widget.resolution_value.value() == 1.5
    assert widget.predict_settings().scale == 1.5 and widget.predict_settings().mpp is None
    assert widget.set_checkpoint(mpp_checkpoint), widget.message.text()
    assert widget.resolution_combo.currentText() == "µm/px" and widget.resolution_value.value() == 0.5
    assert widget.predict_settings().mpp == 0.5
    # an image layer known to have no µm/px (opened by the reader) gets the training scale
    viewer.add_image(np.zeros((32, 32, 3), np.uint8), rgb=True, name="patch", metadata={"mpp": None})
    assert widget.set_checkpoint(mpp_checkpoint)
    assert widget.resolution_combo.currentText() == "scale" and widget.resolution_value.value() == 2.0
