"""Issue 20, items 4, 10, 11, 12: the GUI thread stays free (GeoJSON import, training plot, result layers) and
activation maps stay readable under the labels (real viewer under Xvfb)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from qtpy.QtCore import QTimer

from napari_wsss_cram.core.classes import WSSS4LUAD

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_CRAM_SETTINGS_FILE", str(tmp_path / "settings.ini"))


class Ticks:
    """A 10 ms timer on the GUI thread: the longest gap between its ticks is the longest event-loop stall."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(lambda: self.times.append(time.perf_counter()))
        self.timer.start()

    def stop(self, until: float | None = None) -> float:
        """Stop; the longest gap in ms (of those ending before ``until``)."""
        self.timer.stop()
        times = [t for t in self.times if until is None or t <= until]
        return 1000 * max(np.diff(times)) if len(times) > 1 else float("inf")


def _wavy_ring(cy: float, cx: float, radius: float, vertices: int) -> list[list[float]]:
    """A closed star-ish ring of ``vertices`` points (x, y), as QuPath writes a traced region."""
    t = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    r = radius * (0.8 + 0.2 * np.cos(7 * t))
    ring = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1).round(1).tolist()
    return ring + [ring[0]]


def _slow_geojson(path, size: int) -> None:
    """Annotations that cost skimage seconds to fill (rings of many vertices over big boxes): the shape of a
    slide-region export, small enough for a test."""
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_wavy_ring(c, c, size * 0.3,
                                                                                                300)]},
                 "properties": {"objectType": "annotation", "classification": {"name": name}}}
                for c, name in ((size * 0.35, "Tumor"), (size * 0.6, "Stroma"))]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def test_dropped_geojson_is_read_off_the_gui_thread(make_napari_viewer, qtbot, tmp_path):
    """Item 10: dropping a GeoJSON whose rings take seconds to fill returns at once; the event loop keeps
    ticking while it is read (skimage holds the GIL: a worker thread alone froze the window as much), and the
    layer that comes is the core's rasterisation, on the image."""
    from napari_wsss_cram.core.io.qupath import qupath_to_labels

    size = 900
    path = tmp_path / "region.geojson"
    _slow_geojson(path, size)
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((size, size, 3), np.uint8), name="slide", rgb=True)
    t0 = time.perf_counter()
    truth = qupath_to_labels(str(path), (size, size), WSSS4LUAD).labels
    in_process = time.perf_counter() - t0
    added: list[float] = []
    viewer.layers.events.inserted.connect(lambda event: added.append(time.perf_counter()))
    ticks = Ticks()
    t0 = time.perf_counter()
    viewer.open(str(path), plugin="napari-wsss-cram")
    open_seconds = time.perf_counter() - t0
    qtbot.waitUntil(lambda: "qupath: slide" in viewer.layers, timeout=120_000)
    # up to the layer's arrival: adding it is napari's own cost (its first Labels layer compiles shaders: 2-4 s
    # with software OpenGL on a busy machine, whoever adds it)
    stall_ms = ticks.stop(until=added[0])
    print(f"\nGeoJSON import: {in_process:.2f} s in the calling thread; viewer.open returned in "
          f"{open_seconds:.2f} s; longest event-loop stall while it was read {stall_ms:.0f} ms")
    assert in_process > 1.0, "the file must be slow to fill for this test to mean anything"
    assert open_seconds < in_process / 2
    assert stall_ms < 500
    np.testing.assert_array_equal(viewer.layers["qupath: slide"].data, truth)


def test_dropped_geojson_import_can_be_cancelled(make_napari_viewer, qtbot, tmp_path):
    """Item 10: the import's notification has a Cancel button; cancelling adds no layer and frees the worker."""
    from napari_wsss_cram import _reader

    path = tmp_path / "region.geojson"
    _slow_geojson(path, 1200)
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((1200, 1200, 3), np.uint8), name="slide", rgb=True)
    viewer.open(str(path), plugin="napari-wsss-cram")
    [run] = list(_reader._RUNNING)
    assert [label for label, _ in run.notification.actions] == ["Cancel"]
    qtbot.wait(300)
    _, cancel = run.notification.actions[0]
    t0 = time.perf_counter()
    cancel(None)
    qtbot.waitUntil(lambda: not run.running, timeout=10_000)
    assert time.perf_counter() - t0 < 3.0
    qtbot.wait(200)
    assert "qupath: slide" not in viewer.layers
    assert not _reader._RUNNING
