"""The npe2 manifest: valid, shipped inside the package, and every python_name importable; the wheel carries it,
the presets and the demo model."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
from pathlib import Path

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


@pytest.mark.parametrize("command", _manifest()["contributions"]["commands"], ids=lambda c: c["id"])
def test_every_python_name_imports(command):
    module_name, _, attr = command["python_name"].partition(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attr)), command["python_name"]


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
