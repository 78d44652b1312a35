"""The built wheel works alone: installed into a fresh venv and run from another folder, without the source tree.

Nothing is downloaded: the fresh venv sees this interpreter's site-packages (for napari, torch, ...) through a
``.pth`` file, which adds that folder only. A ``.pth`` file in a folder added that way is not processed, so the
editable install's ``.pth`` (pointing at the source tree) stays out; the test checks that the package imported is
the installed one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_PATCHES = ROOT / "sample_data" / "patches"

pytestmark = pytest.mark.slow

#: Run inside the installed venv: every napari.yaml command resolved through npe2, and where things came from.
NPE2_CHECK = """
import importlib.metadata, json, napari_wsss_cram, npe2
from npe2.manifest.utils import import_python_name
from napari_wsss_cram.core.resources import DEMO_MODEL, PRESETS_DIR
pm = npe2.PluginManifest.from_distribution("napari-wsss-cram")
resolved = {c.id: callable(import_python_name(c.python_name)) for c in pm.contributions.commands}
dist = importlib.metadata.distribution("napari-wsss-cram")
print(json.dumps({"package": napari_wsss_cram.__file__, "resolved": resolved, "name": pm.name,
                  "dist": str(dist.locate_file("")), "demo_model": str(DEMO_MODEL), "presets": str(PRESETS_DIR)}))
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build the wheel, install it into a fresh venv (no network, no source tree); return paths and env."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel_dir = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir),
          str(ROOT)], cwd=tmp, env=dict(os.environ), timeout=300)
    wheel = next(wheel_dir.glob("napari_wsss_cram-*.whl"))
    venv = tmp / "venv"
    # --without-pip: pip comes from this interpreter's site-packages through the .pth below (no ensurepip)
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=dict(os.environ), timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp, env=dict(os.environ), timeout=60).stdout.strip())
    host = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    src = str(ROOT / "src")
    assert src not in host
    (site / "_host_site_packages.pth").write_text("\n".join(sorted(host)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WSSS_CRAM_DEMO_MODEL")}
    env.update(WSSS_CRAM_CACHE=str(tmp / "cache"), QT_QPA_PLATFORM="offscreen", PYTHONNOUSERSITE="1")
    # --ignore-installed: never touch (uninstall) the source tree's editable install in the host venv
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
         cwd=tmp, env=env, timeout=120)
    work = tmp / "elsewhere"
    work.mkdir()
    bindir = python.parent
    return {"python": python, "site": site, "env": env, "work": work, "bin": bindir, "wheel": wheel}


def test_the_installed_package_is_the_wheels_and_every_manifest_command_resolves(installed):
    result = _run([str(installed["python"]), "-c", NPE2_CHECK], cwd=installed["work"], env=installed["env"],
                  timeout=180)
    info = json.loads(result.stdout.strip().splitlines()[-1])
    site = installed["site"].resolve()
    for key in ("package", "demo_model", "presets", "dist"):
        assert Path(info[key]).resolve().is_relative_to(site), f"{key} from {info[key]}, not the installed wheel"
    assert info["name"] == "napari-wsss-cram"
    assert info["resolved"] and all(info["resolved"].values()), info["resolved"]


def test_the_installed_demo_runs_headless_from_another_folder(installed):
    out = installed["work"] / "demo"
    result = _run([str(installed["bin"] / "wsss-cram"), "demo", "--headless", "--out", str(out)],
                  cwd=installed["work"], env=installed["env"], timeout=300)
    assert "bundled demo model" in result.stdout
    written = {p.name for p in out.iterdir()}
    assert {"sample_00_labels.png", "sample_00_overlay.png"} <= written, written


@pytest.mark.skipif(not SAMPLE_PATCHES.is_dir(), reason="sample_data/patches has not been generated")
def test_the_installed_train_finds_a_preset_by_name(installed):
    run = installed["work"] / "run"
    result = _run([str(installed["bin"] / "wsss-cram"), "train", str(SAMPLE_PATCHES), "--config", "cpu-small",
                   "--stage", "1", "--steps", "2", "--out", str(run), "--device", "cpu", "--weights", "none"],
                  cwd=installed["work"], env=installed["env"], timeout=300)
    assert Path(result.stdout.strip().splitlines()[-1]) == run / "last.pt"
    assert (run / "last.pt").is_file()
    config = (run / "config.toml").read_text()
    assert "crop = 160" in config  # cpu-small's crop, not the paper's 513
