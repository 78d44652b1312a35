"""The whole training recipe as one run: the joint model, then segmentation rounds on pseudo-labels.

``wsss-cram train PATCH_DIR`` (and the Train dock's Run) call :func:`train_recipe_steps`. With ``rounds = R``
(TrainConfig) it runs, in one run folder ``OUT``:

1. ``OUT/joint/``: the joint WSSS-CRAM model (stage 1: both branches, image-level labels);
2. for r = 1..R: ``OUT/round<r>-pseudo/``, the previous model's segmentation branch restricted to each patch's
   image-level classes and its tissue (``make_pseudo_labels``, refined per ``pseudo_refine``), then
   ``OUT/round<r>/``, an independent segmentation model trained on them (stage 2; round 2 is "stage 3", a
   self-training round on round 1's labels);
3. ``OUT/final.pt``: a copy of the last model (its ``best.pt`` when a validation set chose one, else ``last.pt``),
   the checkpoint ``predict`` and the Segment dock use when given ``OUT``.

The wall-clock budget ``minutes`` is the whole recipe's: stage i gets ``stage_shares[i]`` of it (equal shares
by default) and the last stage what is left, so pseudo-labelling counts too. ``steps`` caps every stage.
``OUT/recipe.json`` records each finished stage, so ``--resume`` continues where the run stopped. Each stage
stays reachable alone (``train --stage 1``, ``pseudo-labels``, ``train --stage 2``) for ablations.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Generator
from pathlib import Path

from .errors import DatasetError
from .io.atomic import atomic_path
from .progress import CancelToken, Progress
from .run_files import CONFIG, FINAL, JOINT, LAST, RECIPE_LOG, is_resumable  # noqa: F401
from .train_config import PREVIOUS, TrainConfig, dumps_toml


def stage_names(rounds: int) -> list[str]:
    """The run sub-folders of a recipe with ``rounds`` segmentation rounds: ``joint``, ``round1``, ..."""
    return [JOINT, *(f"round{r}" for r in range(1, rounds + 1))]


def describe_stage(name: str) -> str:
    """A stage in words, for progress lines: 'the joint model', 'segmentation round 1'."""
    return "the joint model" if name == JOINT else f"segmentation round {name.removeprefix('round')}"


def stage_minutes(config: TrainConfig) -> list[float | None]:
    """Each stage's share of the recipe's wall-clock budget (None everywhere without a budget)."""
    n = config.rounds + 1
    if not config.minutes:
        return [None] * n
    shares = list(config.stage_shares) or [1.0] * n
    if len(shares) != n:
        raise DatasetError(f"stage_shares has {len(shares)} values for {n} stages (the joint model and "
                           f"{config.rounds} rounds); give one share per stage or leave it out.")
    total = sum(shares)
    return [config.minutes * s / total for s in shares]


def _stage_config(config: TrainConfig, name: str, minutes: float | None, pseudo: Path | None,
                  resume: bool, previous: Path | None = None) -> TrainConfig:
    data = config.to_dict()
    data.update(out=str(Path(config.out) / name), minutes=minutes, resume=resume, stage_shares=[])
    if config.init == PREVIOUS:  # the joint model starts from `weights`, each round from the model before it
        data.update(init=str(previous) if pseudo is not None and previous is not None else None)
    if pseudo is None:
        data.update(stage2=False, pseudo=None)
    else:
        # a segmentation round: the previous model's pseudo-labels (+ the user's pixel labels, if any)
        data.update(stage2=True, pseudo=str(pseudo), data="")
    return TrainConfig.from_dict(data)


def _read_log(out: Path) -> dict:
    path = out / RECIPE_LOG
    if not path.is_file():
        return {"finished": {}, "pseudo": {}}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path} cannot be read ({err}); delete it to start the recipe again.") from None


def _write_log(out: Path, log: dict) -> None:
    with atomic_path(out / RECIPE_LOG) as tmp:
        Path(tmp).write_text(json.dumps(log, indent=1), encoding="utf-8")


def _wait_for_pseudo_labels(out: Path, name: str, cancel: CancelToken | None, timeout: float = 24 * 3600.0
                            ) -> None:
    """Ranks other than 0 (torchrun) wait until rank 0 records the round's pseudo-labels as finished."""
    t0 = time.monotonic()
    while not _read_log(out).get("pseudo", {}).get(name):
        if cancel is not None:
            cancel.raise_if_cancelled()
        if time.monotonic() - t0 > timeout:
            raise DatasetError(f"The pseudo-labels of {name} did not appear in {out} (rank 0 failed?).")
        time.sleep(1.0)


