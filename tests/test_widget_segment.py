"""Segment dock: manifest docks, result layers, cancel, edit protection, export, bad inputs (napari Qt, Xvfb)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from napari_wsss_cram.core.classes import WSSS4LUAD
from widget_helpers import he_like_image, make_tiny_checkpoint

pytestmark = pytest.mark.gui

PLUGIN = "napari-wsss-cram"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_CRAM_SETTINGS_FILE", str(tmp_path / "settings.ini"))


def _segment_dock(viewer, checkpoint, image=None, name="patch"):
    viewer.add_image(he_like_image(96) if image is None else image, name=name, rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    assert widget.set_checkpoint(checkpoint), widget.message.text()
    widget.tile_spin.setValue(64)
    widget.overlap_spin.setValue(16)
    widget.resolution_value.setValue(1.0)
    return widget


def _field_of_view_dock(viewer, checkpoint):
    """A two-level 256 px pyramid "slide" (0.25 world units per pixel) and a Segment dock set to segment the
    current field of view at output level 1, CRF off."""
    full = he_like_image(256)
    viewer.add_image([full, full[::2, ::2]], name="slide", rgb=True, multiscale=True, scale=(0.25, 0.25))
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    assert widget.set_checkpoint(checkpoint)
    widget.tile_spin.setValue(64)
    widget.resolution_value.setValue(1.0)
    widget.crf_check.setChecked(False)
    widget.level_spin.setValue(1)
    widget.region_combo.setCurrentText("Current field of view")
    return widget


def _run_and_wait(qtbot, widget, timeout=60_000):
    assert widget.run_button.isEnabled(), widget.message.text()
    widget.run()
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


def _settled(qtbot, *docks) -> None:
    """Wait for the background model loads of docks opened without set_checkpoint: a model built in a worker
    thread draws from torch's global random generator, which a later test's seeded tiny model also uses."""
    qtbot.waitUntil(lambda: not any(getattr(dock, "loading_model", False) for dock in docks), timeout=60_000)


def test_docks_open_through_the_manifest(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    _settled(qtbot, segment)
    assert type(segment).__name__ == "SegmentWidget" and type(train).__name__ == "TrainWidget"
    # No image yet: Run is disabled and the dock says what is missing.
    assert not segment.run_button.isEnabled()
    assert "RGB H&E image" in segment.message.text()
    assert set(segment.device_combo.itemText(i) for i in range(segment.device_combo.count())) >= {"auto", "cpu"}


def test_segment_patch_adds_named_coloured_layers(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    viewer.layers["patch"].scale = (0.5, 0.5)
    viewer.layers["patch"].translate = (10.0, 20.0)
    assert widget.model_card.toolTip().startswith("resnet18, classes tumor, stroma, normal")  # the model card
    _run_and_wait(qtbot, widget)
    names = [layer.name for layer in viewer.layers]
    assert names == ["patch", "tumor activation: patch", "labels: patch"]  # one map layer, the dock picks its class
    labels = viewer.layers["labels: patch"]
    assert labels.data.shape == (96, 96) and labels.data.dtype == np.uint8
    assert labels.data.max() <= WSSS4LUAD.background_index
    np.testing.assert_allclose(labels.scale, (0.5, 0.5))
    np.testing.assert_allclose(labels.translate, (10.0, 20.0))
    # Class colours from the ClassSpec, background transparent, class names for the status bar.
    np.testing.assert_allclose(labels.colormap.map(np.array([0]))[0][:3], np.array(WSSS4LUAD.colors[0]) / 255)
    assert labels.colormap.map(np.array([WSSS4LUAD.background_index]))[0][3] == 0
    assert list(labels.features["class"]) == list(WSSS4LUAD.all_names)
    activation = viewer.layers["tumor activation: patch"]
    maps = activation.metadata["wsss_cram"]["maps"]
    assert maps.shape == (3, 96, 96) and maps.dtype == np.uint8
    np.testing.assert_array_equal(activation.data, maps[0])
    assert tuple(activation.contrast_limits) == (0, 255) and activation.blending == "translucent"
    assert activation.colormap.map(np.array([0.0]))[0][3] == 0  # low activation is see-through (a heatmap)
    np.testing.assert_allclose(activation.scale, (0.5, 0.5))
    widget.activation_combo.setCurrentText("stroma")  # another class: no re-run
    widget.opacity_slider.setValue(40)
    assert activation.name == "stroma activation: patch" and activation.opacity == pytest.approx(0.4)
    np.testing.assert_array_equal(activation.data, maps[1])
    # The composition table follows the labels.
    table = widget.update_composition()
    assert sum(v["pixels"] for v in table["classes"].values()) == 96 * 96
    assert widget.export_panel.composition_table.rowCount() == WSSS4LUAD.num_outputs


def test_cancel_mid_run_adds_no_layer(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint, image=he_like_image(384))
    widget.crf_check.setChecked(True)
    widget.tile_spin.setValue(64)
    widget.run()
    qtbot.waitUntil(lambda: widget.progress_bar.value() >= 1, timeout=30_000)
    t0 = time.monotonic()
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.busy, timeout=10_000)
    stop_seconds = time.monotonic() - t0
    print(f"\ncancel -> worker finished in {stop_seconds:.2f} s")
    assert [layer.name for layer in viewer.layers] == ["patch"]
    assert "Cancelled" in widget.message.text()
    assert widget.run_button.isEnabled()
    assert widget.progress_bar.text() == "Cancelled" and widget.progress_bar.value() == 0


def test_progress_bar_says_done_when_the_run_ends(make_napari_viewer, qtbot, tiny_checkpoint):
    """Issue 12: after a run the bar went back to 0 %; it stays full and says Done."""
    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    widget.crf_check.setChecked(False)
    _run_and_wait(qtbot, widget)
    bar = widget.progress_bar
    assert bar.maximum() >= 1 and bar.value() == bar.maximum() and bar.text() == "Done"


def test_rerun_keeps_edited_labels(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    widget.crf_check.setChecked(False)
    _run_and_wait(qtbot, widget)
    first = viewer.layers["labels: patch"]
    # An unedited result is updated in place by a re-run.
    _run_and_wait(qtbot, widget)
    assert [ly.name for ly in viewer.layers].count("labels: patch") == 1
    assert viewer.layers["labels: patch"] is first
    # The user paints a correction: the next run must not touch it.
    before = first.data.copy()
    first.paint((5, 5), new_label=2)
    edited = first.data.copy()
    assert (edited != before).any()
    _run_and_wait(qtbot, widget)
    labels_layers = [ly for ly in viewer.layers if ly.name.startswith("labels: patch")]
    assert len(labels_layers) == 2
    np.testing.assert_array_equal(first.data, edited)
    assert widget.export_panel.labels_combo.currentText() == labels_layers[1].name


def test_export_writes_valid_png_ometiff_geojson(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path):
    import tifffile

    from napari_wsss_cram.core.io.png import read_index_png
    from napari_wsss_cram.core.io.qupath import geojson_to_labels

    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    widget.crf_check.setChecked(False)
    _run_and_wait(qtbot, widget)
    layer = viewer.layers["labels: patch"]
    layer.data = np.full_like(layer.data, WSSS4LUAD.background_index)
    layer.data[10:60, 10:50] = 0
    layer.data[60:90, 40:90] = 1  # a "corrected" mask with two classes
    written = widget.export(tmp_path / "out")
    assert len(written) == 5
    png, tif, geojson, csv_path, comp = written
    assert open(csv_path).read().splitlines()[:2] == ["class,pixels,area_mm2,percent_of_tissue",
                                                       "tumor,2000,,57.14"]
    np.testing.assert_array_equal(read_index_png(png), layer.data)
    np.testing.assert_array_equal(tifffile.imread(tif), layer.data)
    back = geojson_to_labels(geojson, layer.data.shape, WSSS4LUAD)
    assert (back == layer.data).mean() > 0.99
    table = json.loads(open(comp).read())
    assert table["classes"]["tumor"]["pixels"] == 50 * 40
    assert table["tsr_stroma_fraction"] == pytest.approx(1500 / 3500)


def test_bad_checkpoint_and_grayscale_show_messages(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    assert widget.set_checkpoint(bad) is False
    assert "broken.pt" in widget.message.text() and not widget.run_button.isEnabled()
    viewer.add_image(np.zeros((64, 64), np.uint8), name="gray")
    widget.image_combo.setCurrentText("gray")
    assert not widget.run_button.isEnabled()
    widget.set_checkpoint(tmp_path / "missing.pt")
    assert "not found" in widget.message.text()


def test_grayscale_image_is_refused_before_run(make_napari_viewer, tiny_checkpoint):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 64), np.uint8), name="gray")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget.set_checkpoint(tiny_checkpoint)
    assert not widget.run_button.isEnabled()
    assert "not an RGB image" in widget.message.text()


def _show_world_box(viewer, top_left, height) -> None:
    """Point the camera so that the canvas shows ``height`` world units from ``top_left`` down (and the
    canvas's aspect ratio across)."""
    canvas_h, canvas_w = viewer.canvas.size
    zoom = canvas_h / height
    viewer.camera.zoom = zoom
    viewer.camera.center = (top_left[0] + height / 2, top_left[1] + canvas_w / zoom / 2)


def test_field_of_view_on_a_multiscale_layer(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    widget = _field_of_view_dock(viewer, tiny_checkpoint)
    layer = viewer.layers["slide"]
    # the canvas shows the top rows: 128 level-0 pixels (32 world units) = 64 level-1 pixels from the top edge
    _show_world_box(viewer, (-0.125, -0.125), 32.0)
    region = widget.region(layer)
    assert region[:3] == (0, 0, 64)
    _run_and_wait(qtbot, widget)
    labels = viewer.layers["labels: slide"]
    y, x, h, w = region
    assert labels.data.shape == (h, w)
    # Level-1 pixels are 2 level-0 pixels: the labels sit on the slide with its world scale x 2.
    np.testing.assert_allclose(labels.scale, (0.5, 0.5))
    np.testing.assert_allclose(labels.translate, (((y + 0.5) * 2 - 0.5) * 0.25, ((x + 0.5) * 2 - 0.5) * 0.25))


def test_settings_persist_between_launches(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    _, first = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    first.set_checkpoint(tiny_checkpoint)
    first.tile_spin.setValue(256)
    first.crf_check.setChecked(False)
    first.region_combo.setCurrentText("Current field of view")
    qtbot.wait(800)  # changes are saved (debounced) as they happen
    second_viewer = make_napari_viewer()
    _, second = second_viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    assert second.tile_spin.value() == 256
    assert not second.crf_check.isChecked()
    assert second.region_combo.currentText() == "Current field of view"
    assert second.checkpoint_row.text() == str(tiny_checkpoint)
    qtbot.waitUntil(lambda: second.model is not None, timeout=30_000)  # loaded in the background


def test_dock_opens_at_once_and_loads_its_model_in_the_background(make_napari_viewer, qtbot, tiny_checkpoint,
                                                                   monkeypatch):
    """Issue 12: opening the dock froze napari while torch was imported and the model loaded on the GUI thread."""
    import threading

    from napari_wsss_cram.widgets import _segment_job

    viewer = make_napari_viewer()
    viewer.add_image(he_like_image(96), name="patch", rgb=True)
    _, first = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    first.set_checkpoint(tiny_checkpoint)  # saved: the next dock loads it by itself
    qtbot.wait(800)
    release = threading.Event()
    threads = []
    load = _segment_job.load_model

    def slow_load(path):  # a model that takes as long as the test wants to load
        threads.append(threading.current_thread())
        release.wait(30)
        return load(path)

    monkeypatch.setattr(_segment_job, "load_model", slow_load)
    _, widget = make_napari_viewer().window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget.viewer.add_image(he_like_image(96), name="patch", rgb=True)
    # the dock is there at once and says what it is waiting for; Run waits for the model
    assert widget.loading_model and widget.model is None
    assert not widget.run_button.isEnabled() and "Loading the model" in widget.message.text()
    assert "loading model tiny.pt" in widget.model_card.text()
    qtbot.waitUntil(lambda: bool(threads), timeout=10_000)
    assert threads[0] is not threading.main_thread()
    release.set()
    qtbot.waitUntil(lambda: widget.model is not None, timeout=30_000)
    assert widget.run_button.isEnabled() and widget.message.text() == "Ready."
    assert "tumor" in widget.classes_label.text()
    assert widget.device_combo.findText("cpu") >= 0 and widget.device_combo.findText("auto") >= 0


def test_pyramidal_slide_file_field_of_view_overlays_exactly(make_napari_viewer, qtbot, tiny_checkpoint,
                                                             tmp_path):
    from napari_wsss_cram.core.io.ometiff import write_pyramidal_ome_tiff

    path = tmp_path / "slide.ome.tif"
    write_pyramidal_ome_tiff(path, he_like_image(512), mpp=0.5, tile=64, n_levels=3)
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin=PLUGIN)
    assert layer.multiscale and tuple(layer.scale) == (0.5, 0.5)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    assert widget.set_checkpoint(tiny_checkpoint)
    widget.tile_spin.setValue(64)
    widget.resolution_value.setValue(1.0)
    widget.crf_check.setChecked(False)
    widget.level_spin.setValue(1)  # paint on a working level of 256x256
    widget.region_combo.setCurrentText("Current field of view")
    # the canvas shows level-0 pixels from (64, 128) down 128 rows: level-1 pixels (32, 64) and 64 rows
    _show_world_box(viewer, (0.5 * 63.5, 0.5 * 127.5), 0.5 * 128)
    y, x, h, w = widget.region(layer)
    assert (y, x, h) == (32, 64, 64)
    _run_and_wait(qtbot, widget)
    labels = viewer.layers["labels: slide"]
    assert labels.data.shape == (h, w)
    # One level-1 pixel = 2 level-0 pixels of 0.5 µm; pixel centres line up with the slide's.
    np.testing.assert_allclose(labels.scale, (1.0, 1.0))
    np.testing.assert_allclose(labels.translate, (0.5 * ((y + 0.5) * 2 - 0.5), 0.5 * ((x + 0.5) * 2 - 0.5)))
    assert labels.metadata["wsss_cram"]["mpp"] == pytest.approx(1.0)
    placed = labels.metadata["wsss_cram"]["placement"]
    assert placed["origin"] == [2 * y, 2 * x] and placed["downsample"] == 2.0


def test_reliable_pseudo_label_view(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    widget.crf_check.setChecked(False)
    widget.pseudo_check.setChecked(True)
    widget.alpha_spin.setValue(0.3)
    widget.beta_spin.setValue(0.9)
    _run_and_wait(qtbot, widget)
    pseudo = viewer.layers["pseudo-labels: patch"]
    assert pseudo.data.shape == (96, 96)
    values = set(np.unique(pseudo.data).tolist())
    assert values <= set(range(WSSS4LUAD.num_outputs)) | {255}
    assert pseudo.colormap.map(np.array([255]))[0][3] == 0  # unsure pixels are see-through
    assert widget.export_panel.labels_combo.currentText() == "labels: patch"


def test_output_rules_default_from_the_engine_and_reach_it(make_napari_viewer, qtbot, tiny_checkpoint):
    from napari_wsss_cram.core.inference import PredictSettings

    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    settings = widget.predict_settings()
    assert settings.background == PredictSettings.background == "tissue"
    assert settings.gate_classes == PredictSettings.gate_classes
    widget.background_combo.setCurrentText("model")
    widget.gate_check.setChecked(False)
    settings = widget.predict_settings()
    assert settings.background == "model" and settings.gate_classes is False
    qtbot.wait(800)  # saved (debounced) as they change
    _, second = make_napari_viewer().window.add_plugin_dock_widget(PLUGIN, "Segment")
    assert second.background_combo.currentText() == "model" and not second.gate_check.isChecked()


# ----- issue 12: bugs found by a pathologist's day in the dock -----------------------------------------------------
def _table_text(widget) -> list[str]:
    table = widget.export_panel.composition_table
    return [table.item(r, 0).text() for r in range(table.rowCount())]


def test_composition_follows_undo(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    widget.crf_check.setChecked(False)
    _run_and_wait(qtbot, widget)
    layer = viewer.layers["labels: patch"]
    qtbot.waitUntil(lambda: widget.export_panel.composition_table.rowCount() > 0)
    before = _table_text(widget)
    layer.brush_size = 40
    layer.paint((48, 48), new_label=2 if layer.data[48, 48] != 2 else 1)
    qtbot.waitUntil(lambda: _table_text(widget) != before, timeout=3000)
    layer.undo()  # Ctrl+Z: napari emits neither paint nor data
    qtbot.waitUntil(lambda: _table_text(widget) == before, timeout=3000)


def test_reruns_after_an_edit_update_one_new_result(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    widget.crf_check.setChecked(False)
    _run_and_wait(qtbot, widget)
    viewer.layers["labels: patch"].paint((5, 5), new_label=2)
    for _ in range(3):
        _run_and_wait(qtbot, widget)
    names = [ly.name for ly in viewer.layers]
    # the edited layer, and one new result that later runs update in place
    assert [n for n in names if n.startswith("labels: patch")] == ["labels: patch", "labels: patch [1]"]
    assert len(names) == 1 + 1 + 2  # the image, its activation map, the edited and the updated labels
    assert all(len(n) <= len("stroma activation: patch") for n in names)  # role first, no "CRF" padding


def test_only_class_labels_can_be_painted(make_napari_viewer, qtbot, tiny_checkpoint):
    from napari.layers.labels._labels_key_bindings import new_label

    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    widget.crf_check.setChecked(False)
    _run_and_wait(qtbot, widget)
    layer = viewer.layers["labels: patch"]
    layer.selected_label = 1
    new_label(layer)  # napari's "new label" button: max + 1 = K + 1, a label without colour or class
    assert layer.selected_label == 1
    layer.selected_label = WSSS4LUAD.background_index + 1
    assert layer.selected_label == 1
    layer.selected_label = WSSS4LUAD.background_index  # the eraser (background) stays allowed
    assert layer.selected_label == WSSS4LUAD.background_index


def test_export_needs_a_folder_and_asks_before_replacing(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path,
                                                         monkeypatch):
    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    widget.crf_check.setChecked(False)
    _run_and_wait(qtbot, widget)
    monkeypatch.chdir(tmp_path)
    widget.export_panel.export_dir.setText("")
    assert widget.export() == []
    assert "Choose an output folder" in widget.message.text()
    assert not any(tmp_path.glob("*labels*"))  # nothing written into the working directory
    out = tmp_path / "out"
    written = widget.export(out)
    assert [p.split("/")[-1] for p in written] == ["patch_labels.png", "patch_labels.ome.tif",
                                                   "patch_labels.geojson", "patch_labels_composition.csv",
                                                   "patch_labels_composition.json"]
    stamp = {p: (out / p.split("/")[-1]).stat().st_mtime_ns for p in written}
    asked = []
    monkeypatch.setattr(widget.export_panel, "confirm_overwrite", lambda existing: asked.append(existing) or False)
    assert widget.export(out) == []
    assert len(asked[0]) == 5 and "no file was replaced" in widget.message.text()
    assert stamp == {p: (out / p.split("/")[-1]).stat().st_mtime_ns for p in written}
    monkeypatch.setattr(widget.export_panel, "confirm_overwrite", lambda existing: True)
    assert len(widget.export(out)) == 5


def test_closing_the_dock_cancels_its_run(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint, image=he_like_image(384))
    widget.crf_check.setChecked(True)
    widget.run()
    qtbot.waitUntil(lambda: widget.progress_bar.value() >= 1, timeout=30_000)
    worker = widget.worker
    finished = []
    worker.finished.connect(lambda: finished.append(True))
    dock = widget.parent()
    while dock is not None and not hasattr(dock, "destroyOnClose"):
        dock = dock.parent()
    dock.destroyOnClose()  # the dock title bar's close button
    qtbot.waitUntil(lambda: bool(finished), timeout=10_000)
    qtbot.wait(500)
    assert [layer.name for layer in viewer.layers] == ["patch"]


def test_resolution_always_follows_the_model(make_napari_viewer, qtbot, tmp_path):
    from napari_wsss_cram.core.checkpoint import load_checkpoint, save_checkpoint

    model, _ = load_checkpoint(make_tiny_checkpoint(tmp_path / "base.pt"))
    checkpoint = save_checkpoint(tmp_path / "x2-x3.pt", model, train_config={"scale_min": 2.0, "scale_max": 3.0})
    viewer = make_napari_viewer()
    viewer.add_image(he_like_image(96), name="patch", rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    assert widget.set_checkpoint(checkpoint)
    assert (widget.resolution_combo.currentText(), widget.resolution_value.value()) == ("scale", 2.5)
    widget.resolution_value.setValue(1.0)
    qtbot.wait(800)  # autosave
    assert widget.set_checkpoint(checkpoint)  # the same model picked again
    assert widget.resolution_value.value() == 2.5
    widget.resolution_value.setValue(1.0)
    qtbot.wait(800)
    _, second = make_napari_viewer().window.add_plugin_dock_widget(PLUGIN, "Segment")  # the next launch
    assert second.checkpoint_row.text() == str(checkpoint)
    qtbot.waitUntil(lambda: not second.loading_model, timeout=30_000)  # it loads in the background
    assert (second.resolution_combo.currentText(), second.resolution_value.value()) == ("scale", 2.5)


def test_resolution_units_convert_and_show(make_napari_viewer, tiny_checkpoint):
    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    viewer.layers["patch"].metadata["mpp"] = 0.5
    widget.resolution_value.setValue(2.0)
    assert widget.resolution_value.suffix().strip() == "×"
    widget.resolution_combo.setCurrentText("µm/px")
    assert widget.resolution_value.value() == pytest.approx(0.25)  # 0.5 µm/px resampled x2
    assert widget.resolution_value.suffix().strip() == "µm/px"
    assert widget.predict_settings().mpp == pytest.approx(0.25)
    widget.resolution_combo.setCurrentText("scale")
    assert widget.resolution_value.value() == pytest.approx(2.0)
    # an image without a pixel size: µm/px has no meaning for it, and the dock says so in its own words
    viewer.layers["patch"].metadata["mpp"] = None
    widget.resolution_combo.setCurrentText("µm/px")
    assert widget.resolution_combo.currentText() == "scale" and widget.resolution_value.value() == 2.0
    assert "µm/px" in widget.message.text() and "--" not in widget.message.text()


def test_dock_errors_name_dock_controls():
    from napari_wsss_cram.widgets import _common as common
    from napari_wsss_cram.widgets.segment import FIELDS as SEGMENT
    from napari_wsss_cram.widgets.train import FIELDS as TRAIN

    text = common.dock_wording("x.png does not state its pixel size (µm/px), so --mpp 2.5 cannot be applied; "
                               "use --scale instead.", SEGMENT)
    assert "--" not in text and "'Resolution as a scale'" in text
    text = common.dock_wording("run already holds a run (last.pt); pass --resume to continue it, or choose "
                               "another --out.", TRAIN)
    assert text == "run already holds a run (last.pt); use 'Resume' to continue it, or choose another 'Output'."
    assert common.dock_wording("--resume: r/resume.pt does not exist; start without --resume.", TRAIN) == \
        "'Resume': r/resume.pt does not exist; press 'Start'."
    assert "lower 'Batch'" in common.dock_wording("out of memory: lower --batch-size, then --crop", TRAIN)


def test_dock_fits_a_small_screen(make_napari_viewer, qtbot):
    from superqt import QCollapsible

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    _settled(qtbot, widget)
    [panel] = widget.findChildren(QCollapsible)
    assert widget.scroll_area.isAncestorOf(panel) and train.scroll_area.isAncestorOf(train.plot)
    for expand in (False, True, False):  # Advanced open or closed, the dock asks for no more height
        panel.expand(animate=False) if expand else panel.collapse(animate=False)
        qtbot.wait(50)
        for dock in (widget, train):
            assert dock.minimumSizeHint().height() < 400  # its contents scroll instead of growing the window


def test_field_of_view_is_what_the_camera_shows_not_whole_chunks(make_napari_viewer, qtbot):
    import dask.array as da

    from napari_wsss_cram.widgets.layers import field_of_view

    viewer = make_napari_viewer()
    base = da.zeros((4096, 4096, 3), dtype=np.uint8, chunks=(1024, 1024, 3))
    layer = viewer.add_image([base, base[::2, ::2], base[::4, ::4]], name="slide", rgb=True, multiscale=True)
    _show_world_box(viewer, (999.5, 1999.5), 200.0)  # level-0 pixels 1000..1199 down
    qtbot.wait(100)
    canvas_h, canvas_w = viewer.canvas.size
    y, x, h, w = field_of_view(layer, 0, viewer)
    assert (y, x, h) == (1000, 2000, 200)
    assert abs(w - 200 * canvas_w / canvas_h) <= 1
    assert field_of_view(layer, 1, viewer)[:3] == (500, 1000, 100)


def test_field_of_view_fallback_reads_inclusive_corner_pixels():
    from types import SimpleNamespace

    from napari_wsss_cram.widgets.layers import field_of_view

    # napari's corner_pixels name the last visible pixel (inclusive): 0..1023 at level 0 is 512 level-1 pixels
    layer = SimpleNamespace(name="slide", multiscale=True, level_shapes=[(2048, 2048), (1024, 1024)],
                            downsample_factors=[(1.0, 1.0), (2.0, 2.0)], data_level=0,
                            corner_pixels=np.array([[0, 0], [1023, 1023]]))
    assert field_of_view(layer, 1) == (0, 0, 512, 512)
    assert field_of_view(layer, 0) == (0, 0, 1024, 1024)


def test_class_palette_and_hotkeys_paint_classes(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    widget.crf_check.setChecked(False)
    _run_and_wait(qtbot, widget)
    layer = viewer.layers["labels: patch"]
    buttons = widget.export_panel.palette.buttons
    assert [b.text() for b in buttons] == [*WSSS4LUAD.names, "background (erase)"]
    buttons[1].click()
    assert viewer.layers.selection.active is layer
    assert layer.selected_label == 1 and layer.mode == "paint"
    buttons[-1].click()
    assert layer.mode == "erase"
    keys = viewer.window._qt_viewer._key_map_handler  # what a key press on the canvas goes through
    keys.press_key("3")  # key 3: the third class (not napari's "polygon mode")
    keys.release_key("3")
    assert layer.selected_label == 2 and layer.mode == "paint"
    keys.press_key("0")
    keys.release_key("0")
    assert layer.selected_label == WSSS4LUAD.background_index and layer.mode == "erase"


def test_every_control_explains_itself(make_napari_viewer, qtbot):
    from qtpy.QtWidgets import QAbstractButton, QAbstractSpinBox, QComboBox, QLineEdit, QSlider

    viewer = make_napari_viewer()
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    _settled(qtbot, segment)

    def explained(widget, dock) -> bool:  # Qt shows the nearest ancestor's tooltip
        while widget is not None and widget is not dock:
            if widget.toolTip():
                return True
            widget = widget.parentWidget()
        return False

    missing = []
    for dock in (segment, train):
        for kind in (QComboBox, QAbstractSpinBox, QAbstractButton, QSlider, QLineEdit):
            for widget in dock.findChildren(kind):
                text = widget.text() if isinstance(widget, QAbstractButton) else ""
                if text in ("Browse…", "Advanced", "Scan") or "Add corrected" in text or \
                        text in ("Start", "Cancel", "Resume") and dock is train:
                    continue  # their label says it all
                if isinstance(widget, QLineEdit) and isinstance(widget.parentWidget(), QAbstractSpinBox) or \
                        widget.metaObject().className() == "QTableCornerButton" or widget.objectName().startswith("qt_"):
                    continue
                if not explained(widget, dock):
                    missing.append(f"{type(dock).__name__}: {type(widget).__name__} {text!r}")
    assert not missing, "\n".join(missing)


def test_resolution_default_follows_the_image_opened_later(make_napari_viewer, tmp_path):
    from napari_wsss_cram.core.checkpoint import load_checkpoint, save_checkpoint

    model, _ = load_checkpoint(make_tiny_checkpoint(tmp_path / "base.pt"))
    model.config.mpp = 0.5  # a model that records its training µm/px
    checkpoint = save_checkpoint(tmp_path / "mpp.pt", model, train_config={"scale_min": 2.0, "scale_max": 3.0})
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    assert widget.set_checkpoint(checkpoint)
    assert (widget.resolution_combo.currentText(), widget.resolution_value.value()) == ("µm/px", 0.5)
    # a PNG states no µm/px: the same rule gives the training scale for it, and Run stays possible
    viewer.add_image(he_like_image(96), name="patch", rgb=True, metadata={"mpp": None})
    assert (widget.resolution_combo.currentText(), widget.resolution_value.value()) == ("scale", 2.5)
    assert widget.run_button.isEnabled(), widget.message.text()


def test_composition_copies_as_csv_and_names_the_clinical_tsr(make_napari_viewer, qtbot, tiny_checkpoint):
    from qtpy.QtWidgets import QApplication

    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    widget.crf_check.setChecked(False)
    _run_and_wait(qtbot, widget)
    layer = viewer.layers["labels: patch"]
    layer.data = np.full_like(layer.data, WSSS4LUAD.background_index)
    layer.data[:30, :50] = 0   # 1500 tumor pixels
    layer.data[30:80, :50] = 1  # 2500 stroma pixels
    widget.export_panel.copy_button.click()
    lines = QApplication.clipboard().text().splitlines()
    assert lines[1:3] == ["tumor,1500,,37.50", "stroma,2500,,62.50"]
    assert "tsr_stroma_percent_of_tumor_plus_stroma,,,62.50" in lines
    # the clinical TSR is the stroma share (stroma-high above 50%), not tumor / stroma
    assert "stroma 62.5% of tumor + stroma (stroma-high)" in widget.export_panel.ratio_label.text()


def test_progress_says_tiles_and_time_left():
    from napari_wsss_cram.widgets.segment import progress_text

    assert progress_text(0, 40, 0.0) == "tile 0 / 40"
    assert progress_text(10, 40, 5.0) == "tile 10 / 40 · about 15 s left"
    assert progress_text(10, 40, 30.0) == "tile 10 / 40 · about 1 min 30 s left"
    assert progress_text(40, 40, 20.0) == "tile 40 / 40"


def test_export_button_writes_in_the_background(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path):
    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    widget.crf_check.setChecked(False)
    _run_and_wait(qtbot, widget)
    panel = widget.export_panel
    panel.export_dir.setText(str(tmp_path / "out"))
    panel.export_button.click()
    assert not panel.export_button.isEnabled()  # a worker writes; the click returned at once
    qtbot.waitUntil(lambda: panel.export_button.isEnabled(), timeout=30_000)
    assert widget.message.text().startswith("Exported 5 files"), widget.message.text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "patch_labels.geojson", "patch_labels.ome.tif", "patch_labels.png", "patch_labels_composition.csv",
        "patch_labels_composition.json"]


def test_results_sit_with_their_image_not_over_other_images(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint, name="05")
    viewer.add_image(he_like_image(96, seed=1), name="06", rgb=True)  # lies over 05, as WSSS4LUAD patches do
    widget.crf_check.setChecked(False)
    widget.pseudo_check.setChecked(True)
    widget.image_combo.setCurrentText("05")
    _run_and_wait(qtbot, widget)
    assert [ly.name for ly in viewer.layers] == ["05", "tumor activation: 05", "labels: 05", "pseudo-labels: 05",
                                                 "06"]
    widget.image_combo.setCurrentText("06")
    _run_and_wait(qtbot, widget)
    assert [ly.name for ly in viewer.layers][-4:] == ["06", "tumor activation: 06", "labels: 06",
                                                      "pseudo-labels: 06"]


def test_pixel_size_of_a_png_gives_areas_in_mm2(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path):
    from PIL import Image

    from napari_wsss_cram.core.io.ometiff import write_pyramidal_ome_tiff

    Image.fromarray(he_like_image(96)).save(tmp_path / "patch.png")
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(tmp_path / "patch.png"))  # napari's own reader: the plugin leaves plain PNGs to it
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    assert widget.set_checkpoint(tiny_checkpoint)
    widget.tile_spin.setValue(64)
    widget.crf_check.setChecked(False)
    assert widget.pixel_size.isEnabled() and widget.pixel_size.text() == "not stated"  # a PNG states none
    widget.pixel_size.setValue(0.25)  # WSSS4LUAD's pixel size
    widget.resolution_value.setValue(1.0)
    _run_and_wait(qtbot, widget)
    labels = viewer.layers["labels: patch"]
    assert labels.metadata["wsss_cram"]["mpp"] == pytest.approx(0.25)
    table = widget.update_composition()
    assert table["tissue_area_mm2"] == pytest.approx(table["tissue_pixels"] * 0.25e-3 ** 2)
    assert widget.export_panel.composition_table.item(0, 1).text() != "—"
    # a slide that states its µm/px: shown, not editable, and napari's scale bar is on
    write_pyramidal_ome_tiff(tmp_path / "slide.ome.tif", he_like_image(256), mpp=0.5, tile=64, n_levels=2)
    viewer.open(str(tmp_path / "slide.ome.tif"), plugin=PLUGIN)
    widget.image_combo.setCurrentText("slide")
    assert widget.pixel_size.value() == pytest.approx(0.5) and not widget.pixel_size.isEnabled()
    assert viewer.scale_bar.visible


def test_composition_inside_a_drawn_region(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    viewer.layers["patch"].scale = (0.5, 0.5)  # world units are not pixels: the region is placed through them
    widget.crf_check.setChecked(False)
    _run_and_wait(qtbot, widget)
    labels = viewer.layers["labels: patch"]
    labels.data = np.full_like(labels.data, WSSS4LUAD.background_index)
    labels.data[:, :48] = 0  # tumor on the left half, stroma on the right
    labels.data[:, 48:] = 1
    # a rectangle over pixel rows 10..39 and columns 40..59 (pixel centres; world = pixels x 0.5)
    viewer.add_shapes([np.array([[9.6, 39.6], [9.6, 59.4], [39.4, 59.4], [39.4, 39.6]]) * 0.5],
                      shape_type="rectangle", name="region")
    panel = widget.export_panel
    panel.region_combo.setCurrentText("region")
    table = widget.update_composition()
    assert table["region"] == "region"
    assert table["classes"]["tumor"]["pixels"] == 30 * 8 and table["classes"]["stroma"]["pixels"] == 30 * 12
    viewer.layers["region"].data = []  # the table follows the shapes (here: none left)
    qtbot.waitUntil(lambda: panel.composition_table.item(0, 0).text() == "0", timeout=3000)
    panel.region_combo.setCurrentText("Whole labels layer")
    assert widget.update_composition()["classes"]["tumor"]["pixels"] == 96 * 48


def test_batch_segments_a_folder_with_one_summary_and_cancels(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path):
    """Issue 12: the dock segments a folder through the core's batch (as `wsss-cram predict`), one summary CSV."""
    import csv

    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(he_like_image(96, seed=i)).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    widget.crf_check.setChecked(False)
    formats = []
    assert widget.run_batch([str(folder)], str(tmp_path / "out"))
    widget.worker.yielded.connect(lambda e: formats.append((e.phase, e.done, e.total)))
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    rows = list(csv.DictReader(open(tmp_path / "out" / "predict_summary.csv")))
    assert [r["image"] for r in rows] == ["broken", "img0", "img1"]
    assert rows[0]["status"].startswith("error") and rows[1]["status"] == rows[2]["status"] == "ok"
    assert (tmp_path / "out" / "img1.png").is_file() and (tmp_path / "out" / "img1.geojson").is_file()
    assert ("file", 3, 3) in formats and any(stage == "file" and done == 1 for stage, done, _ in formats)
    assert "2 of 3 images" in widget.message.text() and "broken" in widget.message.text()
    assert widget.progress_bar.text() == "Done" and widget.batch_button.isEnabled()
    assert [layer.name for layer in viewer.layers] == ["patch"]  # a batch adds no layer
    # Cancel: stops between tiles; no summary is written
    for i in range(2):
        Image.fromarray(he_like_image(384, seed=i)).save(folder / f"big{i}.png")
    widget.tile_spin.setValue(64)
    assert widget.run_batch([str(folder)], str(tmp_path / "out2"))
    qtbot.waitUntil(lambda: "big0" in widget.message.text() or "big1" in widget.message.text(), timeout=30_000)
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.busy, timeout=15_000)
    assert "Cancelled" in widget.message.text() and not (tmp_path / "out2" / "predict_summary.csv").exists()
    assert widget.progress_bar.text() == "Cancelled"


def test_field_of_view_correction_becomes_a_training_example(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path):
    """Issue 12: a corrected field-of-view result on a slide is saved with the image crop under it."""
    from PIL import Image

    from napari_wsss_cram.core.io.png import read_index_png
    from napari_wsss_cram.widgets._train_job import add_corrected_example

    viewer = make_napari_viewer()
    widget = _field_of_view_dock(viewer, tiny_checkpoint)
    _show_world_box(viewer, (15.875, 7.875), 16.0)  # level-0 rows from 64, columns from 32 (level 1: 32, 16)
    y, x, h, w = widget.region(viewer.layers["slide"])
    assert (y, x) != (0, 0) and (h, w) != (128, 128)
    _run_and_wait(qtbot, widget)
    labels = viewer.layers["labels: slide"]
    corrected = labels.data.copy()
    corrected[: h // 2] = 1  # the pathologist paints stroma over the top half
    labels.data = corrected
    written = add_corrected_example(viewer.layers["slide"], labels, tmp_path / "corrections")
    image_path, mask_path = written[:2]
    assert "slide_fov_y" in image_path and "_d2" in image_path  # never the whole-slide example's name
    np.testing.assert_array_equal(np.asarray(Image.open(image_path).convert("RGB")), viewer.layers["slide"].data[1][y:y + h, x:x + w])
    np.testing.assert_array_equal(read_index_png(mask_path), corrected)
    # labels of another image are refused with a clear message
    viewer.add_image(he_like_image(96), name="other", rgb=True)
    with pytest.raises(Exception, match="does not sit on the pixels of 'other'"):
        add_corrected_example(viewer.layers["other"], labels, tmp_path / "corrections")


def test_a_remembered_checkpoint_that_is_gone_falls_back_to_the_demo_model(make_napari_viewer, qtbot, tmp_path,
                                                                         tiny_checkpoint):
    """Settings remember the last checkpoint; when that file is gone (a deleted run) the dock opens on the demo
    model and says so, instead of greeting the user with an error."""
    from napari_wsss_cram.widgets.segment import BUNDLED, CHECKPOINT

    viewer = make_napari_viewer()
    viewer.add_image(he_like_image(64), name="patch", rgb=True)
    gone = tmp_path / "deleted_run" / "best.pt"
    _, first = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    qtbot.waitUntil(lambda: not first.loading_model, timeout=60_000)
    first.model_combo.setCurrentText(CHECKPOINT)
    first.checkpoint_row.setText(str(gone))
    first.save_settings()
    viewer.window.remove_dock_widget("all")

    _, second = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    assert second.model_combo.currentText() == BUNDLED
    qtbot.waitUntil(lambda: not second.loading_model, timeout=60_000)
    assert second.model is not None and second.run_button.isEnabled()
    assert "no longer exists" in second.message.text() and str(gone) in second.message.text()
    # the note lasts until the user chooses a model
    assert second.set_checkpoint(tiny_checkpoint), second.message.text()
    assert "no longer exists" not in second.message.text()
