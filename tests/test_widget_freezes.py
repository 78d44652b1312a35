"""What froze napari (issue 20, items 8-12), checked by behaviour, not by time (the figures are in benchmarks/):
which thread does the slow work."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.gui
SRC = Path(__file__).resolve().parents[1] / "src"


def test_opening_the_train_dock_first_imports_no_torch_on_the_gui_thread(tmp_path):
    """Item 9: the Train dock opened before the Segment dock imported torch on napari's GUI thread (11 s): the
    preset check, the run-folder names and the weights note each pulled it in. A fresh process (torch not yet
    imported, as a napari session that has just started) records which thread imports torch."""
    script = textwrap.dedent("""
        import builtins, sys, threading
        real = builtins.__import__
        where = []
        def hook(name, *args, **kwargs):
            if name == "torch" and "torch" not in sys.modules:
                where.append(threading.current_thread() is threading.main_thread())
            return real(name, *args, **kwargs)
        builtins.__import__ = hook
        import napari
        viewer = napari.Viewer(show=False)
        _, widget = viewer.window.add_plugin_dock_widget("napari-wsss-cram", "Train")
        print("TORCH_ON_GUI_THREAD", any(where), "PRESET", widget.backbone_combo.currentText(), flush=True)
        os_exit = __import__("os")._exit
        os_exit(0)  # no teardown: the dock's background look-ups may still run
    """)
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               WSSS_CRAM_SETTINGS_FILE=str(tmp_path / "settings.ini"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("TORCH_ON_GUI_THREAD")), None)
    assert line is not None, proc.stderr[-2000:]
    assert line.split()[1] == "False", line
    assert line.split()[3].startswith("resnet")  # the preset still filled the form at once
