"""The numbers a pathologist reads off the Segment dock (issue 20, items 1-4), on a real viewer under Xvfb: the
tumor-stroma ratio, what a PNG export keeps, areas after entering a pixel size, activation maps on tissue only."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.composition import TSR_COLUMN, composition, composition_csv, tumor_stroma_ratio
from test_widget_segment import _field_of_view_dock, _run_and_wait, _segment_dock
from widget_helpers import make_tiny_checkpoint

pytestmark = pytest.mark.gui
T, S, N, BG = 0, 1, 2, WSSS4LUAD.background_index


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_CRAM_SETTINGS_FILE", str(tmp_path / "settings.ini"))


def _labels_on_image(viewer, labels: np.ndarray, name: str = "patch"):
    """An image and a result labels layer on it, as a run leaves them."""
    from napari_wsss_cram.widgets.layers import add_result_layers

    image = viewer.add_image(np.full((*labels.shape, 3), 200, np.uint8), name=name, rgb=True)
    return add_result_layers(viewer, image, labels, None, WSSS4LUAD)["labels"]


def test_tsr_is_undefined_without_tumor_and_one_number_everywhere(make_napari_viewer):
    viewer = make_napari_viewer()
    labels = np.full((40, 50), BG, np.uint8)
    labels[:, :30] = S  # stroma and normal, no tumor
    labels[:, 30:35] = N
    layer = _labels_on_image(viewer, labels)
    _, widget = viewer.window.add_plugin_dock_widget("napari-wsss-cram", "Segment")
    widget.labels_combo.setCurrentText(layer.name)
    table = widget.update_composition()
    text = widget.export_panel.ratio_label.text()
    assert "undefined" in text and "100.0%" not in text and "stroma-high" not in text
    assert table["tsr_stroma_fraction"] is None and table["tsr_category"] is None
    # with tumor: stroma share of tumor + stroma, the same number in the dock, the CSV and the core function
    painted = layer.data.copy()
    painted[:, 35:50] = T  # 600 tumor, 1200 stroma -> 66.7% stroma-high
    layer.data = painted
    table = widget.update_composition()
    assert table["tsr_stroma_fraction"] == pytest.approx(tumor_stroma_ratio(600, 1200)) == pytest.approx(2 / 3)
    assert "stroma 66.7% of tumor + stroma (stroma-high)" in widget.export_panel.ratio_label.text()
    rows = {r[0]: r[3] for r in csv.reader(io.StringIO(composition_csv(table)))}
    assert rows[TSR_COLUMN] == "66.67" and "tumor_to_stroma_area_ratio" not in rows


def test_batch_summary_names_the_tsr_and_says_the_dock_number(tmp_path, tiny_checkpoint):
    """The batch CSV's TSR column is the dock's definition (stroma % of tumor + stroma), named by what it is."""
    from PIL import Image

    from napari_wsss_cram.core.batch import SUMMARY_NAME, predict_batch
    from napari_wsss_cram.core.checkpoint import load_checkpoint
    from napari_wsss_cram.core.inference import PredictSettings
    from napari_wsss_cram.core.io.png import read_index_png
    from napari_wsss_cram.core.progress import drive
    from widget_helpers import he_like_image

    Image.fromarray(he_like_image(96)).save(tmp_path / "a.png")
    model, info = load_checkpoint(tiny_checkpoint)
    out = tmp_path / "out"
    drive(predict_batch(model, info, [tmp_path / "a.png"], out, PredictSettings(tile=64, overlap=16, crf=False),
                        ("png",)))
    [row] = list(csv.DictReader(open(out / SUMMARY_NAME)))
    assert "tumor_stroma_ratio" not in row and "rank" not in row  # no ambiguous name, no internal column
    counts = composition(read_index_png(out / "a.png"), info.classes)
    expected = counts["tsr_stroma_fraction"]
    assert row[TSR_COLUMN] == ("" if expected is None else str(round(100 * expected, 2)))
    assert (out / "a_composition.csv").read_text() == composition_csv(counts)  # beside the JSON
    assert not (out / ".wsss-cram.lock").exists()  # the folder lock leaves no file behind
    assert all(len(v.split(".")[-1]) <= 4 for v in row.values() if v.replace(".", "", 1).isdigit() and "." in v)


def test_png_export_says_it_keeps_no_position(make_napari_viewer, qtbot, tiny_checkpoint):
    """A field-of-view result: the export panel says, before exporting, that only OME-TIFF and GeoJSON keep
    where it lies; a plain patch result at the origin gets no such note."""
    viewer = make_napari_viewer()
    widget = _field_of_view_dock(viewer, tiny_checkpoint)
    viewer.camera.center = (0, 40, 40)
    viewer.camera.zoom = 8
    _run_and_wait(qtbot, widget)
    panel = widget.export_panel
    assert panel.show_position_note() and "OME-TIFF and the GeoJSON" in panel.position_note.text()
    panel.format_checks["png"].setChecked(False)
    assert not panel.show_position_note()
    patch = _labels_on_image(viewer, np.full((20, 20), T, np.uint8), name="plain patch")
    panel.format_checks["png"].setChecked(True)
    panel.labels_combo.setCurrentText(patch.name)
    assert not panel.show_position_note()


def test_entering_a_pixel_size_fills_the_areas_at_once(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    viewer.layers["patch"].metadata["mpp"] = None  # a PNG: no pixel size stated
    widget._image_changed()
    widget.crf_check.setChecked(False)
    _run_and_wait(qtbot, widget)
    table = widget.export_panel.composition_table
    widget.update_composition()
    assert table.item(0, 1).text() == "—"
    widget.pixel_size.setValue(0.5)  # the user types the pixel size: no re-run
    area = float(table.item(0, 1).text())
    pixels = int(table.item(0, 0).text().replace(",", ""))
    assert area == pytest.approx(pixels * 0.5e-3 ** 2, rel=1e-3, abs=1e-4)
    assert widget.labels_combo.currentText() == "labels: patch"


def test_activation_maps_show_on_tissue_only(make_napari_viewer, qtbot, tiny_checkpoint):
    """Glass gets no heat: the maps are 0 wherever the labels say background (no tissue)."""
    viewer = make_napari_viewer()
    widget = _segment_dock(viewer, tiny_checkpoint)
    _run_and_wait(qtbot, widget)
    labels = viewer.layers["labels: patch"].data
    activation = widget.activation_layer()
    maps = activation.metadata["wsss_cram"]["maps"]
    glass = labels == BG
    assert glass.any() and (~glass).any()
    assert maps[:, glass].max() == 0
    assert maps[:, ~glass].max() > 0
