"""napari event-loop stalls while a slide-region GeoJSON is re-opened on its image (issue 20, item 10).

A synthetic region result (``--size`` px a side, blobs of tumor/stroma/normal with holes, as a segmentation
export has) is written as QuPath GeoJSON with the plugin's own writer; a shown viewer holds an RGB image of the
same size and a 10 ms QTimer ticks on the GUI thread. Prints the longest stall:

- napari's own baseline: adding a Labels layer of the same size (what any reader's result costs);
- before: the GeoJSON read on the GUI thread, as napari called the reader (``_reader.read_qupath``);
- after: the GeoJSON dropped on napari (``viewer.open``), read in a worker waiting on a helper process; the
  stall while it is read, then the turn that adds the layer, and the ratios to napari's own add.

Usage (from the repository root; Qt needs a display; the ``__main__`` guard is needed: the helper is spawned)::

    PYTHONPATH=src xvfb-run -a nice -n 10 .venv/bin/python benchmarks/geojson_import_stall.py [--size 4096]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def region_labels(size: int, seed: int = 0) -> np.ndarray:
    """Blobs of three classes and background at 4-px grain: thousands of rings, as a real export has."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    small = size // 4
    a = ndimage.gaussian_filter(rng.random((small, small)), 3)
    b = ndimage.gaussian_filter(rng.random((small, small)), 3)
    labels = np.full((small, small), 3, np.uint8)
    labels[a > 0.52] = 0
    labels[a <= 0.48] = 1
    labels[b > 0.53] = 2
    return np.kron(labels, np.ones((4, 4), np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    import napari
    from qtpy.QtCore import QTimer

    from napari_wsss_cram import _reader
    from napari_wsss_cram.core.classes import WSSS4LUAD
    from napari_wsss_cram.core.io.qupath import write_geojson

    labels = region_labels(args.size)
    path = Path(tempfile.mkdtemp()) / "region.geojson"
    t = time.perf_counter()
    write_geojson(path, labels, WSSS4LUAD)
    print(f"{args.size}x{args.size} region: GeoJSON {path.stat().st_size / 1e6:.1f} MB written in "
          f"{time.perf_counter() - t:.1f} s")
    viewer = napari.Viewer(show=True)
    viewer.add_image(np.full((args.size, args.size, 3), 230, np.uint8), name="slide", rgb=True)
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()

    def wait(seconds: float, until=None) -> None:
        """Run the event loop (processEvents in a loop fires no timers) for ``seconds`` or until ``until()``."""
        from qtpy.QtCore import QEventLoop

        loop, poll, end = QEventLoop(), QTimer(), time.perf_counter() + seconds
        poll.setInterval(20)
        poll.timeout.connect(lambda: loop.quit() if time.perf_counter() > end or (until and until()) else None)
        poll.start()
        loop.exec_()
        poll.stop()

    def longest(t0: float, t1: float) -> float:
        chosen = [t for t in ticks if t0 <= t <= t1]
        return 1000 * max(np.diff(chosen)) if len(chosen) > 1 else 0.0

    wait(1.0)
    costs = []
    for _ in range(2):  # cold (napari's first Labels layer builds its shaders), then warm
        t = time.perf_counter()
        layer = viewer.add_labels(labels, name="napari's own")
        costs.append(1000 * (time.perf_counter() - t))
        wait(0.5)
        viewer.layers.remove(layer)
        wait(0.5)
    print(f"napari's own add of a {args.size}² Labels layer: {costs[0]:.0f} ms cold, {costs[1]:.0f} ms warm")
    warm = costs[1]

    t0 = time.perf_counter()
    data, kwargs, _ = _reader.read_qupath(path)  # before: what napari ran on its GUI thread for a drop
    before = 1000 * (time.perf_counter() - t0)
    layer = viewer.add_labels(data, **{k: v for k, v in kwargs.items() if k != "name"}, name="before")
    wait(0.5)
    viewer.layers.remove(layer)
    wait(0.5)
    print(f"before: read on the GUI thread {before:.0f} ms = {before / warm:.1f}x napari's own add")

    added: list[float] = []
    viewer.layers.events.inserted.connect(lambda event: added.append(time.perf_counter()))
    t0 = time.perf_counter()
    viewer.open(str(path), plugin="napari-wsss-cram")
    returned = time.perf_counter()
    wait(3600, until=lambda: "qupath: slide" in viewer.layers)
    wait(1.0)
    timer.stop()
    reading = longest(t0, added[0])
    adding = longest(added[0] - 0.001, added[0] + 1.0)
    print(f"after: viewer.open returned in {1000 * (returned - t0):.0f} ms; layer after {added[0] - t0:.1f} s; "
          f"longest stall while read {reading:.0f} ms = {reading / warm:.2f}x napari's own add; the turn adding "
          f"the layer {adding:.0f} ms = {adding / warm:.2f}x")
    viewer.close()


if __name__ == "__main__":
    main()
