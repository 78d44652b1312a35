"""How long a dock (Segment, or Train with ``--dock Train``) takes to open the first time, and how long napari's
event loop stalls meanwhile, next to napari's own baseline in the same run.

Runs in a fresh process (torch not yet imported, as in a napari session that has just started): a shown viewer with
a small synthetic H&E image, a 10 ms QTimer ticking on the GUI thread, then the Segment dock is opened through the
plugin manifest (as Plugins > WSSS-CRAM > Segment does). Prints:

- ``open``: seconds from the dock's opening call to the dock widget being shown;
- ``stall``: the longest gap between ticks during the first ``--seconds`` (10) seconds after that call, and the
  95th percentile;
- ``model ready``: seconds until the dock's model is loaded and Run is enabled (Segment);
- ``baseline``: the same longest gap while napari opens a dock of its own kind (a plain widget) and adds an image
  of the patch's size, measured first in the same process, and the dock's ratio to it. Issue 20 item 9: the Train
  dock opened before the Segment dock stalled napari 11 s (it imported torch on the GUI thread).

Usage (from the repository root; Qt needs a display)::

    PYTHONPATH=src xvfb-run -a nice -n 10 .venv/bin/python benchmarks/dock_open.py [--dock Train]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to watch the event loop")
    parser.add_argument("--dock", choices=("Segment", "Train"), default="Segment", help="which dock to open")
    args = parser.parse_args()
    os.environ.setdefault("WSSS_CRAM_SETTINGS_FILE", str(Path(tempfile.mkdtemp()) / "settings.ini"))
    import napari
    from qtpy.QtCore import QEvent, QObject, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_wsss_cram.core.sample import make_patch

    rgb, _ = make_patch(0, 256, (0, 1))
    viewer = napari.Viewer(show=True)
    viewer.add_image(rgb[..., :3], name="patch", rgb=True)
    app = QApplication.instance()
    for _ in range(20):  # let the window settle before measuring
        app.processEvents()
        time.sleep(0.02)
    print(f"torch imported before opening the dock: {'torch' in sys.modules}")

    def longest_gap(action, seconds: float = 1.0) -> float:
        """The longest event-loop gap (ms) while ``action`` runs and for ``seconds`` after it."""
        stamps = [time.perf_counter()]
        tick = QTimer()
        tick.setInterval(10)
        tick.timeout.connect(lambda: stamps.append(time.perf_counter()))
        tick.start()
        app.processEvents()
        action()
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            app.processEvents()
            time.sleep(0.002)
        tick.stop()
        return max(1000 * (b - a) for a, b in zip(stamps, stamps[1:], strict=False))

    from qtpy.QtWidgets import QLabel

    own: list = []
    baseline_dock = longest_gap(lambda: own.append(viewer.window.add_dock_widget(QLabel("napari's own dock"),
                                                                                 name="baseline")))
    baseline_image = longest_gap(lambda: viewer.add_image(rgb[..., :3], name="baseline image", rgb=True))
    viewer.window.remove_dock_widget(own[0])
    viewer.layers.remove("baseline image")

    shown: list[float] = []

    class ShowWatcher(QObject):
        def eventFilter(self, obj, event):  # noqa: N802 (Qt naming)
            if event.type() == QEvent.Show and not shown:
                shown.append(time.perf_counter())
            return False

    watcher = ShowWatcher()
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    app.processEvents()
    t0 = time.perf_counter()
    ticks.append(t0)
    # the dock widget's constructor runs inside this call; its Show event comes with the next event-loop turns
    dock, widget = viewer.window.add_plugin_dock_widget("napari-wsss-cram", args.dock)
    returned = time.perf_counter()
    if widget.isVisible():
        shown.append(returned)
    else:
        widget.installEventFilter(watcher)
    ready: list[float] = []
    end = t0 + args.seconds
    while time.perf_counter() < end:
        app.processEvents()
        if not ready and getattr(widget, "model", None) is not None and widget.run_button.isEnabled():  # Segment
            ready.append(time.perf_counter())
        time.sleep(0.002)
    timer.stop()
    gaps = sorted(1000 * (b - a) for a, b in zip(ticks, ticks[1:], strict=False))
    p95 = gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))] if gaps else float("nan")
    print(f"open: constructor call -> shown {shown[0] - t0:.2f} s (the call returned after {returned - t0:.2f} s)"
          if shown else f"open: not shown within {args.seconds} s")
    print(f"stall: longest event-loop gap in the first {args.seconds:.0f} s {gaps[-1]:.0f} ms, p95 {p95:.0f} ms "
          f"({len(ticks)} ticks)")
    if args.dock == "Segment":
        print(f"model ready (Run enabled): {ready[0] - t0:.2f} s" if ready
              else f"model not ready within {args.seconds} s: {widget.message.text()}")
    base = max(baseline_dock, baseline_image)
    print(f"baseline (napari, same run): own dock {baseline_dock:.0f} ms, add an image {baseline_image:.0f} ms; "
          f"{args.dock} dock's longest gap = {gaps[-1] / base:.1f}x the larger")
    viewer.close()


if __name__ == "__main__":
    main()
