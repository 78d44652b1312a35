"""One owner per setting: every `predict` and `train` flag and every dock field left untouched yields the dataclass
default; `wsss-cram predict` and the Segment dock's Run give bit-identical labels; the dock's forms are generated
from the dataclasses (a field added to one shows up in the form)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest

from napari_wsss_cram.cli import main
from napari_wsss_cram.core.crf import CRFParams
from napari_wsss_cram.core.fields import dock_fields, field_default, help_of, setting
from napari_wsss_cram.core.inference import PredictSettings
from napari_wsss_cram.core.train_config import TrainConfig

PLUGIN = "napari-wsss-cram"


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The optional flags (``--out``, required, has no default to own)."""
    return [a for a in parser._actions if a.option_strings and not a.required and a.dest not in ("help", "version")]


@pytest.fixture(scope="module")
def demo():
    from napari_wsss_cram.core.checkpoint import load_checkpoint
    from napari_wsss_cram.core.resources import demo_model_path

    path = demo_model_path()
    if not path.is_file():
        pytest.skip("the bundled demo model is not built")
    return path, load_checkpoint(path)[1]


def test_every_predict_flag_left_out_is_the_dataclass_default(tmp_path, demo):
    from napari_wsss_cram.commands import predict
    from napari_wsss_cram.core.checkpoint import default_resolution
    from napari_wsss_cram.core.io.images import ImageSource

    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    args = parser.parse_args([str(demo[0]), "x.png", "--out", str(tmp_path)])
    reader_default = inspect.signature(ImageSource.open).parameters["reader"].default
    for action in _flags(parser):
        value = getattr(args, action.dest)
        assert value == action.default
        if action.dest == "reader":  # the reader's own default, shown as a choice
            assert value == reader_default
        else:
            assert value in (None, False), f"{action.option_strings} has a literal default {value!r}"
    args.formats = ("png",)
    settings, fallback = predict.settings_from_args(args, demo[1])
    default = PredictSettings()
    for f in dataclasses.fields(PredictSettings):
        if f.name not in ("scale", "mpp", "with_probs"):  # resolution: the checkpoint's; probs: by --format
            assert getattr(settings, f.name) == getattr(default, f.name), f.name
    resolution = default_resolution(demo[1])
    assert (settings.mpp, fallback is not None) == (resolution.mpp, resolution.mpp is not None)
    assert settings.crf is False and settings.crf_params == CRFParams() and settings.batch is None


def test_every_train_flag_left_out_is_the_dataclass_default(tmp_path):
    from napari_wsss_cram.commands import train
    from napari_wsss_cram.core.model.config import ModelConfig
    from napari_wsss_cram.core.train_config import TrainConfig

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "patches"), "--out", str(tmp_path / "run")])
    for action in _flags(parser):
        assert getattr(args, action.dest) in (None, False) and action.default in (None, False), action.option_strings
    config = train.config_from_args(args)
    default = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("data", "out", "model"):
            assert getattr(config, f.name) == getattr(default, f.name), f.name
    assert ModelConfig.from_dict(dict(config.model)) == ModelConfig()
    assert (config.data, config.out) == (str(tmp_path / "patches"), str(tmp_path / "run"))


def test_presets_state_only_what_they_change():
    """A preset line equal to the dataclass default would be a second place the value is typed."""
    import tomllib

    from napari_wsss_cram.core.model.config import ModelConfig
    from napari_wsss_cram.core.resources import preset_names, preset_path
    from napari_wsss_cram.core.train_config import TrainConfig

    for name in preset_names():
        data = tomllib.loads(Path(preset_path(name)).read_text(encoding="utf-8"))
        for owner, table in ((TrainConfig(), {k: v for k, v in data.items() if k != "model"}),
                             (ModelConfig(), data.get("model", {}))):
            for key, value in table.items():
                if hasattr(owner, key):
                    default = getattr(owner, key)
                    assert value != (list(default) if isinstance(default, tuple) else default), (name, key)


@dataclasses.dataclass
class _Extended(PredictSettings):
    """The engine's settings with one more field, as a developer would add it."""

    sharpen: float = setting(0.5, "a new knob", label="Sharpen", step=0.1, low=0.0, high=2.0, dock=True)


@pytest.mark.gui
def test_a_field_added_to_the_dataclass_shows_up_in_the_form(qtbot):
    from napari_wsss_cram.widgets._forms import SettingsForm

    form = SettingsForm(_Extended)
    assert form.names == ["tile", "overlap", "crf", "background", "gate_classes", "sharpen"]
    box = form.native_of("sharpen")
    assert (box.value(), box.minimum(), box.maximum(), box.singleStep()) == (0.5, 0.0, 2.0, 0.1)
    assert form["sharpen"].tooltip == "a new knob" and form["sharpen"].label == "Sharpen"
    # bounds of the old fields come from core.validate.RANGES; choices make a combo box
    assert (form.native_of("tile").minimum(), form.native_of("tile").maximum()) == (32, 8192)
    assert form["background"].choices == ("tissue", "model")
    form["sharpen"].value = 1.5
    form["tile"].value = 256
    built = _Extended(**form.values())
    assert (built.sharpen, built.tile, built.overlap) == (1.5, 256, PredictSettings.overlap)
    form.reset()
    assert form.values() == {n: field_default(_Extended, n) for n in form.names}


