"""The GUI stays responsive while the Segment dock runs a CPU inference (QTimer tick test).

Prints the longest event-loop stall; the target is < 100 ms. The assertion only guards against a frozen GUI
(the run must not block the loop for a whole second): timing figures on a shared 2-core machine vary.
"""

from __future__ import annotations

import time

import pytest
from qtpy.QtCore import QTimer

from widget_helpers import he_like_image, make_tiny_checkpoint

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_CRAM_SETTINGS_FILE", str(tmp_path / "settings.ini"))


@pytest.mark.parametrize("crf", [False, True], ids=["no-crf", "crf"])
def test_event_loop_keeps_ticking_during_inference(make_napari_viewer, qtbot, tmp_path, crf):
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.pt")
    viewer = make_napari_viewer()
    viewer.add_image(he_like_image(512), name="patch", rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-wsss-cram", "Segment")
    assert widget.set_checkpoint(checkpoint)
    widget.tile_spin.setValue(128)
    widget.overlap_spin.setValue(32)
    widget.resolution_value.setValue(1.0)
    widget.crf_check.setChecked(crf)

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    t0 = time.perf_counter()
    widget.run()
    progress_times: list[float] = []
    widget.worker.yielded.connect(lambda _: progress_times.append(time.perf_counter()))
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    run_seconds = time.perf_counter() - t0
    timer.stop()
    assert "labels: patch" in viewer.layers, widget.message.text()
    # While the worker computes (up to its last progress event) vs. overall (adding the 4 result layers on the
    # GUI thread is napari's own cost: ~0.2-0.3 s per layer with software OpenGL).
    inference_end = progress_times[-1]
    during = [b - a for a, b in zip(ticks, ticks[1:], strict=False) if b <= inference_end]
    overall = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    stall_ms, overall_ms = 1000 * max(during), 1000 * max(overall)
    print(f"\nGUI responsiveness ({'CRF' if crf else 'no CRF'}): run {run_seconds:.2f} s on 512x512 px, "
          f"{len(ticks)} ticks of 10 ms; max event-loop stall during inference {stall_ms:.0f} ms "
          f"(p95 {1000 * sorted(during)[int(0.95 * len(during))]:.0f} ms); including result-layer creation "
          f"{overall_ms:.0f} ms")
    assert len(during) > 5
    assert stall_ms < 1000


@pytest.mark.parametrize("backend", ["torch", "pydensecrf"])
def test_crf_on_a_whole_tile_does_not_freeze_the_event_loop(make_napari_viewer, qtbot, tmp_path, monkeypatch,
                                                            backend):
    """One 512x512 tile with the CRF on: pydensecrf called in the worker thread held the GIL for the whole tile
    (measured 570-740 ms stalls); the torch backend releases it, and the dock runs pydensecrf in a helper
    process. Loose bound (measured ~20-30 ms with either on a shared 2-core machine)."""
    import dataclasses

    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.pt")
    viewer = make_napari_viewer()
    viewer.add_image(he_like_image(512), name="patch", rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-wsss-cram", "Segment")
    assert widget.set_checkpoint(checkpoint)
    widget.tile_spin.setValue(512)
    widget.resolution_value.setValue(1.0)
    widget.crf_check.setChecked(True)
    build = widget.predict_settings

    def with_backend():  # the dock has no backend field: its CRF is "auto" (torch)
        settings = build()
        assert settings.crf and settings.crf_isolated
        return dataclasses.replace(settings, crf_params=dataclasses.replace(settings.crf_params, backend=backend))

    monkeypatch.setattr(widget, "predict_settings", with_backend)
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    widget.run()
    progress_times: list[float] = []
    widget.worker.yielded.connect(lambda _: progress_times.append(time.perf_counter()))
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    timer.stop()
    assert "labels: patch" in viewer.layers, widget.message.text()
    during = [b - a for a, b in zip(ticks, ticks[1:], strict=False) if b <= progress_times[-1]]
    stall_ms = 1000 * max(during)
    print(f"\nCRF ({backend}) on one 512x512 tile: max event-loop stall during inference {stall_ms:.0f} ms")
    assert len(during) > 5
    assert stall_ms < 300
