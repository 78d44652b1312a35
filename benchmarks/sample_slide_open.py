"""Opening the plugin's synthetic slide sample (File > Open Sample > Synthetic H&E slide) with an empty cache, then
again from the cache: seconds, and the longest event-loop stall (napari runs sample functions on its GUI thread, so
the window can only repaint where the generator lets it: at each strip of the slide).

Usage (from the repository root; Qt needs a display)::

    PYTHONPATH=src xvfb-run -a nice -n 10 .venv/bin/python benchmarks/sample_slide_open.py
"""

from __future__ import annotations

import os
import tempfile
import time


def main() -> None:
    cache = tempfile.mkdtemp(prefix="wsss-cram-cache-")
    os.environ["WSSS_CRAM_CACHE"] = cache  # empty: the first open generates the slide
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_wsss_cram import _sample_data

    if (_sample_data.CHECKOUT_SAMPLE_DATA / "slide" / _sample_data.SLIDE_NAME).is_file():
        print("note: sample_data/slide/ of this checkout exists: the first open reads it instead of generating")
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    for _ in range(10):
        app.processEvents()
    for attempt in ("empty cache", "cached"):
        ticks: list[float] = []
        timer = QTimer()
        timer.setInterval(10)
        timer.timeout.connect(lambda ticks=ticks: ticks.append(time.perf_counter()))
        timer.start()
        t0 = time.perf_counter()
        ticks.append(t0)
        viewer.open_sample("napari-wsss-cram", "slide")
        seconds = time.perf_counter() - t0
        app.processEvents()
        timer.stop()
        ticks.append(time.perf_counter())
        gaps = sorted(1000 * (b - a) for a, b in zip(ticks, ticks[1:], strict=False))
        print(f"{attempt}: opened in {seconds:.1f} s; longest event-loop stall {gaps[-1]:.0f} ms; "
              f"{len(ticks) - 2} timer ticks ran meanwhile (the window repainted)", flush=True)
        for layer in list(viewer.layers):
            viewer.layers.remove(layer)
    viewer.close()


if __name__ == "__main__":
    main()
