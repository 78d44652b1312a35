"""The files of a training run folder, and which of them a folder given as a model means, in a module without
torch: the Train dock asks for them when it opens, and importing ``core.train`` (torch) there froze napari for
seconds."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError

#: the models of a run folder, in the order a run folder given as a checkpoint is resolved: the recipe's final
#: model, the best by validation mIoU, the latest
FINAL, BEST, LAST = "final.pt", "best.pt", "last.pt"
RESUME = "resume.pt"  # model + optimiser + scheduler + scaler + RNG + step, for --resume
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
