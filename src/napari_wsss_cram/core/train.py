"""The trainer: patch folders in, checkpoints out. Shared by the CLI, ``training/`` recipes and the napari dock.

API (both Qt-free):

- :func:`train_steps` ``(config, cancel=None, trainer_class=Trainer)`` is a **generator**: it yields
  :class:`Progress` events (``stage="data"`` once with the dataset summary, ``"train"`` every step with
  ``info={"epoch", "losses", "lr", "eta"}``, ``"val"`` after each validation with ``info={"mIoU", "per_class"}``)
  and *returns* the path of the best (or last) checkpoint. napari's ``thread_worker`` drives it directly.
- :func:`train` ``(config, callback=None, cancel=None, trainer_class=Trainer)`` is the blocking form: it drives
  the generator, passes every event to ``callback``, and returns the same path.
- :class:`Trainer` is one run as hook methods (``build_data``, ``build_model``, ``build_optimizer``,
  ``training_step``, ``pseudo_labels``, ``validate``, ``save_checkpoint``, ...) that :meth:`Trainer.run` drives,
  as in nnU-Net: an ablation subclasses it, overrides one hook and passes ``trainer_class=``.

Cancellation (``CancelToken``) is checked every step; on cancel or Ctrl-C a usable ``last.pt`` is written, then
:class:`Cancelled` / ``KeyboardInterrupt`` propagates. ``config.resume`` continues from ``last.pt`` exactly in
schedule: model, optimiser, scheduler, AMP scaler, RNG states and the step are saved, augmentation is seeded per
``(seed, epoch, sample)`` and the shuffling per ``(seed, epoch)``, so a resumed run sees the same batches.

Pseudo-labels: the reliable CRF pseudo-labels of each step are made from that step's own activation maps (the
paper's joint training), so they cannot be precomputed by DataLoader workers. With the torch CRF backend (the
default on CUDA) they are made in the step, on the model's device, for the whole batch. With pydensecrf (the
default on the CPU, where it is faster per core) they run in a
pool of ``crf_workers`` processes (:class:`~.pseudo_labels.PseudoLabeller`), one image per task, in parallel
with each other and outside the GIL; the main process hands over numpy maps and images and gets uint8 labels.
``pseudo_label_scale`` < 1 runs the CRF on a smaller copy (its cost is linear in pixels).

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DDP, a ``DistributedSampler``
shards each epoch, and only rank 0 logs, validates and writes checkpoints. The batch self-attention mixes the
images of one process's batch only.

Evaluation (``evaluate_model``, ``predict_labels``) lives in :mod:`.evaluate`; writing a joint model's
pseudo-labels for stage 2 (``make_pseudo_labels``) in :mod:`.pseudo_labels`.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import pickle
import random
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .classes import IGNORE_INDEX, ClassSpec
from .data.augment import AugmentConfig
from .data.batch import Batch, collate_batch
from .data.mosaic import CellBank, MosaicMix, cells_from_pixel_labels, cells_from_single_label_patches
from .data.patches import PatchDataset, discover_patches
from .data.pixel import PixelDataset, PixelIndex, discover_pixel_dataset
from .device import resolve_device
from .errors import CheckpointError, DatasetError, OutOfMemoryError, TrainingError, WsssCramError
from .evaluate import evaluate_model
from .losses import joint_loss
from .progress import Cancelled, CancelToken, Progress, drive
from .pseudo_labels import PseudoLabeller
from .run_files import BEST, LAST, RESUME  # noqa: F401 (named without torch, for the Train dock)
from .train_config import TrainConfig, dumps_toml, load_config

log = logging.getLogger(__name__)

METRICS = "metrics.csv"
CONFIG = "config.toml"

__all__ = ["Trainer", "TrainingBudget", "TrainConfig", "load_config", "train", "train_steps", "resolve_device"]


# ----------------------------------------------------------------------------------------------- runtime

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_name: str) -> _Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return _Dist(rank, world, local_rank)


def _seed_everything(seed: int) -> None:
    # numpy's global RNG is not used: augmentation draws from Generators seeded per (seed, epoch, sample).
    random.seed(seed)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def ranks_param_difference(model: torch.nn.Module) -> float:
    """Under DDP: the largest difference between ranks of per-tensor parameter checksums (0.0 = in sync).

    Parameters only: BatchNorm running statistics are updated by each rank's own last forward (DDP broadcasts
    rank 0's buffers at the start of each forward), and rank 0's are the ones saved."""
    import torch.distributed as tdist

    with torch.no_grad():
        sums = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                            for p in model.parameters()]).flatten().cpu()
    gathered = [torch.zeros_like(sums) for _ in range(tdist.get_world_size())]
    tdist.all_gather(gathered, sums)
    stacked = torch.stack(gathered)
    return float((stacked.max(0).values - stacked.min(0).values).abs().max())


# ----------------------------------------------------------------------------------------------- sampling

class ResumableSampler(torch.utils.data.Sampler):
    """This rank's indices of a ``DistributedSampler`` epoch (seeded by seed + epoch), skipping the batches a
    resumed run has already seen. With one process it is a seeded shuffle."""

    def __init__(self, n: int, dist: _Dist, seed: int, batch_size: int) -> None:
        from torch.utils.data.distributed import DistributedSampler

        self.inner = DistributedSampler(range(n), num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                        seed=seed, drop_last=False)
        self.batch_size = batch_size
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip_batches = skip_batches

    def __iter__(self):
        return iter(list(self.inner)[self.skip_batches * self.batch_size:])

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip_batches * self.batch_size)


def steps_per_epoch(n_samples: int, batch_size: int, world: int = 1) -> int:
    """Optimiser steps per epoch (each rank gets ceil(n / world) samples; incomplete batches are dropped)."""
    per_rank = math.ceil(n_samples / world)
    return max(1, per_rank // batch_size)


class TrainingBudget:
    """Where a run stands in its schedule: optimiser steps and, with a wall-clock budget (``--minutes``),
    time. The larger share wins, so the poly learning rate reaches zero when either runs out."""

    def __init__(self, total_steps: int, minutes: float | None, spent_seconds: float = 0.0) -> None:
        self.total_steps = max(1, int(total_steps))
        self.seconds = None if not minutes else float(minutes) * 60.0
        self._origin = time.perf_counter() - float(spent_seconds)

    def spent_seconds(self) -> float:
        return time.perf_counter() - self._origin

    def resume_from(self, spent_seconds: float) -> None:
        self._origin = time.perf_counter() - float(spent_seconds)

    def fraction(self, step: int) -> float:
        share = step / self.total_steps
        if self.seconds is not None:
            share = max(share, self.spent_seconds() / self.seconds)
        return min(1.0, share)

    def done(self, step: int) -> bool:
        return self.fraction(step) >= 1.0

    def estimated_total(self, step: int) -> int:
        """Total steps as far as known now (the step count, or what the time budget will allow)."""
        if self.seconds is None or step <= 0:
            return self.total_steps
        return int(min(self.total_steps, max(step, round(step / max(1e-9, self.fraction(step))))))


# ----------------------------------------------------------------------------------------------- pseudo-labels

def batch_pseudo_labels(labeller: PseudoLabeller, cam: torch.Tensor, images_u8: torch.Tensor,
                        labels: torch.Tensor, size: int) -> torch.Tensor:
    """Reliable pseudo-labels (B, H, W) int64 on the device of ``cam`` for a batch: maps and images resized to
    ``size`` for the CRF, labels brought back to the input size (nearest). With the torch CRF backend all of it
    runs on that device, in the step."""
    b, h, w, _ = images_u8.shape
    with torch.no_grad():
        maps = F.interpolate(cam.detach().float(), size=(size, size), mode="bilinear", align_corners=False)
        maps = maps.clamp_min(0)
        imgs = images_u8.to(cam.device, non_blocking=True)
        if size != h or size != w:
            imgs = F.interpolate(imgs.permute(0, 3, 1, 2).float(), size=(size, size), mode="area")
            imgs = imgs.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        out = labeller.label(maps, imgs.contiguous(), labels.to(cam.device)).long()
        if size != h or size != w:
            out = F.interpolate(out[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    return out


def merge_strong_labels(pseudo: torch.Tensor, strong: torch.Tensor) -> torch.Tensor:
    """Pixel labels (e.g. from corrected masks) win over the reliable pseudo-labels where they are set.

    ``strong`` (B, H, W) is IGNORE_INDEX where a patch has no pixel mask: those pixels keep the pseudo-label.
    This is how corrected masks are mixed in as strong labels during joint training (WSSS-CRAM3).
    """
    strong = strong.to(pseudo.device, torch.int64)
    return torch.where(strong != IGNORE_INDEX, strong, pseudo)


# ----------------------------------------------------------------------------------------------- run folder

class _MetricsLog:
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


def _save(path: Path, model, config: TrainConfig, extra: dict) -> None:
    from .checkpoint import save_checkpoint

    try:
        save_checkpoint(path, model, extra=extra, train_config=config.to_dict())
    except (OSError, RuntimeError) as err:
        raise _write_error(path, err) from None


def _atomic_torch_save(obj: dict, path: Path) -> None:
    from .io.atomic import atomic_path

    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError from its zip writer
        raise _write_error(path, err) from None


def _write_error(path: Path, err: BaseException) -> TrainingError:
    """A checkpoint that could not be written, said plainly (the previous one is untouched)."""
    import errno as errno_codes
    import shutil

    text = str(err).lower()
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if getattr(err, "errno", None) == errno_codes.ENOSPC or "no space" in text or (free is not None and free < 1 << 20):
        reason = "the disk is full"
    elif getattr(err, "errno", None) in (errno_codes.EACCES, errno_codes.EPERM, errno_codes.EROFS):
        reason = "permission denied"
    else:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return TrainingError(f"Cannot write the checkpoint {path}: {reason}. The previous checkpoint is untouched; "
                         "free space or choose another --out, then continue with --resume.")


# ----------------------------------------------------------------------------------------------- helpers

def _oom_error(config: TrainConfig, err: BaseException) -> OutOfMemoryError:
    return OutOfMemoryError(
        f"Out of memory while training (batch {config.batch_size}, crop {config.crop}, backbone "
        f"{config.model.get('backbone', 'resnet50')}): lower --batch-size, then --crop, or use resnet18 "
        f"(e.g. --config cpu-small). ({str(err).splitlines()[0]})")


def _without_worker_traceback(err: WsssCramError) -> WsssCramError:
    """A DataLoader worker's error comes back with the worker's whole traceback in its message; the user needs
    only the message itself (which names the file)."""
    text = str(err)
    if "DataLoader worker process" not in text or "Original Traceback" not in text:
        return err
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return type(err)(last[len(prefix):] if last.startswith(prefix) else last)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _model_config(config: TrainConfig, stage: int):
    """The ModelConfig of a run: the preset's ``[model]`` table, the stage, the mean training rescale."""
    from .model.config import ModelConfig

    overrides = dict(config.model)
    overrides["stage"] = stage
    overrides.setdefault("train_scale", config.mean_scale)
    try:
        return ModelConfig.from_dict(overrides)
    except (TypeError, ValueError) as err:
        raise DatasetError(f"Invalid [model] settings {overrides}: {err}") from None