def _check_stain_prior_applies(config: TrainConfig) -> None:
    """Before an hour of training: the stain prior needs the tumor/stroma pair among the classes."""
    from .data.patches import discover_patches
    from .stain_prior import DEFAULT_PAIR, pair_indices

    classes = discover_patches(config.data, config.classes).classes
    try:
        pair_indices(list(classes.names))
    except ValueError:
        raise DatasetError(f"pseudo_refine 'stain' separates {DEFAULT_PAIR[0]} from {DEFAULT_PAIR[1]}, but the classes "
                           f"of {config.data} are {', '.join(classes.names)}: set pseudo_refine = \"none\" (or "
                           "--pseudo-refine none).") from None


def train_recipe_steps(config: TrainConfig, cancel: CancelToken | None = None
                       ) -> Generator[Progress, None, Path]:
    """Run the whole recipe (see the module docstring); yields every stage's Progress, with
    ``info["recipe"] = {"index", "stages", "name", "title"}``, and returns ``OUT/final.pt``."""
    from .pseudo_labels import make_pseudo_labels
    from .train import train_steps

    if config.stage2:
        raise DatasetError("The recipe starts from image-level labels; train one segmentation round with "
                           "--stage 2 --pseudo DIR instead.")
    if not config.data:
        raise DatasetError("No training data given (DATA_DIR).")
    out = Path(config.out)
    if not config.out:
        raise DatasetError("No run folder given (--out RUN_DIR).")
    names = stage_names(config.rounds)
    log = _read_log(out) if config.resume else {"finished": {}, "pseudo": {}}
    if config.resume and (out / LAST).is_file() and not (out / RECIPE_LOG).is_file():
        raise DatasetError(f"{out} holds one training stage, not a recipe: continue it with `wsss-cram train "
                           "--stage 1 --resume` (or --stage 2), or start the recipe in another folder.")
    held = [name for name in (FINAL, JOINT, LAST, RECIPE_LOG) if (out / name).exists()] if out.is_dir() else []
    if not config.resume and held:
        raise DatasetError(f"{out} already holds a run ({held[0]}); pass --resume to continue it, or choose "
                           "another --out.")
    from .io.guard import check_output_folder, ensure_writable_folder

    # the one output guard, before anything is written: never inside the training data
    check_output_folder(out, [config.data, config.val, config.pixel_labels], "run folder (--out)")
    if config.rounds and config.pseudo_refine == "stain":
        _check_stain_prior_applies(config)
    ensure_writable_folder(out, "run folder (--out)")
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank and not config.resume:  # `train --resume --out OUT` alone continues with these settings
        (out / CONFIG).write_text(dumps_toml(config.to_dict()), encoding="utf-8")
    budgets = stage_minutes(config)
    t_start = time.monotonic() - float(log.get("spent_seconds", 0.0))
    previous: Path | None = None
    for i, name in enumerate(names):
        recipe = {"index": i, "stages": len(names), "name": name, "title": describe_stage(name)}
        done = log["finished"].get(name)
        if done and Path(done).is_file():
            previous = Path(done)
            continue
        pseudo = None
        if previous is not None:
            pseudo = out / f"{name}-pseudo"
            # finished pseudo-labels are recorded in recipe.json (the folder exists from the start of the writing)
            if not log.setdefault("pseudo", {}).get(name):
                if main_rank:
                    events = make_pseudo_labels(previous, config.data, pseudo, device=config.device, cancel=cancel,
                                                refine=config.pseudo_refine, overwrite=pseudo.exists())
                    for event in events:
                        yield Progress("pseudo-labels", event.done, event.total, {**event.info, "recipe": recipe})
                    log["pseudo"][name] = str(pseudo)
                    _write_log(out, log)
                else:
                    _wait_for_pseudo_labels(out, name, cancel)
        minutes = budgets[i]
        if minutes is not None and i == len(names) - 1:
            # the last stage gets what is left of the whole budget (pseudo-labelling included)
            minutes = max(0.05 * minutes, config.minutes - (time.monotonic() - t_start) / 60.0)
        # a stage the run was stopped in continues from its resume state
        stage_config = _stage_config(config, name, minutes, pseudo, (out / name / "resume.pt").is_file(), previous)
        previous = yield from _run_stage(stage_config, cancel, recipe, train_steps)
        log["finished"][name] = str(previous)
        log["spent_seconds"] = time.monotonic() - t_start
        if main_rank:
            _write_log(out, log)
    final = out / FINAL
    if main_rank:
        with atomic_path(final) as tmp:
            shutil.copyfile(previous, tmp)
    return final


def _run_stage(config: TrainConfig, cancel: CancelToken | None, recipe: dict, train_steps
               ) -> Generator[Progress, None, Path]:
    events = train_steps(config, cancel)
    while True:
        try:
            event = next(events)
        except StopIteration as stop:
            return stop.value
        yield Progress(event.phase, event.done, event.total, {**event.info, "recipe": recipe})
