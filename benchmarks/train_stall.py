"""napari event-loop stalls while the Train dock trains, where they come from, and napari's own baseline.

A shown viewer with the Train dock, a 10 ms QTimer ticking on the GUI thread. First the baseline: the same timer
for ``--idle`` seconds while napari only repaints (a machine shared with other jobs stalls an idle napari too),
then the dock trains the synthetic sample (``sample_data/patches``, validation ``sample_data/validation``, the
``sample`` preset on the first ``--patches`` patches, cut to ``--steps`` steps per stage, validation ``--validations`` times per stage) through the
whole recipe (joint stage, pseudo-labels, segmentation stage), as Start does.

Prints the longest stall and the number of gaps > 100 ms per minute, for training and for the idle baseline
(and their ratio), then each gap > 100 ms of training attributed to what ran on the GUI thread meanwhile: the
dock's progress handler (``on_progress``, which feeds the plot), the plot's drawing (``FigureCanvas.draw``), or
nothing of ours (the worker holding the GIL, or the OS giving the core to another process).

Usage (from the repository root; Qt needs a display; the ``__main__`` guard is needed: helpers are spawned)::

    PYTHONPATH=src xvfb-run -a nice -n 10 .venv/bin/python benchmarks/train_stall.py [--steps 12 --patches 48]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gaps_of(ticks: list[float], t0: float | None = None, t1: float | None = None) -> list[tuple[float, float]]:
    """(start, end) of each interval between consecutive ticks within [t0, t1]."""
    chosen = [t for t in ticks if (t0 is None or t >= t0) and (t1 is None or t <= t1)]
    return list(zip(chosen, chosen[1:], strict=False))


def summary(gaps: list[tuple[float, float]]) -> tuple[float, int, float]:
    """(longest gap ms, gaps > 100 ms, minutes covered)."""
    if not gaps:
        return 0.0, 0, 0.0
    lengths = [1000 * (b - a) for a, b in gaps]
    return max(lengths), sum(v > 100 for v in lengths), (gaps[-1][1] - gaps[0][0]) / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="training steps per stage")
    parser.add_argument("--validations", type=int, default=1, help="validations per stage")
    parser.add_argument("--patches", type=int, default=48, help="train on the first N sample patches (linked)")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle napari (the baseline)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("WSSS_CRAM_SETTINGS_FILE", str(Path(tempfile.mkdtemp()) / "settings.ini"))
    import napari
    from qtpy.QtCore import QEventLoop, QTimer

    from napari_wsss_cram.core.sample import make_patch

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1366, 768)
    rgb, _ = make_patch(0, 256, (0, 1))
    viewer.add_image(rgb[..., :3], name="patch", rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-wsss-cram", "Train")
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))

    def wait(seconds: float, until=None) -> None:
        """Run the event loop (processEvents in a loop fires no timers) for ``seconds`` or until ``until()``."""
        from qtpy.QtCore import QEventLoop

        loop, poll, end = QEventLoop(), QTimer(), time.perf_counter() + seconds
        poll.setInterval(20)
        poll.timeout.connect(lambda: loop.quit() if time.perf_counter() > end or (until and until()) else None)
        poll.start()
        loop.exec_()
        poll.stop()

    wait(3.0)  # the dock finds its devices in a worker; let the window settle
    timer.start()
    idle0 = time.perf_counter()
    wait(args.idle)
    idle1 = time.perf_counter()

    # what runs on the GUI thread during training, timed
    spans: dict[str, list[tuple[float, float]]] = {"on_progress": [], "plot draw": []}

    def timed(name: str, function):
        def call(*a, **k):
            t = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                spans[name].append((t, time.perf_counter()))
        return call

    widget.on_progress = timed("on_progress", widget.on_progress)
    widget.plot.draw = timed("plot draw", widget.plot.draw)
    widget.preset_combo.setCurrentText("sample")
    patches = Path(tempfile.mkdtemp()) / "patches"  # the first N sample patches: the pseudo-label pass stays short
    patches.mkdir()
    for path in sorted((ROOT / "sample_data" / "patches").glob("*.png"))[: args.patches]:
        (patches / path.name).symlink_to(path)
    widget.data_row.setText(str(patches))
    widget.val_row.setText(str(ROOT / "sample_data" / "validation"))
    widget.out_row.setText(str(args.out or Path(tempfile.mkdtemp()) / "run"))
    widget.steps_spin.setValue(args.steps)
    widget.weights_combo.setCurrentText("random")
    build = widget.config

    def config(resume: bool = False):  # validation --validations times per stage (the dock's default is 5)
        import dataclasses

        return dataclasses.replace(build(resume), val_every_steps=max(1, args.steps // args.validations))

    widget.config = config
    train0 = time.perf_counter()
    widget.start()
    if widget.worker is None:
        raise SystemExit(f"Training did not start: {widget.message.text()}")
    loop = QEventLoop()
    done = QTimer()
    done.setInterval(50)
    done.timeout.connect(lambda: loop.quit() if widget.worker is None else None)
    done.start()
    loop.exec_()
    train1 = time.perf_counter()
    timer.stop()
    print(f"training: {train1 - train0:.0f} s, {args.steps} steps per stage; [{widget.message.text()}]")
    idle_max, idle_n, idle_min = summary(gaps_of(ticks, idle0, idle1))
    train_gaps = gaps_of(ticks, train0, train1)
    train_max, train_n, train_min = summary(train_gaps)
    print(f"  ({sum(idle0 <= t <= idle1 for t in ticks)} ticks while idle, {len(ticks)} in all)")
    print(f"napari idle ({args.idle:.0f} s, the baseline): longest stall {idle_max:.0f} ms, {idle_n} gaps > 100 ms "
          f"({idle_n / max(idle_min, 1e-9):.1f} per minute)")
    print(f"training ({train1 - train0:.0f} s): longest stall {train_max:.0f} ms = {train_max / max(idle_max, 1):.1f}x "
          f"idle napari, {train_n} gaps > 100 ms ({train_n / max(train_min, 1e-9):.1f} per minute)")
    blame: dict[str, list[float]] = {"on_progress": [], "plot draw": [], "nothing of ours (GIL/OS)": []}
    for a, b in train_gaps:
        if b - a <= 0.1:
            continue
        inside = {name: sum(max(0.0, min(b, e) - max(a, s)) for s, e in found) for name, found in spans.items()}
        name = max(inside, key=inside.get)
        blame[name if inside[name] > 0.5 * (b - a) else "nothing of ours (GIL/OS)"].append(1000 * (b - a))
    for name, values in blame.items():
        if values:
            print(f"  gaps > 100 ms during {name}: {len(values)}, longest {max(values):.0f} ms")
    for name, found in spans.items():
        if found:
            lengths = [1000 * (e - s) for s, e in found]
            print(f"  {name}: {len(found)} calls, longest {max(lengths):.0f} ms, total {sum(lengths) / 1000:.1f} s")
    viewer.close()


if __name__ == "__main__":
    main()
