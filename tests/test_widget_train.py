"""Train dock: scan, a few-step training with live plot, Use this model, corrected examples, bad folders."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from napari_wsss_cram.core.classes import WSSS4LUAD
from widget_helpers import he_like_image

pytestmark = pytest.mark.gui

PLUGIN = "napari-wsss-cram"


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_CRAM_SETTINGS_FILE", str(tmp_path / "settings.ini"))


@pytest.fixture
def patch_folder(tmp_path):
    """Eight 64 px patches in the WSSS4LUAD naming, with a rare 'normal' class."""
    folder = tmp_path / "patches"
    folder.mkdir()
    flags = ["1, 0, 0", "0, 1, 0", "1, 1, 0", "1, 0, 0", "0, 1, 0", "1, 1, 0", "0, 0, 1", "1, 1, 0"]
    for i, f in enumerate(flags):
        Image.fromarray(he_like_image(64, seed=i)).save(folder / f"{i}-[{f}].png")
    return folder


@pytest.fixture
def val_folder(tmp_path):
    from napari_wsss_cram.core.io.png import write_index_png

    folder = tmp_path / "val"
    (folder / "img").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(he_like_image(64, seed=10 + i)).save(folder / "img" / f"v{i}.png")
        mask = np.full((64, 64), WSSS4LUAD.background_index, np.uint8)
        mask[:32, :32], mask[32:, :32] = 0, 1
        write_index_png(folder / "mask" / f"v{i}.png", mask, WSSS4LUAD)
    return folder


def _train_dock(viewer):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    return widget


def test_scan_shows_counts_and_warns_small_classes(make_napari_viewer, patch_folder):
    widget = _train_dock(make_napari_viewer())
    widget.data_row.setText(str(patch_folder))
    assert widget.scan()
    text = widget.scan_label.text()
    assert "8 patches" in text
    assert "tumor 5" in text and "stroma 5" in text and "normal 1" in text
    assert "tumor+stroma 3" in text
    assert "warning" in text and "normal" in text.split("warning", 1)[1]


def test_bad_folder_gives_a_visible_message(make_napari_viewer, tmp_path):
    widget = _train_dock(make_napari_viewer())
    widget.data_row.setText(str(tmp_path / "nowhere"))
    assert not widget.scan()
    assert "nowhere" in widget.message.text()
    widget.out_row.setText(str(tmp_path / "run"))
    widget.start()
    assert widget.worker is None and "does not exist" in widget.message.text()


def test_short_training_updates_plot_and_feeds_segment_dock(make_napari_viewer, qtbot, patch_folder, val_folder,
                                                            tmp_path):
    viewer = make_napari_viewer()
    widget = _train_dock(viewer)
    widget.preset_combo.setCurrentText("sample")
    widget.data_row.setText(str(patch_folder))
    widget.val_row.setText(str(val_folder))
    widget.out_row.setText(str(tmp_path / "run"))
    widget.backbone_combo.setCurrentText("resnet18")
    widget.steps_spin.setValue(2)
    widget.batch_spin.setValue(4)
    widget.crop_spin.setValue(64)
    widget.device_combo.setCurrentText("cpu")
    widget.start()
    assert widget.worker is not None, widget.message.text()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    # Run trains the whole recipe: the joint model, its pseudo-labels, a segmentation round -> final.pt
    assert widget.checkpoint_path == str(tmp_path / "run" / "final.pt"), widget.message.text()
    assert widget.progress_bar.value() == 2
    # the curves go on across the stages: 2 steps of the joint model, then 2 of the segmentation round
    assert "total" in widget.plot.losses and widget.plot.losses["total"][0] == [1, 2, 3, 4]
    assert len(widget.plot.losses["cls"][0]) == 2  # the image-level loss belongs to the joint model only
    assert len(widget.plot.miou[0]) >= 1  # validation mIoU plotted
    assert widget.use_button.isEnabled()
    assert widget.use_model()
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")  # the dock Use this model opened
    assert segment.model is not None and segment.checkpoint_row.text() == widget.checkpoint_path


def test_add_corrected_labels_writes_a_pixel_labelled_example(make_napari_viewer, tmp_path, patch_folder):
    from napari_wsss_cram.core.data.patches import discover_patches
    from napari_wsss_cram.core.data.pixel import discover_pixel_dataset, load_pixel_sample

    viewer = make_napari_viewer()
    rgb = he_like_image(256)
    viewer.add_image(rgb, name="case 1", rgb=True)
    mask = np.full((256, 256), WSSS4LUAD.background_index, np.uint8)
    mask[:, :128], mask[:, 128:200] = 0, 1
    viewer.add_labels(mask, name="case 1 CRF labels")
    widget = _train_dock(viewer)
    widget.image_combo.setCurrentText("case 1")
    widget.labels_combo.setCurrentText("case 1 CRF labels")
    widget.corrections_row.setText(str(tmp_path / "corrections"))
    written = widget.add_corrections()
    assert written, widget.message.text()
    index = discover_pixel_dataset(tmp_path / "corrections", WSSS4LUAD)
    assert len(index) == 1
    image, saved_mask = load_pixel_sample(index.samples[0], WSSS4LUAD)
    np.testing.assert_array_equal(image, rgb)
    np.testing.assert_array_equal(saved_mask, mask)
    patches = discover_patches(tmp_path / "corrections" / "patches", WSSS4LUAD)
    assert len(patches) == len(written) - 2 > 0
    assert patches.counts_per_class()["tumor"] > 0 and patches.counts_per_class()["normal"] == 0
    # The next run mixes them in: the training data becomes a CSV listing both folders.
    widget.data_row.setText(str(patch_folder))
    widget.out_row.setText(str(tmp_path / "run"))
    assert widget.mix_check.isChecked()
    config = widget.config()
    assert len(discover_patches(config.data)) == 8 + len(patches)
    # ... and the corrected masks come with them as strong pixel labels (WSSS-CRAM3).
    from napari_wsss_cram.core.data.augment import AugmentConfig
    from napari_wsss_cram.core.data.patches import PatchDataset

    assert PatchDataset(discover_patches(config.data), AugmentConfig(crop=32)).n_strong == len(patches)


def test_cancel_then_resume_finishes_the_run(make_napari_viewer, qtbot, patch_folder, tmp_path):
    widget = _train_dock(make_napari_viewer())
    widget.preset_combo.setCurrentText("sample")
    widget.data_row.setText(str(patch_folder))
    widget.out_row.setText(str(tmp_path / "run"))
    widget.backbone_combo.setCurrentText("resnet18")
    widget.steps_spin.setValue(4)
    widget.batch_spin.setValue(4)
    widget.crop_spin.setValue(64)
    widget.device_combo.setCurrentText("cpu")
    widget.start()
    qtbot.waitUntil(lambda: widget.progress_bar.value() >= 1, timeout=60_000)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    # stopped in the recipe's first stage: the joint model's last checkpoint is usable
    assert "cancelled" in widget.message.text()
    assert widget.checkpoint_path == str(tmp_path / "run" / "joint" / "last.pt")
    assert widget.resume_button.isEnabled()
    widget.start(resume=True)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.checkpoint_path == str(tmp_path / "run" / "final.pt"), widget.message.text()
    assert widget.progress_bar.value() == 4


def test_time_budget_comes_from_the_preset_and_reaches_the_run(make_napari_viewer, patch_folder, tmp_path):
    viewer = make_napari_viewer()
    widget = _train_dock(viewer)
    widget.preset_combo.setCurrentText("cpu-small")
    widget.apply_preset()
    assert widget.minutes_spin.value() == 60.0            # cpu-small trains the whole recipe in 60 minutes
    widget.data_row.setText(str(patch_folder))
    widget.out_row.setText(str(tmp_path / "run"))
    assert widget.config().minutes == 60.0
    widget.minutes_spin.setValue(0.0)                     # "no time limit"
    assert widget.config().minutes is None


def test_weights_choice_says_what_a_run_starts_from_and_reaches_the_config(make_napari_viewer, patch_folder,
                                                                            tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache; nothing is downloaded here
    monkeypatch.delenv("WSSS_CRAM_BACKBONE_WEIGHTS", raising=False)
    widget = _train_dock(make_napari_viewer())
    widget.preset_combo.setCurrentText("cpu-small")
    widget.apply_preset()
    widget.data_row.setText(str(patch_folder))
    widget.out_row.setText(str(tmp_path / "run"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert widget.weights_combo.currentText() == "ImageNet if cached, else random"  # the offline default
    assert widget.config().weights == "auto"
    assert "random weights" in widget.weights_label.text() and str(cache) in widget.weights_label.text()
    widget.weights_combo.setCurrentText("ImageNet (download if needed)")
    assert widget.config().weights == "imagenet"
    assert f"downloaded at the start into {cache}" in widget.weights_label.text()
    assert "resnet18-" in widget.weights_label.text()
    widget.backbone_combo.setCurrentText("resnet50")
    assert "resnet50-" in widget.weights_label.text()
    widget.weights_combo.setCurrentText("file…")
    assert widget.weights_row.isVisibleTo(widget)
    widget.weights_row.setText(str(tmp_path / "missing.pth"))
    widget.start()
    assert widget.worker is None and "missing.pth" in widget.message.text()
    local = tmp_path / "r50.pth"
    torch.save({}, local)
    widget.weights_row.setText(str(local))
    assert widget.config().weights == str(local)
    assert widget.weights_label.text() == f"Starts from the weights file {local}."
    widget.weights_combo.setCurrentText("random")
    assert widget.config().weights == "none" and not widget.weights_row.isVisibleTo(widget)


# ----- issue 12, bug 13: Resume, "Use this model" after Cancel, the plot across a resume -------------------------
def test_resume_and_use_after_cancel(make_napari_viewer, qtbot, patch_folder, tmp_path):
    viewer = make_napari_viewer()
    widget = _train_dock(viewer)
    assert not widget.resume_button.isEnabled()  # nothing to resume before any run
    widget.preset_combo.setCurrentText("sample")
    widget.data_row.setText(str(patch_folder))
    widget.out_row.setText(str(tmp_path / "run"))
    assert not widget.resume_button.isEnabled() and not widget.use_button.isEnabled()
    widget.backbone_combo.setCurrentText("resnet18")
    widget.steps_spin.setValue(4)
    widget.batch_spin.setValue(4)
    widget.crop_spin.setValue(64)
    widget.device_combo.setCurrentText("cpu")
    widget.start()
    qtbot.waitUntil(lambda: widget.progress_bar.value() >= 1, timeout=60_000)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.resume_button.isEnabled()
    assert widget.use_button.isEnabled() and widget.checkpoint_path.endswith("last.pt")
    steps_before = {name: list(steps) for name, (steps, _) in widget.plot.losses.items()}
    assert steps_before
    widget.start(resume=True)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    for name, steps in steps_before.items():  # the resumed run continues the curves
        assert widget.plot.losses[name][0][: len(steps)] == steps
    assert widget.use_model()
    assert "Segment dock now uses" in widget.message.text()


def test_one_validation_point_gets_an_epoch_axis():
    from napari_wsss_cram.widgets.plot import TrainingPlot

    plot = TrainingPlot()
    plot.add_miou(1, 0.42)
    low, high = plot.miou_axes.get_xlim()
    assert low <= 0 and high >= 2


def test_train_errors_name_dock_controls(make_napari_viewer, qtbot, patch_folder, tmp_path):
    widget = _train_dock(make_napari_viewer())
    widget.preset_combo.setCurrentText("sample")
    widget.data_row.setText(str(patch_folder))
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"an earlier run")
    widget.out_row.setText(str(run))
    widget.device_combo.setCurrentText("cpu")
    widget.start()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    text = widget.message.text()
    assert "already holds a run" in text and "'Resume'" in text and "--" not in text


# ----- issue 12, bug 14: warnings reach the dock --------------------------------------------------------------------
def test_warnings_of_a_run_reach_the_dock(make_napari_viewer, qtbot, patch_folder, tmp_path):
    widget = _train_dock(make_napari_viewer())
    widget.preset_combo.setCurrentText("sample")
    widget.data_row.setText(str(patch_folder))  # one 'normal' patch: the trainer warns about it
    widget.out_row.setText(str(tmp_path / "run"))
    widget.backbone_combo.setCurrentText("resnet18")
    widget.steps_spin.setValue(1)
    widget.batch_spin.setValue(4)
    widget.crop_spin.setValue(64)
    widget.device_combo.setCurrentText("cpu")
    widget.start()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert any("'normal'" in w and "patches" in w for w in widget.warnings), widget.warnings


def test_forward_warnings_takes_only_the_worker_threads_records():
    import logging
    import threading

    from napari_wsss_cram.widgets._common import forward_warnings

    log = logging.getLogger("napari_wsss_cram.core.somewhere")

    def job():
        log.warning("tile %d needed a smaller batch", 3)
        yield "step 1"
        other = threading.Thread(target=lambda: log.warning("from another thread"))
        other.start()
        other.join()
        yield "step 2"
        return "result"

    events, result = [], None
    gen = forward_warnings(job())
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert result == "result"
    assert [getattr(e, "phase", e) for e in events] == ["warning", "step 1", "step 2"]
    assert events[0].info["message"] == "tile 3 needed a smaller batch"
