"""Opening the plugin's synthetic slide sample (File > Open Sample > Synthetic H&E slide) with an empty cache, then
again from the cache: seconds until the slide is shown, and the longest event-loop stall meanwhile (the first open
generates it in a background thread behind a placeholder layer), next to napari's own cost of adding an in-memory
image of the slide's size in the same run. ``--size`` lowers the slide's side (default 4096, the real one).

Usage (from the repository root; Qt needs a display)::

    PYTHONPATH=src xvfb-run -a nice -n 10 .venv/bin/python benchmarks/sample_slide_open.py [--size 2048]
"""

from __future__ import annotations

import os
import tempfile
import time


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="side of the generated slide in pixels")
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="wsss-cram-cache-")
    os.environ["WSSS_CRAM_CACHE"] = cache  # empty: the first open generates the slide
    import napari
    import numpy as np
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_wsss_cram import _sample_data

    _sample_data.SLIDE_SIZE = args.size
    if args.size == 4096 and (_sample_data.CHECKOUT_SAMPLE_DATA / "slide" / _sample_data.SLIDE_NAME).is_file():
        print("note: sample_data/slide/ of this checkout exists: the first open reads it instead of generating")
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    for _ in range(10):
        app.processEvents()

    def watch(action, done) -> tuple[float, float, int]:
        """Run ``action``, keep the event loop going until ``done()``: (seconds, longest gap ms, ticks)."""
        ticks: list[float] = []
        timer = QTimer()
        timer.setInterval(10)
        timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
        timer.start()
        t0 = time.perf_counter()
        ticks.append(t0)
        action()
        while not done():
            app.processEvents()
            time.sleep(0.002)
        seconds = time.perf_counter() - t0
        app.processEvents()
        timer.stop()
        ticks.append(time.perf_counter())
        return seconds, max(1000 * (b - a) for a, b in zip(ticks, ticks[1:], strict=False)), len(ticks) - 2

    rgb = np.full((args.size, args.size, 3), 200, np.uint8)
    _, baseline, _ = watch(lambda: viewer.add_image(rgb, name="baseline", rgb=True), lambda: True)
    viewer.layers.remove("baseline")
    print(f"napari baseline (same run): adding a {args.size}x{args.size} in-memory image stalls {baseline:.0f} ms")
    for attempt in ("empty cache", "cached"):
        seconds, gap, ticks = watch(lambda: viewer.open_sample("napari-wsss-cram", "slide"),
                                    lambda: "synthetic H&E slide" in viewer.layers)
        print(f"{attempt}: slide shown after {seconds:.1f} s; longest event-loop stall {gap:.0f} ms "
              f"({gap / max(baseline, 1e-3):.1f}x napari's baseline); {ticks} timer ticks ran meanwhile", flush=True)
        for layer in list(viewer.layers):
            viewer.layers.remove(layer)
    viewer.close()


if __name__ == "__main__":
    main()
