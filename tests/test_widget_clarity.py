"""What confused a new user in the docks (issue 20, items 13-15), on a real viewer under Xvfb."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wsss_cram.core.classes import WSSS4LUAD

pytestmark = pytest.mark.gui
PLUGIN = "napari-wsss-cram"


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_CRAM_SETTINGS_FILE", str(tmp_path / "settings.ini"))


def test_key_help_shows_the_class_keys_not_napari_digits(make_napari_viewer):
    """napari's key help (status bar) listed <1> erase, <3> polygon, <4> fill while 1-3 paint classes here."""
    from napari_wsss_cram.widgets.layers import add_result_layers

    viewer = make_napari_viewer()
    image = viewer.add_image(np.full((20, 20, 3), 200, np.uint8), name="patch", rgb=True)
    layer = add_result_layers(viewer, image, np.zeros((20, 20), np.uint8), None, WSSS4LUAD)["labels"]
    viewer.layers.selection.active = layer
    for mode in ("paint", "fill", "erase", "pan_zoom"):
        layer.mode = mode
        for text in (layer.help, viewer.help):
            assert "<1> tumor" in text and "<2> stroma" in text and "<3> normal" in text and "<0> background" in text
            assert not any(f"use <{d}>" in text for d in "1234567")  # napari's digit meanings are gone
    assert "use <F> for" in layer.help or layer.mode == "fill"
    # a plain labels layer keeps napari's own help
    other = viewer.add_labels(np.zeros((5, 5), np.uint8), name="other")
    other.mode = "paint"
    assert "<1> tumor" not in other.help


def test_train_dock_speaks_plain_words_validates_along_the_way_and_keeps_its_total(
        make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """Item 14: the loss legend in words, the weights note naming the dock's control, one step total, and
    validation mIoU during training (not one point at the end)."""
    from napari_wsss_cram.widgets.plot import LOSS_WORDS
    from napari_wsss_cram.widgets.train import steady_total
    from test_widget_train import patch_folder, val_folder  # noqa: F401 (fixtures, called below)

    patches, val = patch_folder.__wrapped__(tmp_path), val_folder.__wrapped__(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache: the note about ImageNet
    monkeypatch.delenv("WSSS_CRAM_BACKBONE_WEIGHTS", raising=False)
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    widget.preset_combo.setCurrentText("sample")
    widget.data_row.setText(str(patches))
    widget.val_row.setText(str(val))
    widget.out_row.setText(str(tmp_path / "run"))
    widget.backbone_combo.setCurrentText("resnet18")
    widget.weights_combo.setCurrentText("ImageNet if cached, else random")
    assert "--" not in widget.weights_label.text() and "'ImageNet' in Weights" in widget.weights_label.text()
    widget.steps_spin.setValue(5)
    widget.batch_spin.setValue(4)
    widget.crop_spin.setValue(64)
    widget.device_combo.setCurrentText("cpu")
    maxima = []
    widget.progress_bar.valueChanged.connect(lambda _v: maxima.append(widget.progress_bar.maximum()))
    widget.start()
    assert widget.worker is not None, widget.message.text()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.checkpoint_path is not None, widget.message.text()
    steps, _ = widget.plot.miou
    assert len(steps) >= 2 and min(steps) < 5  # during training, at steps
    legend = [t.get_text() for t in widget.plot.loss_axes.get_legend().get_texts()]
    assert legend and not {"cls", "bg", "presence", "constrained"} & set(legend)
    assert set(legend) <= set(LOSS_WORDS.values())
    # 1: the bar's end state; the recipe's pseudo-labels count patches; never 4 then 5
    assert set(maxima) <= {5, 1, len(list(patches.glob("*.png")))}
    # a time budget's estimate that wobbles by a step or two is not shown
    shown = 0
    for estimate, done in [(40, 1), (38, 2), (40, 3), (39, 4)]:
        shown = steady_total(shown, estimate, done)
        assert shown == 40
    assert steady_total(40, 20, 5) == 20  # a real change is


def test_run_cancel_and_palette_in_view_at_1366x768_with_both_docks(make_napari_viewer, qtbot):
    """Item 15: with the Segment and Train docks open in a 1366x768 window, Run, Cancel and the class palette
    are on screen without scrolling (they were below the fold: about six rows of the dock showed)."""
    from napari_wsss_cram.widgets.layers import add_result_layers

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1366, 768)
    image = viewer.add_image(np.full((20, 20, 3), 200, np.uint8), name="patch", rgb=True)
    add_result_layers(viewer, image, np.zeros((20, 20), np.uint8), None, WSSS4LUAD)
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    qtbot.wait(300)
    assert segment.export_panel.palette.buttons  # the labels layer's classes
    dock_height = segment.height()
    assert dock_height < 500  # the two docks share the window's height
    wanted = [segment.run_button, segment.cancel_button, *segment.export_panel.palette.buttons]
    for widget in wanted:
        region = widget.visibleRegion()
        assert not region.isEmpty(), widget.text()
        assert region.boundingRect().height() == widget.height(), widget.text()  # whole, not cut by the fold
    # whatever the scroll position of the rest
    segment.scroll_area.verticalScrollBar().setValue(segment.scroll_area.verticalScrollBar().maximum())
    qtbot.wait(50)
    assert all(not w.visibleRegion().isEmpty() for w in wanted)


def test_key_help_after_a_run_of_the_dock(make_napari_viewer, qtbot, tmp_path):
    """The layer the dock adds (through napari's public proxies) gets the class keys in the status bar at once."""
    from widget_helpers import he_like_image, make_tiny_checkpoint

    viewer = make_napari_viewer()
    viewer.add_image(he_like_image(96), name="patch", rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    assert widget.set_checkpoint(make_tiny_checkpoint(tmp_path / "tiny.pt"))
    widget.tile_spin.setValue(64)
    widget.resolution_value.setValue(1.0)
    widget.crf_check.setChecked(False)
    widget.run()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    assert viewer.layers.selection.active.name == "labels: patch"
    assert "<1> tumor" in viewer.help and "use <1>" not in viewer.help
