"""The npe2 manifest: valid, shipped inside the package, and every python_name importable; the wheel carries it,
the presets and the demo model."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "src" / "napari_wsss_cram" / "napari.yaml"
#: The wheel must stay well under this (the demo model is most of it).
WHEEL_LIMIT_MB = 40


def _manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def test_the_manifest_is_one_real_file_inside_the_package():
    packaged = importlib.resources.files("napari_wsss_cram") / "napari.yaml"
    assert packaged.is_file() and not MANIFEST.is_symlink()
    assert packaged.read_text() == MANIFEST.read_text()
    root_copy = ROOT / "napari.yaml"  # the repository layout keeps a pointer at the top, never a second file
    assert not root_copy.exists() or (root_copy.is_symlink() and root_copy.resolve() == MANIFEST.resolve()), \
        "one manifest only: the package's"


def test_entry_point_resolves_to_the_manifest():
    eps = importlib.metadata.entry_points(group="napari.manifest")
    ours = [ep for ep in eps if ep.name == "napari-wsss-cram"]
    assert ours, "napari.manifest entry point is not installed"
    module, _, resource = ours[0].value.partition(":")
    assert (importlib.resources.files(module) / resource).is_file()


def test_npe2_validates_the_manifest():
    npe2 = pytest.importorskip("npe2")
    pm = npe2.PluginManifest.from_distribution("napari-wsss-cram")
    assert pm.name == "napari-wsss-cram"
    npe2.PluginManifest.from_file(MANIFEST)  # raises on an invalid manifest


def _labels() -> np.ndarray:
    labels = np.full((12, 16), 3, np.uint8)  # background
    labels[2:6, 3:9] = 0
    labels[7:11, 10:15] = 1
    return labels


def _call_reader(get_reader, tmp_path, request) -> None:
    from napari_wsss_cram.core.classes import WSSS4LUAD
    from napari_wsss_cram.core.io.png import write_index_png

    path = write_index_png(tmp_path / "case_labels.png", _labels(), WSSS4LUAD)
    read = get_reader(str(path))
    assert read is not None, "the reader refused a *_labels.png export"
    [(data, kwargs, layer_type)] = read(str(path))
    assert layer_type == "labels" and np.array_equal(np.asarray(data), _labels())
    assert get_reader(str(tmp_path / "notes.txt")) is None  # not ours: napari asks another reader


def _call_writer(write_labels, tmp_path, request) -> None:
    from napari_wsss_cram.core.io.png import read_index_png

    written = write_labels(str(tmp_path / "out.png"), _labels(), {"name": "labels", "metadata": {}})
    assert written == [str(tmp_path / "out.png")]
    assert np.array_equal(read_index_png(written[0]), _labels())


def _call_sample(sample, tmp_path, request) -> None:
    from napari_wsss_cram import _sample_data

    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setenv("WSSS_CRAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_sample_data, "SLIDE_SIZE", 512)  # generated here without a viewer: keep it small
    monkeypatch.setattr(_sample_data, "_napari_viewer", lambda: None)
    (image, image_kwargs, image_type), (labels, _, labels_type) = sample()
    assert (image_type, labels_type) == ("image", "labels") and image_kwargs["rgb"]
    full = np.asarray(image[0] if isinstance(image, list) else image)
    truth = np.asarray(labels[0] if isinstance(labels, list) else labels)
    assert full.ndim == 3 and full.shape[2] == 3 and full.dtype == np.uint8 and full.shape[:2] == truth.shape
    assert full.std() > 5 and len(np.unique(truth)) >= 2  # a picture with tissue, not a blank placeholder


def _call_widget(widget_class, tmp_path, request) -> None:
    from qtpy.QtWidgets import QWidget

    viewer = request.getfixturevalue("make_napari_viewer")()
    widget = widget_class(viewer)
    assert isinstance(widget, QWidget)
    viewer.window.add_dock_widget(widget)


CALLS = {"get_reader": _call_reader, "write_labels": _call_writer, "sample_patch": _call_sample,
         "sample_slide": _call_sample, "segment_widget": _call_widget, "train_widget": _call_widget}


@pytest.mark.parametrize("command", _manifest()["contributions"]["commands"], ids=lambda c: c["id"])
def test_every_contribution_resolves_and_works(command, tmp_path, request):
    """Each python_name resolves, and calling it as napari would gives what napari expects of that kind."""
    module_name, _, attr = command["python_name"].partition(":")
    target = getattr(importlib.import_module(module_name), attr)
    name = command["id"].split(".", 1)[1]
    assert name in CALLS, f"{command['id']}: a new contribution needs a call here"
    CALLS[name](target, tmp_path, request)


def test_wheel_ships_the_manifest_presets_and_demo_model(tmp_path):
    """A wheel install works alone: manifest, presets and demo model inside it, and it stays small."""
    import subprocess
    import sys
    import zipfile

    from napari_wsss_cram.core.resources import DEMO_MODEL, preset_names

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("napari_wsss_cram-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert zf.read("napari_wsss_cram/napari.yaml").decode() == MANIFEST.read_text()
        assert {f"napari_wsss_cram/presets/{n}.toml" for n in preset_names()} <= names
        assert set(preset_names()) >= {"wsss4luad", "cpu-small", "sample"}
        assert zf.getinfo("napari_wsss_cram/assets/demo_model.pt").file_size == DEMO_MODEL.stat().st_size
        entry_points = zf.read(next(n for n in zf.namelist() if n.endswith("entry_points.txt"))).decode()
    assert "napari-wsss-cram = napari_wsss_cram:napari.yaml" in entry_points
    assert wheel.stat().st_size < WHEEL_LIMIT_MB * 1e6, f"{wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB"
