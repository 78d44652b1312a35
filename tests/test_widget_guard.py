"""Issue 21 in the Segment dock: a CRF helper process that cannot start is reported with its reason and the CRF
runs in-process; the dock's export goes through the output guard (never onto an image open in the viewer)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from napari_wsss_cram.core import crf as crf_module
from widget_helpers import he_like_image, make_tiny_checkpoint

pytestmark = pytest.mark.gui

PLUGIN = "napari-wsss-cram"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_CRAM_SETTINGS_FILE", str(tmp_path / "settings.ini"))


def _dock(viewer, checkpoint, crf: bool):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    assert widget.set_checkpoint(checkpoint), widget.message.text()
    widget.tile_spin.setValue(64)
    widget.overlap_spin.setValue(16)
    widget.resolution_value.setValue(1.0)
    widget.crf_check.setChecked(crf)
    return widget


def _run_and_wait(qtbot, widget, timeout=60_000):
    assert widget.run_button.isEnabled(), widget.message.text()
    widget.run()
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


def test_dock_reports_a_crf_helper_that_cannot_start_and_falls_back_in_process(make_napari_viewer, qtbot,
                                                                              tiny_checkpoint, monkeypatch):
    pytest.importorskip("pydensecrf")

    def cannot_start():
        raise OSError("no new processes allowed here")

    # what a host that cannot spawn sees (a script on standard input, a sandbox): the helper never answers
    monkeypatch.setattr(crf_module._HELPER, "pool", None)
    monkeypatch.setattr(crf_module, "HELPER_FAILURE", None)
    monkeypatch.setattr(crf_module, "_start_helper", cannot_start)
    viewer = make_napari_viewer()
    viewer.add_image(he_like_image(96), name="patch", rgb=True)
    widget = _dock(viewer, tiny_checkpoint, crf=True)
    _run_and_wait(qtbot, widget)
    assert "labels: patch" in [layer.name for layer in viewer.layers]  # the work was done, in-process
    text = widget.message.text()
    assert "CRF helper process could not start" in text and "no new processes allowed here" in text, text


def test_dock_export_never_writes_onto_an_image_open_in_the_viewer(make_napari_viewer, qtbot, tiny_checkpoint,
                                                                  tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    Image.fromarray(he_like_image(96)).save(folder / "patch.png")
    # another open image whose file name is what the export of "patch" would write
    Image.fromarray(he_like_image(64, seed=3)).save(folder / "patch_labels.png")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    viewer = make_napari_viewer()
    viewer.open(str(folder / "patch.png"))  # a plain PNG: napari's own reader
    viewer.open(str(folder / "patch_labels.png"), plugin=PLUGIN)
    widget = _dock(viewer, tiny_checkpoint, crf=False)
    widget.image_combo.setCurrentText("patch")
    _run_and_wait(qtbot, widget)
    widget.export_panel.confirm_overwrite = lambda existing: True  # even a "yes" never replaces an input
    assert widget.export(folder) == []
    assert "would replace the input" in widget.message.text()
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == before
    assert np.asarray(viewer.layers["patch_labels"].data).shape[:2] == (64, 64)
