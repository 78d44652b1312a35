"""The files of a training run folder, and which of them a folder given as a model means, in a module without
torch: the Train dock asks for them when it opens, and importing ``core.train`` (torch) there froze napari for
seconds."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from .classes import ClassSpec
from .errors import CheckpointError

#: the models of a run folder, in the order a run folder given as a checkpoint is resolved: the recipe's final
#: model, the best by validation mIoU, the latest
FINAL, BEST, LAST = "final.pt", "best.pt", "last.pt"
RESUME = "resume.pt"  # model + optimiser + scheduler + scaler + RNG + step, for --resume
METRICS = "metrics.csv"  # one row per logged step and per validation (MetricsLog)
CONFIG = "config.toml"  # the run's whole TrainConfig, written when it starts
RECIPE_LOG = "recipe.json"  # the recipe's finished stages (core/recipe.py)
JOINT = "joint"  # the recipe's first stage; then round1, round2, ...


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` itself, or for a training run folder its model: ``final.pt`` (the whole recipe), else ``best.pt``,
    else ``last.pt``; else the last finished stage's of a stopped recipe (``joint/``, ``round1/``, ...)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in (FINAL, BEST, LAST):
        if (path / name).is_file():
            return path / name
    stages = sorted((d for d in path.iterdir() if d.is_dir() and (d.name == JOINT or d.name.startswith("round"))
                     and not d.name.endswith("-pseudo")), key=lambda d: (d.name != JOINT, d.name))
    for stage in reversed(stages):
        for name in (BEST, LAST):
            if (stage / name).is_file():
                return stage / name
    raise CheckpointError(f"{path} is a folder without a model ({FINAL}, {BEST} or {LAST}): give a checkpoint "
                          "file or a training run folder.")


def is_resumable(out: str | os.PathLike) -> bool:
    """Whether ``out`` holds a training run that ``--resume`` (the dock's Resume) can continue: a stage's resume
    state, or a recipe that has not written its final model yet."""
    out = Path(out)
    if (out / RESUME).is_file():
        return True
    if not out.is_dir() or (out / FINAL).is_file():
        return False
    return (out / RECIPE_LOG).is_file() or any((d / RESUME).is_file() for d in out.iterdir() if d.is_dir())


def is_single_stage_run(out: str | os.PathLike) -> bool:
    """Whether ``out`` holds one training stage run alone (``train --stage 1|2``, or a run of an earlier version)
    rather than a recipe: ``--resume`` then continues that stage."""
    out = Path(out)
    return (out / RESUME).is_file() and not (out / RECIPE_LOG).is_file()


class MetricsLog:
    """``metrics.csv``: one row per logged step (losses, lr) and per validation (mIoU, per-class IoU).

    The loss columns are those of the first logged step (the loss terms depend on the method switches); a
    resumed run keeps the file's header and drops rows after the step it resumes from.
    """

    def __init__(self, path: Path, classes: ClassSpec, resume_step: int | None) -> None:
        self.path = path
        self.classes = classes
        self.columns: list[str] | None = None
        rows: list[dict] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or []) or None
                rows = [r for r in reader if int(r["step"]) <= resume_step]
        if self.columns is not None:
            self._rewrite(rows)

    def _rewrite(self, rows: list[dict]) -> None:
        with open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        if self.columns is None:
            losses = [k for k in row if k.startswith("loss_")]
            self.columns = (["kind", "step", "epoch", "lr", "seconds"] + losses
                            + ["pseudo_confident", "pseudo_foreground", "mIoU"]
                            + [f"iou_{n}" for n in self.classes.names])
            self._rewrite([])
        new = [k for k in row if k.startswith("loss_") and k not in self.columns]
        if new:  # a loss term that starts later (after the joint warm-up): widen the header, keep the rows
            with open(self.path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            at = self.columns.index("pseudo_confident")
            self.columns = self.columns[:at] + new + self.columns[at:]
            self._rewrite(rows)
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, self.columns, extrasaction="ignore").writerow(row)
