"""The npe2 manifest: valid, shipped inside the package, and every python_name importable."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _manifest() -> dict:
    return yaml.safe_load((ROOT / "napari.yaml").read_text())


def test_packaged_manifest_is_the_top_level_one():
    packaged = importlib.resources.files("napari_wsss_cram") / "napari.yaml"
    assert packaged.is_file()
    assert packaged.read_text() == (ROOT / "napari.yaml").read_text()


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
    npe2.PluginManifest.from_file(ROOT / "napari.yaml")  # raises on an invalid manifest


@pytest.mark.parametrize("command", _manifest()["contributions"]["commands"], ids=lambda c: c["id"])
def test_every_python_name_imports(command):
    module_name, _, attr = command["python_name"].partition(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attr)), command["python_name"]


def test_wheel_ships_the_manifest(tmp_path):
    """A wheel install must carry the manifest as a real file (the package copy is a symlink in git)."""
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("napari_wsss_cram-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("napari_wsss_cram/napari.yaml").decode() == (ROOT / "napari.yaml").read_text()
        entry_points = zf.read(next(n for n in zf.namelist() if n.endswith("entry_points.txt"))).decode()
    assert "napari-wsss-cram = napari_wsss_cram:napari.yaml" in entry_points
