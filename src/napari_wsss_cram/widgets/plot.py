"""A small live plot for the Train dock: loss terms and validation mIoU per step.

Drawing runs on the GUI thread, so it is kept cheap (redrawing everything on each point stalled napari for seconds while training): the
curves are Line2D objects updated in place (not axes cleared and re-plotted), the layout is fixed (no
constrained-layout solve per draw), the legend is rebuilt only when a curve appears, and new points are drawn by
one coalesced timer at most every MIN_REDRAW_SECONDS, never inside the progress handler itself.
"""

from __future__ import annotations

import time

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import QTimer

#: Redraw at most this often: matplotlib drawing runs on the GUI thread.
MIN_REDRAW_SECONDS = 1.0
#: The loss terms of ``core.losses.joint_loss`` in plain words (the legend is read by pathologists).
LOSS_WORDS = {"total": "total", "cls": "which classes a patch has", "bg": "glass kept as background",
              "presence": "each class found in its map", "constrained": "pixels only of the patch's classes",
              "ce": "agreement with pseudo-labels", "energy": "edges follow the stain"}


def loss_words(name: str) -> str:
    """A loss term's legend entry: plain words for the known terms, the name itself otherwise."""
    return LOSS_WORDS.get(name, name)


class TrainingPlot(FigureCanvasQTAgg):
    """Loss curves (left) and validation mIoU (right), styled to sit in napari's dark theme."""

    def __init__(self, parent=None):
        self.figure = Figure(figsize=(4.0, 2.4), dpi=100, facecolor="#262930")
        super().__init__(self.figure)
        self.setParent(parent)
        self.setMinimumHeight(200)
        # a fixed layout: constrained layout re-solved it at every draw (most of a draw's time)
        self.figure.subplots_adjust(left=0.1, right=0.98, bottom=0.2, top=0.82, wspace=0.3)
        self.loss_axes = self.figure.add_subplot(1, 2, 1)
        self.miou_axes = self.figure.add_subplot(1, 2, 2)
        self.losses: dict[str, tuple[list[int], list[float]]] = {}
        self.miou: tuple[list[int], list[float]] = ([], [])
        self.lines: dict[str, object] = {}  # loss name -> its Line2D, updated in place
        self.miou_line = None
        self.draws = 0  # how many times the figure was rendered (for the tests and benchmarks)
        self._last_draw = 0.0
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._redraw)
        self.clear()

    def clear(self) -> None:
        """Forget all curves (a new training run)."""
        self.losses = {}
        self.miou = ([], [])
        self.lines = {}
        self.miou_line = None
        self.loss_axes.clear()
        self.miou_axes.clear()
        self._style(self.loss_axes, "loss\n(lower is better)", "step")
        self._style(self.miou_axes, "validation mIoU\n(higher is better)", "step")
        self.miou_axes.set_ylim(0, 1)
        self._redraw()

    def add_losses(self, step: int, losses: dict[str, float]) -> None:
        """One training step's loss terms (drawn with the next coalesced redraw)."""
        for name, value in losses.items():
            if value is None:
                continue
            steps, values = self.losses.setdefault(name, ([], []))
            steps.append(int(step))
            values.append(float(value))
        self._schedule()

    def add_miou(self, step: int, miou: float) -> None:
        """One validation score, at the training step it was measured after."""
        self.miou[0].append(int(step))
        self.miou[1].append(float(miou))
        self._update_miou()  # a few points a run: its axes follow at once, the drawing waits for the timer
        self._schedule()

    def _schedule(self) -> None:
        """Draw within MIN_REDRAW_SECONDS of the last draw, once for however many points came meanwhile."""
        if not self._timer.isActive():
            wait = max(0.0, MIN_REDRAW_SECONDS - (time.monotonic() - self._last_draw))
            self._timer.start(int(1000 * wait))

    def _style(self, axes, title: str, xlabel: str) -> None:
        axes.set_facecolor("#262930")
        axes.set_title(title, color="white", fontsize=8)
        axes.set_xlabel(xlabel, color="white", fontsize=8)
        axes.tick_params(colors="white", labelsize=7)
        for spine in axes.spines.values():
            spine.set_color("#888888")

    def _redraw(self) -> None:
        self._timer.stop()
        self._last_draw = time.monotonic()
        new_curve = False
        for name, (steps, values) in self.losses.items():
            line = self.lines.get(name)
            if line is None:
                (self.lines[name],) = self.loss_axes.plot(steps, values, label=loss_words(name), linewidth=1)
                new_curve = True
            else:
                line.set_data(steps, values)
        if new_curve:
            self.loss_axes.legend(fontsize=6, ncol=1, loc="upper right", facecolor="#262930", labelcolor="white",
                                  framealpha=0.5, handlelength=1.0, columnspacing=0.8)
        if self.lines:
            self.loss_axes.relim()
            self.loss_axes.autoscale_view()
        self._update_miou()
        self.draw_idle()

    def _update_miou(self) -> None:
        if not self.miou[0]:
            return
        if self.miou_line is None:
            (self.miou_line,) = self.miou_axes.plot(*self.miou, marker="o", color="#f39800", linewidth=1)
        else:
            self.miou_line.set_data(*self.miou)
        first, last = min(self.miou[0]), max(self.miou[0])
        # one point: matplotlib would give a -0.04..0.04 step axis around it
        self.miou_axes.set_xlim(first - 1, last + 1) if first == last else self.miou_axes.set_xlim(first, last)

    def draw(self) -> None:
        """Render the figure (Qt calls this when the widget repaints after :meth:`draw_idle`)."""
        self.draws += 1
        super().draw()

    def flush(self) -> None:
        """Draw whatever arrived since the last throttled redraw (end of a run)."""
        self._redraw()