def _load_stage2_data(config: TrainConfig, classes_opt) -> tuple[PixelIndex, list[float]]:
    if not config.pseudo:
        raise DatasetError("Stage 2 needs --pseudo DIR (written by `wsss-cram pseudo-labels`).")
    pseudo = discover_pixel_dataset(config.pseudo, classes_opt)
    samples, weights = list(pseudo.samples), [1.0] * len(pseudo)
    if config.pixel_labels:
        pixel = discover_pixel_dataset(config.pixel_labels, pseudo.classes)
        samples += pixel.samples
        weights += [float(config.pixel_weight)] * len(pixel)
    return PixelIndex(samples, pseudo.classes, pseudo.root), weights


# ----------------------------------------------------------------------------------------------- trainer

class Trainer:
    """One training run as hooks that :meth:`run` drives (as nnU-Net's trainer): an ablation subclasses it,
    overrides one hook, and passes the class as ``train(config, trainer_class=...)``.

    Hooks, in the order :meth:`run` calls them:

    - :meth:`setup`: torch threads, the process group, the device, the run-folder checks;
    - :meth:`build_data`: augmentation, dataset, validation set, sampler and DataLoader (batches are
      :class:`~.data.batch.Batch` records), steps per epoch and the total;
    - :meth:`build_model`: the ModelConfig, the pseudo-labeller (:meth:`build_pseudo_labeller`; its processes
      fork before torch starts threads), then the seeded model on the device;
    - :meth:`build_optimizer`: optimiser over the parameter groups, the :class:`TrainingBudget`, the poly LR
      scheduler (driven by ``budget.fraction``) and the AMP scaler;
    - :meth:`load_resume_state` (``resume``), :meth:`wrap_model` (DDP), :meth:`open_run_folder`;
    - :meth:`fit`, every step: :meth:`training_step` ``(batch) -> (loss, terms)``, which in stage 1 asks
      :meth:`pseudo_labels` ``(batch, outputs)`` for the seg head's labels (None = none this step), then
      :meth:`optimizer_step` ``(loss)``; :meth:`save_last` and :meth:`validate` ``(epoch)`` (a generator of
      Progress) when due; :meth:`save_checkpoint` writes ``last.pt`` / ``best.pt``;
    - :meth:`finish` (DDP sync check, CRF-wait log), :meth:`close` (always).

    The state hooks share lives on the instance: ``config``, ``stage``, ``dist``, ``device``, ``augment``,
    ``dataset``, ``loader``, ``val_index``, ``model`` (``net``: its DDP wrapper, or the model), ``labeller``,
    ``optimizer``, ``scheduler``, ``scaler``, ``budget``, ``step``, ``epoch``, ``best_miou``.
    """

    def __init__(self, config: TrainConfig, cancel: CancelToken | None = None) -> None:
        self.config = config
        self.cancel = cancel
        self.stage = 2 if config.stage2 else 1
        self.run_dir = Path(config.out)
        self.dist = _Dist()
        self.device = torch.device("cpu")
        # build_data
        self.augment: AugmentConfig | None = None
        self.dataset: Any = None
        self.classes: ClassSpec | None = None
        self.val_index: PixelIndex | None = None
        self.summary = ""
        self.steps_per_epoch = 1
        self.total_steps = 1
        self.sampler: ResumableSampler | None = None
        self.loader_generator: torch.Generator | None = None
        self.loader: torch.utils.data.DataLoader | None = None
        # build_model / build_optimizer
        self.model_config: Any = None
        self.model: Any = None
        self.net: Any = None
        self.labeller: PseudoLabeller | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.budget: TrainingBudget | None = None
        self.use_amp = False
        # the CRF runs at this size (pseudo_label_scale of the crop)
        self.pseudo_size = max(16, round(config.crop * config.pseudo_label_scale))
        # progress
        self.metrics: _MetricsLog | None = None
        self.step, self.epoch, self.best_miou = 0, 0, -1.0
        self.start_step = 0
        self.t_start = 0.0
        self.crf_wait = 0.0
        self.pseudo_stats: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------- building

    def setup(self) -> None:
        """Torch threads, the process group (torchrun), the device; check the run folder."""
        config = self.config
        if not config.out:
            raise DatasetError("No run folder given (--out RUN_DIR).")
        if config.threads:
            torch.set_num_threads(int(config.threads))
        self.dist = _init_distributed(config.device)
        self.device = resolve_device(config.device) if self.dist.world == 1 or not torch.cuda.is_available() \
            else torch.device("cuda", self.dist.local_rank)
        run_dir = self.run_dir
        if self.dist.main:
            from .io.guard import check_output_folder, ensure_writable_folder

            check_output_folder(run_dir, [config.data, config.val, config.pseudo, config.pixel_labels],
                                "run folder (--out)")  # the one output guard: never inside the training data
            ensure_writable_folder(run_dir, "run folder (--out)")
            if not config.resume and (run_dir / LAST).exists():
                raise DatasetError(f"{run_dir} already holds a run ({LAST}); pass --resume to continue it, "
                                   "or choose another --out.")
        if config.resume and not (run_dir / RESUME).exists():
            raise CheckpointError(f"--resume: {run_dir / RESUME} does not exist; start without --resume.")

    def build_data(self) -> None:
        """Augmentation, the training dataset (patches, or stage 2's pixel-labelled sets), the validation set,
        the sampler and the DataLoader; steps per epoch and the total steps."""
        config, dist = self.config, self.dist
        self.augment = config.augment_config()
        if self.stage == 1:
            if not config.data:
                raise DatasetError("No training data given (DATA_DIR).")
            index = discover_patches(config.data, config.classes)
            self.classes = index.classes
            self.dataset = PatchDataset(index, self.augment, config.seed)
            self.summary = index.summary()
        else:
            pixel_index, weights = _load_stage2_data(config, config.classes)
            self.classes = pixel_index.classes
            self.dataset = PixelDataset(pixel_index.samples, self.classes, self.augment, config.seed, weights)
            self.summary = f"stage 2: {len(self.dataset)} pixel-labelled samples ({config.pseudo}" + \
                (f" + {config.pixel_labels} weight {config.pixel_weight}" if config.pixel_labels else "") + ")"
        if config.mosaic_share > 0:
            bank = self.build_mosaic_bank()
            if bank:
                self.dataset = MosaicMix(self.dataset, bank, config.mosaic_share, self.augment, self.stage, config.seed)
                self.summary += f"; mosaics: {config.mosaic_share:.0%} of items, cells " + \
                    ", ".join(f"{name} {n}" for name, n in bank.counts.items())
            else:
                self.summary += "; mosaics: no cell of known class (no single-label patch), none made"
        self.val_index = discover_pixel_dataset(config.val, self.classes) if config.val else None
        if len(self.dataset) < config.batch_size * dist.world:
            raise DatasetError(f"{config.data or config.pseudo}: {len(self.dataset)} samples are fewer than one "
                               f"batch ({config.batch_size} x {dist.world} processes); lower --batch-size.")
        self.steps_per_epoch = steps_per_epoch(len(self.dataset), config.batch_size, dist.world)
        if config.steps:
            self.total_steps = int(config.steps)
        elif config.minutes:
            self.total_steps = 10 ** 9  # the wall-clock budget ends the run
        else:
            self.total_steps = int(config.epochs) * self.steps_per_epoch
        self.sampler = ResumableSampler(len(self.dataset), dist, config.seed, config.batch_size)
        self.loader_generator = torch.Generator()
        workers = max(0, int(config.workers))
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=config.batch_size, sampler=self.sampler, num_workers=workers, drop_last=True,
            collate_fn=collate_batch, pin_memory=self.device.type == "cuda", generator=self.loader_generator,
            persistent_workers=False, multiprocessing_context=("fork" if workers and os.name == "posix" else None))

    def build_mosaic_bank(self) -> CellBank:
        """The cells that mosaics are made of: the single-label patches' (stage 1), or the pseudo-labelled
        regions of at least ``mosaic_purity`` one class (stage 2)."""
        config = self.config
        if self.stage == 1:
            index = self.dataset.index
            return cells_from_single_label_patches(index.paths, index.labels, self.classes, config.mosaic_cell)
        return cells_from_pixel_labels(self.dataset.samples, self.classes, config.mosaic_cell, config.mosaic_purity)

    def build_pseudo_labeller(self) -> PseudoLabeller | None:
        """Stage 1 with joint training: the pool that makes each step's reliable pseudo-labels (else None)."""
        if self.stage != 1 or not self.model_config.use_joint:
            return None
        return PseudoLabeller(self.config.crf_workers, self.model_config.__dict__, self.model_config.use_crf,
                              self.device)

    def build_model(self) -> None:
        """The ModelConfig (the preset's ``[model]`` table), the pseudo-labeller, then the seeded model."""
        from .model.cram import CRAMNet

        config = self.config
        self.model_config = _model_config(config, self.stage)
        # the labeller's processes fork before torch builds the model and starts its threads
        self.labeller = self.build_pseudo_labeller()
        _seed_everything(config.seed)
        weights = config.weights
        if weights in (None, "none", "random"):
            weights = "random"
        self.model = CRAMNet(self.classes, self.model_config, weights=weights)
        self.model.to(self.device)
        self.model.train()
        self.net = self.model

    def build_optimizer(self) -> None:
        """SGD/Adam over the model's parameter groups (new layers at ``head_lr_mult``), the training budget,
        the poly learning rate on the budget's fraction, and the AMP scaler."""
        config = self.config
        groups = self.model.parameter_groups()
        for g in groups:
            if g.get("name") != "backbone":
                g["lr_mult"] = config.head_lr_mult
            g["lr"] = config.lr * g["lr_mult"]
        if config.optimizer == "adam":
            self.optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay)
        self.budget = budget = TrainingBudget(self.total_steps, config.minutes)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: max(0.0, 1.0 - budget.fraction(s)) ** config.poly_power)
        self.use_amp = bool(config.amp) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    def load_resume_state(self) -> None:
        """Continue from ``resume.pt``: model, optimiser, scheduler, scaler, step, best mIoU, time, RNG."""
        resume_path = self.run_dir / RESUME
        try:
            state = torch.load(resume_path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
        except pickle.UnpicklingError:
            # torch's own message suggests turning weights_only off, i.e. running the file's code: never
            raise CheckpointError(f"--resume: refusing {resume_path}: it holds pickled Python objects, which could "
                                  "run code when loaded. Delete it and train again, or continue from a resume.pt "
                                  "written by this package.") from None
        except Exception as err:
            raise CheckpointError(f"--resume: cannot continue from {resume_path} ({str(err).splitlines()[0]}); "
                                  "was it written by this config (same classes and backbone)?") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best_miou = int(state["step"]), float(state["best_miou"])
        self.budget.resume_from(float(state.get("spent_seconds", 0.0)))
        _set_rng_state(state["rng"], self.device)

    def wrap_model(self) -> None:
        """Under torchrun: ``net`` = the model in DDP."""
        if self.dist.world <= 1:
            return
        from torch.nn.parallel import DistributedDataParallel

        device = self.device
        self.net = DistributedDataParallel(
            self.model, device_ids=[device.index] if device.type == "cuda" else None,
            # the seg head is unused with joint training off (ablation rows) or during the warm-up
            find_unused_parameters=self.stage == 1 and (not self.model.config.use_joint
                                                        or self.config.joint_warmup_steps > 0))

    def open_run_folder(self) -> None:
        """``metrics.csv`` (a resumed run keeps its rows up to its step) and ``config.toml`` (new runs)."""
        config = self.config
        if self.dist.main:
            self.metrics = _MetricsLog(self.run_dir / METRICS, self.model.classes,
                                       self.step if config.resume else None)
            if not config.resume:
                (self.run_dir / CONFIG).write_text(dumps_toml(config.to_dict()), encoding="utf-8")

    # ------------------------------------------------------------------------------------------- one step

    def training_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward and loss of one batch: ``(loss, terms)`` (terms are floats, for the log)."""
        device = self.device
        x = self.model.normalize(batch.images)
        # Mixed precision for the network only; the losses run in float32 (BCE and the dense energy
        # are not autocast-safe, and fp16 sums over N^2 pixel pairs would lose precision).
        with torch.autocast(device.type, enabled=self.use_amp):
            out = self.net(x, batch.labels.to(device)) if self.stage == 1 else self.net(x)
        out = {k: v.float() for k, v in out.items()}
        if self.stage == 2:
            return joint_loss(out, None, batch.target.to(device), x, self.model.config, batch.weight.to(device))
        t_crf = time.perf_counter()
        pseudo = self.pseudo_labels(batch, out)
        if pseudo is not None:
            pseudo = pseudo.to(device)
            self.crf_wait += time.perf_counter() - t_crf
            # label coverage: what the seg head is taught from (all 255 = nothing to learn)
            confident = pseudo != IGNORE_INDEX
            self.pseudo_stats = {"confident": float(confident.float().mean()),
                                 "foreground": float((pseudo < self.model.classes.background_index).float().mean())}
        return joint_loss(out, batch.labels.to(device), pseudo, x, self.model.config)

    def pseudo_labels(self, batch: Batch, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Stage 1: the seg head's labels (B, H, W) int64 for this step (255 = ignore), or None for none (no
        joint training, or the warm-up): the reliable CRF pseudo-labels of this step's maps, with the
        patches' strong pixel masks where they have one."""
        if self.labeller is None or self.step < self.config.joint_warmup_steps:
            return None
        pseudo = batch_pseudo_labels(self.labeller, outputs["cam"], batch.images, batch.labels, self.pseudo_size)
        return merge_strong_labels(pseudo, batch.strong_masks)

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward (AMP-scaled), optimiser step, scheduler step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    # ------------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, path: Path, extra: dict) -> None:
        """A model checkpoint (``last.pt`` / ``best.pt``) with this run's config and ``extra``."""
        _save(path, self.model, self.config, extra)

    def train_state(self) -> dict:
        """Everything ``--resume`` needs (``resume.pt``)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "best_miou": self.best_miou, "rng": _rng_state(self.device), "world": self.dist.world,
                "spent_seconds": self.budget.spent_seconds()}

    def save_last(self) -> None:
        """``resume.pt`` and ``last.pt`` (rank 0)."""
        if self.dist.main:
            _atomic_torch_save(self.train_state(), self.run_dir / RESUME)
            self.save_checkpoint(self.run_dir / LAST, {"step": self.step, "best_mIoU": self.best_miou})

    def validate(self, epoch: int) -> Generator[Progress, None, None]:
        """Score on the validation set (rank 0), write ``best.pt`` on a new best; yields the evaluation's
        Progress and one ``"val"`` event."""
        if self.dist.main:
            config, step = self.config, self.step
            scale = config.val_scale or config.mean_scale
            cm = yield from evaluate_model(self.model, self.val_index, scale, False, self.device, self.cancel)
            miou = cm.miou()
            names = self.model.classes.names
            per_class = {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, cm.iou(), strict=True)}
            self.metrics.write({"kind": "val", "step": step, "epoch": epoch, "mIoU": f"{miou:.5f}",
                                **{f"iou_{n}": ("" if v is None else f"{v:.5f}") for n, v in per_class.items()}})
            if not np.isnan(miou) and miou > self.best_miou:
                self.best_miou = miou
                self.save_checkpoint(self.run_dir / BEST, {"step": step, "val_mIoU": miou, "per_class": per_class})
            yield Progress("val", step, self.budget.estimated_total(step),
                           {"epoch": epoch, "mIoU": miou, "per_class": per_class, "best_mIoU": self.best_miou})
        if self.dist.world > 1:
            import torch.distributed as tdist

            tdist.barrier()

    # ------------------------------------------------------------------------------------------- the loop

    def run(self) -> Generator[Progress, None, Path]:
        """The whole run: build, (resume,) train; yields Progress and returns the best (or last) checkpoint."""
        try:
            self.setup()
            self.build_data()
            if self.dist.main:
                yield Progress("data", 0, self.total_steps, {
                    "summary": self.summary, "steps_per_epoch": self.steps_per_epoch, "device": str(self.device),
                    "minutes": self.config.minutes, "weights": self.describe_weights()})
            self.build_model()
            self.build_optimizer()
            if self.config.resume:
                self.load_resume_state()
            self.wrap_model()
            self.open_run_folder()
            yield from self.fit()
            return self.finish()
        finally:
            self.close()

    def describe_weights(self) -> str:
        """Which weights the run starts from, in words (said before a download, if any, starts)."""
        from .model.backbone import describe_weights

        if self.config.resume:
            return f"the run's resume state ({self.run_dir / RESUME})"
        backbone = _model_config(self.config, self.stage).backbone
        return f"{backbone}: " + describe_weights(backbone, self.config.weights)

    def fit(self) -> Generator[Progress, None, None]:
        """Steps until the budget is spent: training step, log, ``last`` checkpoint and validation when due."""
        config, dist, budget = self.config, self.dist, self.budget
        per_epoch = self.steps_per_epoch
        last_path = self.run_dir / LAST
        self.t_start = time.perf_counter()
        self.start_step = self.step
        self.epoch = self.step // per_epoch
        try:
            while not budget.done(self.step):
                skip = self.step - self.epoch * per_epoch
                self.sampler.set_epoch(self.epoch, skip)
                self.dataset.set_epoch(self.epoch)
                self.loader_generator.manual_seed(config.seed * 1000003 + self.epoch)
                for batch in self.loader:
                    if self.cancel is not None:
                        self.cancel.raise_if_cancelled()
                    t_step = time.perf_counter()
                    try:
                        loss, terms = self.training_step(batch)
                        if not torch.isfinite(loss):
                            kept = f"{last_path} holds the last good step" if last_path.exists() else \
                                "no checkpoint was written yet"
                            raise TrainingError(f"The loss became {loss.item()} at step {self.step + 1}: training "
                                                f"diverged ({kept}). Lower the learning rate (--lr, now "
                                                f"{config.lr:g}) and train again.")
                        self.optimizer_step(loss)
                    except RuntimeError as err:
                        if _is_oom(err):
                            raise _oom_error(config, err) from None
                        raise
                    self.step += 1
                    step, epoch = self.step, self.epoch
                    if dist.main:
                        elapsed = time.perf_counter() - self.t_start
                        finished = budget.done(step)
                        estimated_total = budget.estimated_total(step)
                        eta = elapsed / max(1, step - self.start_step) * (estimated_total - step)
                        losses = {"total": float(loss.detach())}
                        losses.update({k: float(v) for k, v in terms.items() if k != "total"})
                        lr = self.optimizer.param_groups[0]["lr"]
                        if step % max(1, config.log_every) == 0 or finished or step == self.start_step + 1:
                            self.metrics.write({"kind": "train", "step": step, "epoch": epoch, "lr": f"{lr:.6g}",
                                                "seconds": f"{time.perf_counter() - t_step:.3f}",
                                                **{f"loss_{k}": f"{v:.5f}" for k, v in losses.items()},
                                                **{f"pseudo_{k}": f"{v:.4f}" for k, v in self.pseudo_stats.items()}})
                        yield Progress("train", step, estimated_total, {
                            "epoch": epoch, "losses": losses, "lr": lr, "eta": eta,
                            "step_seconds": time.perf_counter() - t_step, "crf_wait_seconds": self.crf_wait,
                            "pseudo": dict(self.pseudo_stats)})
                    end_of_epoch = step % per_epoch == 0
                    finished = budget.done(step)
                    if step % max(1, config.checkpoint_every) == 0 or end_of_epoch or finished:
                        self.save_last()
                    if self.val_index is not None and (
                            (config.val_every_steps and step % config.val_every_steps == 0)
                            or (not config.val_every_steps and end_of_epoch
                                and (epoch + 1) % max(1, config.val_every) == 0)
                            or finished):
                        yield from self.validate(epoch)
                    if finished or end_of_epoch:
                        break
                self.epoch += 1
        except (KeyboardInterrupt, Cancelled):
            self.save_last()
            if dist.main:
                log.warning("Stopped at step %d; a usable checkpoint is in %s (continue with --resume).", self.step,
                            last_path)
            raise
        except torch.cuda.OutOfMemoryError as err:
            raise _oom_error(config, err) from None
        except WsssCramError as err:
            raise _without_worker_traceback(err) from None

    def finish(self) -> Path:
        """After the last step: the DDP replicas' sync check (recorded in ``last.pt``), the CRF-wait log;
        returns ``best.pt`` if validation wrote one, else ``last.pt``."""
        dist, step = self.dist, self.step
        last_path, best_path = self.run_dir / LAST, self.run_dir / BEST
        if dist.world > 1:
            # DDP keeps replicas identical; check it once, and record it (a divergence would be a bug).
            diff = ranks_param_difference(self.model)
            if dist.main:
                self.save_checkpoint(last_path, {"step": step, "best_mIoU": self.best_miou, "world_size": dist.world,
                                                 "ranks_param_max_difference": diff})
                if diff != 0.0:
                    log.warning("DDP replicas differ after training (max checksum difference %g).", diff)
        if dist.main and self.labeller is not None and step > self.start_step:
            log.info("Pseudo-labelling (CRF) wait: %.2f s over %d steps (%.0f%% of training time).", self.crf_wait,
                     step - self.start_step, 100.0 * self.crf_wait / max(1e-9, time.perf_counter() - self.t_start))
        return best_path if best_path.exists() else last_path

    def close(self) -> None:
        """Always, at the end: stop the labeller's processes, leave the process group."""
        if self.labeller is not None:
            self.labeller.close()
        if self.dist.world > 1:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


def train_steps(config: TrainConfig, cancel: CancelToken | None = None,
                trainer_class: type[Trainer] = Trainer) -> Generator[Progress, None, Path]:
    """Train per ``config``; a generator of Progress events returning the best (or last) checkpoint path.

    ``trainer_class``: a :class:`Trainer` subclass (an ablation overriding hooks). See the module docstring for
    the events, cancellation, resume and distributed behaviour.
    """
    return (yield from trainer_class(config, cancel).run())


def train(config: TrainConfig, callback=None, cancel: CancelToken | None = None,
          trainer_class: type[Trainer] = Trainer) -> Path:
    """Blocking form of :func:`train_steps`: events go to ``callback``; returns the best (or last) checkpoint."""
    return drive(train_steps(config, cancel, trainer_class), callback)