def _segment_dock(viewer, qtbot, checkpoint=None):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    if checkpoint is not None:
        assert widget.set_checkpoint(checkpoint), widget.message.text()
    qtbot.waitUntil(lambda: widget.model is not None, timeout=60_000)
    return widget


@pytest.mark.gui
def test_every_segment_dock_field_left_untouched_is_the_dataclass_default(make_napari_viewer, qtbot, demo):
    from napari_wsss_cram.core.checkpoint import default_resolution
    from widget_helpers import he_like_image

    viewer = make_napari_viewer()
    viewer.add_image(he_like_image(64), name="patch", rgb=True)
    widget = _segment_dock(viewer, qtbot)
    advanced = widget.advanced
    for form in (advanced.predict_form, advanced.crf_form, advanced.pseudo_form):
        for name, value in form.values().items():
            assert value == field_default(form.settings_class, name), name
    settings = widget.predict_settings()
    default = PredictSettings()
    for f in dataclasses.fields(PredictSettings):
        if f.name not in ("scale", "mpp", "crf_isolated", "with_cam"):  # resolution; GUI-only switches
            assert getattr(settings, f.name) == getattr(default, f.name), f.name
    resolution = default_resolution(widget.info)
    assert (settings.scale, settings.mpp) == (
        (resolution.scale, None) if resolution.mpp is None else (default_resolution(widget.info, False).scale,
                                                                  resolution.mpp))


@pytest.mark.gui
def test_every_train_dock_field_left_untouched_is_the_preset(make_napari_viewer, qtbot, tmp_path):
    from napari_wsss_cram.core.model.config import ModelConfig
    from napari_wsss_cram.widgets._train_job import preset_config

    (tmp_path / "patches").mkdir()
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    widget.data_row.setText(str(tmp_path / "patches"))
    widget.out_row.setText(str(tmp_path / "run"))
    config = widget.config()
    preset = preset_config(widget.preset_combo.currentText())
    shown = dock_fields(TrainConfig)
    assert widget.schedule_form.names == shown and {"epochs", "steps", "minutes", "lr"} <= set(shown)
    for name in [*shown, "weights"]:
        assert getattr(config, name) == getattr(preset, name), name
    assert config.model["backbone"] == preset.model.get("backbone", ModelConfig.backbone)


@pytest.mark.gui
def test_the_train_dock_form_is_built_from_train_config(make_napari_viewer, qtbot, tmp_path):
    """Labels, tooltips and bounds come from TrainConfig's field metadata (the CLI's help says the same), and an
    optional number's lowest value ("by epochs / time") is None, overriding a preset that sets it."""
    from napari_wsss_cram.core.validate import TRAIN_RANGES

    (tmp_path / "patches").mkdir()
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    form = widget.schedule_form
    assert form["lr"].label == "Learning rate" and form["lr"].tooltip == help_of(TrainConfig, "lr")
    assert (widget.crop_spin.minimum(), widget.crop_spin.maximum()) == TRAIN_RANGES["crop"][:2]
    assert widget.steps_spin.specialValueText() == "by epochs / time"
    widget.data_row.setText(str(tmp_path / "patches"))
    widget.out_row.setText(str(tmp_path / "run"))
    widget.preset_combo.setCurrentText("sample")             # the sample preset trains 300 steps
    assert widget.steps_spin.value() == 300 and widget.config().steps == 300
    widget.steps_spin.setValue(0)                            # "by epochs / time"
    widget.epochs_spin.setValue(3)
    config = widget.config()
    assert (config.steps, config.epochs, config.minutes) == (None, 3, None)


def _cli_and_dock_labels(make_napari_viewer, qtbot, tmp_path, image: Path, checkpoint: Path):
    from PIL import Image

    out = tmp_path / "cli"
    assert main(["predict", str(checkpoint), str(image), "--out", str(out), "--format", "png"]) == 0
    cli = np.asarray(Image.open(out / f"{image.stem}.png"))
    viewer = make_napari_viewer()
    viewer.open(str(image))
    widget = _segment_dock(viewer, qtbot, checkpoint)
    assert widget.run_button.isEnabled(), widget.message.text()
    widget.run()
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert widget.last_result is not None, widget.message.text()
    return cli, np.asarray(widget.last_result["labels"].data)


@pytest.mark.gui
def test_predict_and_the_dock_give_bit_identical_labels_on_the_sample(make_napari_viewer, qtbot, tmp_path, demo):
    from napari_wsss_cram._sample_data import sample_patch_paths

    image, _ = sample_patch_paths()
    cli, dock = _cli_and_dock_labels(make_napari_viewer, qtbot, tmp_path, image, demo[0])
    assert cli.shape == dock.shape and cli.dtype == dock.dtype == np.uint8
    assert len(np.unique(cli)) > 1  # a real map, not an empty one
    np.testing.assert_array_equal(cli, dock)


@pytest.mark.gui
@pytest.mark.shared_data
def test_predict_and_the_dock_give_bit_identical_labels_on_wsss4luad(make_napari_viewer, qtbot, tmp_path, demo,
                                                                      wsss4luad_dir):
    image = sorted((wsss4luad_dir / "2.validation" / "img").glob("*.png"))[0]
    cli, dock = _cli_and_dock_labels(make_napari_viewer, qtbot, tmp_path, image, demo[0])
    assert cli.shape == dock.shape
    np.testing.assert_array_equal(cli, dock)
