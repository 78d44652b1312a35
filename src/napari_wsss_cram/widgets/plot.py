"""A small live plot for the Train dock: loss terms and validation mIoU per step."""

from __future__ import annotations

import time

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure

#: Redraw at most this often: matplotlib drawing runs on the GUI thread.
MIN_REDRAW_SECONDS = 0.5
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
        self.figure = Figure(figsize=(4.0, 2.4), dpi=100, facecolor="#262930", layout="constrained")
        super().__init__(self.figure)
        self.setParent(parent)
        self.setMinimumHeight(200)
        self.loss_axes = self.figure.add_subplot(1, 2, 1)
        self.miou_axes = self.figure.add_subplot(1, 2, 2)
        self.losses: dict[str, tuple[list[int], list[float]]] = {}
        self.miou: tuple[list[int], list[float]] = ([], [])
        self._last_draw = 0.0
        self.clear()

    def clear(self) -> None:
        """Forget all curves (a new training run)."""
        self.losses = {}
        self.miou = ([], [])
        self._redraw(force=True)

    def add_losses(self, step: int, losses: dict[str, float]) -> None:
        for name, value in losses.items():
            if value is None:
                continue
            steps, values = self.losses.setdefault(name, ([], []))
            steps.append(int(step))
            values.append(float(value))
        self._redraw()

    def add_miou(self, step: int, miou: float) -> None:
        """One validation score, at the training step it was measured after."""
        self.miou[0].append(int(step))
        self.miou[1].append(float(miou))
        self._redraw(force=True)

    def _style(self, axes, title: str, xlabel: str) -> None:
        axes.set_facecolor("#262930")
        axes.set_title(title, color="white", fontsize=9)
        axes.set_xlabel(xlabel, color="white", fontsize=8)
        axes.tick_params(colors="white", labelsize=7)
        for spine in axes.spines.values():
            spine.set_color("#888888")

    def _redraw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < MIN_REDRAW_SECONDS:
            return
        self._last_draw = now
        self.loss_axes.clear()
        self.miou_axes.clear()
        self._style(self.loss_axes, "loss (lower = better)", "step")
        self._style(self.miou_axes, "validation mIoU (higher = better)", "step")
        for name, (steps, values) in self.losses.items():
            self.loss_axes.plot(steps, values, label=loss_words(name), linewidth=1)
        if self.losses:
            self.loss_axes.legend(fontsize=6, ncol=1, loc="upper right", facecolor="#262930", labelcolor="white",
                                  framealpha=0.5, handlelength=1.0, columnspacing=0.8)
        if self.miou[0]:
            self.miou_axes.plot(*self.miou, marker="o", color="#f39800", linewidth=1)
            self.miou_axes.set_ylim(0, 1)
            first, last = min(self.miou[0]), max(self.miou[0])
            if first == last:  # one point: matplotlib would give a -0.04..0.04 step axis around it
                self.miou_axes.set_xlim(first - 1, last + 1)
                self.miou_axes.xaxis.get_major_locator().set_params(integer=True)
        self.draw_idle()

    def flush(self) -> None:
        """Draw whatever arrived since the last throttled redraw (end of a run)."""
        self._redraw(force=True)
