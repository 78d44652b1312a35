"""*Export model…* in the Train and Segment docks (napari Qt, Xvfb): the form, the worker, the messages, and the
exported package loading back in the Segment dock."""

from __future__ import annotations

import shutil
import zipfile

import pytest
from qtpy.QtWidgets import QDialog

from napari_wsss_cram.widgets._export_model import ExportModelDialog
from widget_helpers import he_like_image, make_tiny_checkpoint

pytest.importorskip("bioimageio.core", reason="the [bioimageio] extra is not installed")
pytestmark = pytest.mark.gui

PLUGIN = "napari-wsss-cram"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


def _fill_and_accept(monkeypatch, **values):
    """Make the form's exec_() fill in ``values`` and press OK, as a user would."""
    def exec_(dialog):
        dialog.out_edit.setText(str(values["out"]))
        dialog.authors_edit.setText(values.get("authors", ""))
        dialog.license_combo.setCurrentText(values.get("license", ""))
        return QDialog.Accepted

    monkeypatch.setattr(ExportModelDialog, "exec_", exec_)


@pytest.mark.slow
def test_train_dock_exports_the_runs_checkpoint(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path, monkeypatch):
    viewer = make_napari_viewer()
    _, dock = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    assert not dock.export_button.isEnabled()  # no run yet
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_checkpoint, run / "last.pt")
    dock.out_row.setText(str(run))
    qtbot.waitUntil(dock.export_button.isEnabled, timeout=5000)
    # the licence is never guessed: the form's message names the field, nothing is written
    _fill_and_accept(monkeypatch, out=tmp_path / "m.zip", authors="Ada Lovelace")
    dock.export_button.click()
    assert "'Licence'" in dock.message.text() and not (tmp_path / "m.zip").exists()
    _fill_and_accept(monkeypatch, out=tmp_path / "m.zip", authors="Ada Lovelace <ada@example.org>; Bob",
                     license="CC-BY-4.0")
    dock.export_button.click()
    assert dock.exporter.running
    qtbot.waitUntil(lambda: not dock.exporter.running, timeout=180_000)
    assert "Exported" in dock.message.text(), dock.message.text()
    with zipfile.ZipFile(tmp_path / "m.zip") as archive:
        assert {"rdf.yaml", "weights_torchscript.pt", "cover.png"} <= set(archive.namelist())
        rdf = archive.read("rdf.yaml").decode()
    assert "Ada Lovelace" in rdf and "name: Bob" in rdf and "CC-BY-4.0" in rdf


@pytest.mark.slow
def test_segment_dock_exports_its_model_and_loads_the_package_back(make_napari_viewer, qtbot, tiny_checkpoint,
                                                                   tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(he_like_image(96), name="patch", rgb=True)
    _, dock = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    assert dock.set_checkpoint(tiny_checkpoint), dock.message.text()
    out = tmp_path / "tiny.zip"
    assert dock.exporter.start(dock.info.path, str(out), ["Ada Lovelace"], "MIT")
    qtbot.waitUntil(lambda: not dock.exporter.running, timeout=180_000)
    assert out.is_file() and str(out) in dock.message.text()
    assert not dock.exporter.start(dock.info.path, str(out), ["Ada Lovelace"], "MIT")  # exists: asks first
    assert "already exists" in dock.message.text() and "Replace an existing package" in dock.message.text()
    # the way back: the package is a model the dock segments with
    assert dock.set_checkpoint(out), dock.message.text()
    assert dock.info.classes.names == ("tumor", "stroma", "normal") and dock.info.path == out
    dock.tile_spin.setValue(64)
    dock.overlap_spin.setValue(16)
    dock.crf_check.setChecked(False)
    dock.run()
    qtbot.waitUntil(lambda: dock.worker is None, timeout=60_000)
    assert dock.outcome == "done", dock.message.text()
    # the result layers are added one per event-loop turn after the worker ends
    qtbot.waitUntil(lambda: any(layer.name.startswith("labels") for layer in viewer.layers), timeout=10_000)


def test_the_form_reads_authors_and_refuses_nothing_silently(qtbot, tmp_path):
    dialog = ExportModelDialog(tmp_path / "run" / "best.pt")
    qtbot.addWidget(dialog)
    assert dialog.out_edit.text().endswith("best_bioimageio.zip") and dialog.license_combo.currentText() == ""
    dialog.authors_edit.setText(" Ada Lovelace <ada@example.org> ;; Bob ")
    dialog.license_combo.setCurrentText("MIT")
    values = dialog.values()
    assert values["authors"] == ["Ada Lovelace <ada@example.org>", "Bob"] and values["license"] == "MIT"
    assert values["name"] is None and values["overwrite"] is False
