"""The trainer: patch folders in, checkpoints out. Shared by the CLI, ``training/`` recipes and the napari dock.

API (both Qt-free):

- :func:`train_steps` ``(config, cancel=None, trainer_class=Trainer)`` is a **generator**: it yields
  :class:`Progress` events (``phase="data"`` once with the dataset summary, ``"train"`` every step with
  ``info={"epoch", "losses", "lr", "eta"}``, ``"val"`` after each validation with ``info={"mIoU", "per_class"}``)
  and *returns* the path of the best (or last) checkpoint. napari's ``thread_worker`` drives it directly.
- :func:`train` ``(config, callback=None, cancel=None, trainer_class=Trainer)`` is the blocking form: it drives
  the generator, passes every event to ``callback``, and returns the same path.
- :class:`Trainer` is one run as hook methods (``build_data``, ``build_model``, ``build_optimizer``,
  ``training_step``, ``pseudo_labels``, ``validate``, ``save_checkpoint``; between steps ``on_step_end`` with
  ``log_step``, ``checkpoint_due`` and ``validation_due``...) that :meth:`Trainer.run` drives, as in nnU-Net: an
  ablation subclasses it, overrides one hook and passes ``trainer_class=``. Stage 1 (the joint model on
  image-level labels) is :class:`Trainer`; stage 2 (segmentation on saved pixel labels) is its subclass
  :class:`~.train_stage2.Stage2Trainer`, chosen from ``config.stage2``.

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

The run's surroundings (process group, sampler, budget, checkpoint writes) are in :mod:`.train_runtime`; the
run folder's files and ``metrics.csv`` in :mod:`.run_files`. Evaluation (``evaluate_model``, ``predict_labels``) lives in :mod:`.evaluate`; writing a joint model's
pseudo-labels for stage 2 (``make_pseudo_labels``) in :mod:`.pseudo_labels`.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .classes import IGNORE_INDEX, ClassSpec
from .data.augment import AugmentConfig
from .data.batch import Batch, collate_batch
from .data.mosaic import CellBank, MosaicMix, cells_from_single_label_patches
from .data.patches import PatchDataset, discover_patches
from .data.pixel import PixelIndex, discover_pixel_dataset
from .data.synthesis import SynthesisMix
from .device import resolve_device
from .errors import CheckpointError, DatasetError, TrainingError, WsssCramError
from .evaluate import evaluate_model
from .losses import joint_loss
from .progress import Cancelled, CancelToken, Progress, drive
from .pseudo_labels import PseudoLabeller, merge_strong_labels
from .run_files import BEST, CONFIG, LAST, METRICS, RESUME, MetricsLog
from .train_config import PREVIOUS, TrainConfig, dumps_toml, load_config
from .train_runtime import (
    DistInfo,
    ResumableSampler,
    TrainingBudget,
    atomic_torch_save,
    init_distributed,
    is_oom,
    oom_error,
    ranks_param_difference,
    rng_state,
    save_model_checkpoint,
    seed_everything,
    set_rng_state,
    steps_per_epoch,
    without_worker_traceback,
)

log = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainingBudget", "TrainConfig", "load_config", "train", "train_steps", "resolve_device"]


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


def starts_from_a_model(config: TrainConfig) -> bool:
    """Whether a run begins with another model's network (``init``). A resumed run has its own weights; the
    recipe turns ``init = "previous"`` into the path of the stage before, so in a stage run alone (``--stage``,
    the Train dock's retraining) "previous" names nothing and the run starts from ``weights``."""
    return bool(config.init) and config.init != PREVIOUS and not config.resume


def load_matching_weights(model, path: str | os.PathLike, classes) -> str:
    """Copy into ``model`` every tensor of the checkpoint at ``path`` with the same name and shape (the backbone
    and the segmentation head of a stage-1 or stage-2 model; a stage-1 model's pseudo-label branch is left out of
    a stage-2 one). Raises CheckpointError when the classes differ or little matches; returns what was loaded."""
    from .checkpoint import read_checkpoint_payload, resolve_checkpoint_path

    source = resolve_checkpoint_path(path)
    payload = read_checkpoint_payload(source)
    names = tuple(n.lower() for n in payload.get("classes", {}).get("names", ()))
    if names != tuple(n.lower() for n in classes.names):
        raise CheckpointError(f"--init {source} was trained for classes {', '.join(names) or '(none stated)'}, not "
                              f"{', '.join(classes.names)}: start from a model of the same classes, or leave --init "
                              "out.")
    own = model.state_dict()
    usable = {k: v for k, v in payload["state_dict"].items() if k in own and own[k].shape == v.shape}
    backbone = [k for k in own if k.startswith("backbone.")]
    if sum(k in usable for k in backbone) < len(backbone):
        raise CheckpointError(f"--init {source} has another backbone than this run ({len(usable)} of {len(own)} "
                              "tensors match): start from a model with the same [model] backbone and output stride.")
    model.load_state_dict(usable, strict=False)
    log.info("Started from %s: %d of %d tensors", source, len(usable), len(own))
    return f"{source} ({len(usable)} of {len(own)} tensors)"


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
    - :meth:`fit`, every step: :meth:`training_step` ``(batch) -> (loss, terms)``, which asks
      :meth:`pseudo_labels` ``(batch, outputs)`` for the seg head's labels (None = none this step), then
      :meth:`optimizer_step` ``(loss)``; then :meth:`on_step_end`: :meth:`log_step` (``metrics.csv`` and the
      ``"train"`` event), :meth:`save_last` when :meth:`checkpoint_due`, :meth:`validate` ``(epoch)`` (a
      generator of Progress) when :meth:`validation_due`; :meth:`save_checkpoint` writes ``last.pt`` /
      ``best.pt``;
    - :meth:`finish` (DDP sync check, CRF-wait log), :meth:`close` (always).

    The state hooks share lives on the instance: ``config``, ``stage``, ``dist``, ``device``, ``augment``,
    ``dataset``, ``loader``, ``val_index``, ``model`` (``net``: its DDP wrapper, or the model), ``labeller``,
    ``optimizer``, ``scheduler``, ``scaler``, ``budget``, ``step``, ``epoch``, ``best_miou``.
    """

    #: the training stage this class runs (1: the joint model on image-level labels; 2: Stage2Trainer)
    stage = 1

    def __init__(self, config: TrainConfig, cancel: CancelToken | None = None) -> None:
        if config.stage2 != (self.stage == 2):
            raise TrainingError(f"{type(self).__name__} trains stage {self.stage}, but the config asks for stage "
                                f"{2 if config.stage2 else 1}; subclass "
                                f"{'Stage2Trainer' if config.stage2 else 'Trainer'} for that stage.")
        self.config = config
        self.cancel = cancel
        self.run_dir = Path(config.out)
        self.dist = DistInfo()
        self.device = torch.device("cpu")
        # build_data
        self.augment: AugmentConfig | None = None
        self.dataset: Any = None
        self.classes: ClassSpec | None = None
        self.val_index: PixelIndex | None = None
        self.summary, self.steps_per_epoch, self.total_steps = "", 1, 1
        self.sampler: ResumableSampler | None = None
        self.loader_generator: torch.Generator | None = None
        self.loader: torch.utils.data.DataLoader | None = None
        # build_model / build_optimizer
        self.model_config: Any = None
        self.model: Any = None
        self.net: Any = None  # the model, or its DDP wrapper
        self.labeller: PseudoLabeller | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.budget: TrainingBudget | None = None
        self.use_amp = False
        # the CRF runs at this size (pseudo_label_scale of the crop)
        self.pseudo_size = max(16, round(config.crop * config.pseudo_label_scale))
        # progress
        self.metrics: MetricsLog | None = None
        self.step, self.epoch, self.best_miou = 0, 0, -1.0
        # where the step just taken stands (set before on_step_end): the budget is spent / an epoch ends
        self.finished = self.end_of_epoch = False
        self.start_step, self.t_start, self.crf_wait = 0, 0.0, 0.0
        self.pseudo_stats: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------- building

    def setup(self) -> None:
        """Torch threads, the process group (torchrun), the device; check the run folder."""
        config = self.config
        if not config.out:
            raise DatasetError("No run folder given (--out RUN_DIR).")
        if config.threads:
            torch.set_num_threads(int(config.threads))
        self.dist = init_distributed(config.device)
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
        """Augmentation, the training dataset (:meth:`build_dataset`, mosaics from :meth:`build_mosaic_bank`),
        the validation set, the sampler and the DataLoader; steps per epoch and the total steps."""
        config, dist = self.config, self.dist
        self.augment = config.augment_config()
        self.build_dataset()
        if config.synthesis_share > 0:
            bank = self.build_mosaic_bank(config.synthesis_region)
            if config.synthesis_classes:
                bank.keep_classes([n.strip() for n in config.synthesis_classes.split(",") if n.strip()])
            if bank:
                self.dataset = SynthesisMix(self.dataset, bank, config.synthesis_share, self.augment, self.stage,
                                            config.seed)
                self.summary += f"; boundary synthesis: {config.synthesis_share:.0%} of items, regions " + \
                    ", ".join(f"{name} {n}" for name, n in bank.counts.items())
            else:
                self.summary += "; boundary synthesis: no region of known class, none made"
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

    def build_dataset(self) -> None:
        """The training dataset (``dataset``), its ``classes`` and a one-line ``summary``: the image-level
        labelled patches of ``config.data``."""
        config = self.config
        if not config.data:
            raise DatasetError("No training data given (DATA_DIR).")
        index = discover_patches(config.data, config.classes)
        self.classes = index.classes
        self.dataset = PatchDataset(index, self.augment, config.seed)
        self.summary = index.summary()

    def build_mosaic_bank(self, cell: int | None = None) -> CellBank:
        """The cells that mosaics (``cell`` = ``mosaic_cell``) and synthesised regions are made of: the
        single-label patches'."""
        index = self.dataset.index
        return cells_from_single_label_patches(index.paths, index.labels, self.classes,
                                               cell or self.config.mosaic_cell)

    def build_pseudo_labeller(self) -> PseudoLabeller | None:
        """With joint training: the pool that makes each step's reliable pseudo-labels (else None)."""
        if not self.model_config.use_joint:
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
        seed_everything(config.seed)
        weights = config.weights
        if weights in (None, "none", "random"):
            weights = "random"
        self.model = CRAMNet(self.classes, self.model_config, weights=weights)
        if starts_from_a_model(config):
            load_matching_weights(self.model, config.init, self.classes)
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
        set_rng_state(state["rng"], self.device)

    def wrap_model(self) -> None:
        """Under torchrun: ``net`` = the model in DDP."""
        if self.dist.world <= 1:
            return
        from torch.nn.parallel import DistributedDataParallel

        device = self.device
        self.net = DistributedDataParallel(
            self.model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=self.unused_parameters())

    def unused_parameters(self) -> bool:
        """Whether some parameters get no gradient in a step (DDP must then look for them): the seg head with
        joint training off (ablation rows) or during the warm-up."""
        return not self.model.config.use_joint or self.config.joint_warmup_steps > 0

    def open_run_folder(self) -> None:
        """``metrics.csv`` (a resumed run keeps its rows up to its step) and ``config.toml`` (new runs)."""
        config = self.config
        if self.dist.main:
            self.metrics = MetricsLog(self.run_dir / METRICS, self.model.classes,
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
            out = self.net(x, batch.labels.to(device))
        out = {k: v.float() for k, v in out.items()}
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
        """The seg head's labels (B, H, W) int64 for this step (255 = ignore), or None for none (no joint
        training, or the warm-up): the reliable CRF pseudo-labels of this step's maps, with the patches' strong
        pixel masks where they have one."""
        if self.labeller is None or self.step < self.config.joint_warmup_steps:
            return None
        pseudo = self.labeller.label_resized(outputs["cam"], batch.images, batch.labels, self.pseudo_size)
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
        save_model_checkpoint(path, self.model, self.config, extra)

    def train_state(self) -> dict:
        """Everything ``--resume`` needs (``resume.pt``)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "best_miou": self.best_miou, "rng": rng_state(self.device), "world": self.dist.world,
                "spent_seconds": self.budget.spent_seconds()}

    def save_last(self) -> None:
        """``resume.pt`` and ``last.pt`` (rank 0)."""
        if self.dist.main:
            atomic_torch_save(self.train_state(), self.run_dir / RESUME)
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
        if starts_from_a_model(self.config):
            return f"the network of {self.config.init}"
        backbone = _model_config(self.config, self.stage).backbone
        return f"{backbone}: " + describe_weights(backbone, self.config.weights)

    def fit(self) -> Generator[Progress, None, None]:
        """Steps until the budget is spent: :meth:`train_one_step`, then :meth:`on_step_end` (log, ``last``
        checkpoint and validation when due)."""
        config, budget, per_epoch = self.config, self.budget, self.steps_per_epoch
        self.t_start, self.start_step = time.perf_counter(), self.step
        self.epoch = self.step // per_epoch
        if self.config.resume and budget.done(self.step) and self.dist.main:
            log.warning("%s: the run already finished (step %d of %d); nothing left to train. Raise --steps, "
                        "--epochs or --minutes to continue it.", self.run_dir, self.step, budget.total_steps)
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
                    loss, terms = self.train_one_step(batch)
                    self.step += 1
                    self.finished = budget.done(self.step)
                    self.end_of_epoch = self.step % per_epoch == 0
                    yield from self.on_step_end(loss, terms, time.perf_counter() - t_step)
                    if self.finished or self.end_of_epoch:
                        break
                self.epoch += 1
        except (KeyboardInterrupt, Cancelled):
            self.save_last()
            if self.dist.main:
                log.warning("Stopped at step %d; a usable checkpoint is in %s (continue with --resume).", self.step,
                            self.run_dir / LAST)
            raise
        except torch.cuda.OutOfMemoryError as err:
            raise oom_error(config, err) from None
        except WsssCramError as err:
            raise without_worker_traceback(err) from None

    def train_one_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """:meth:`training_step` and :meth:`optimizer_step`; a loss that is not finite stops the run (the last
        checkpoint is kept), running out of memory says what to lower."""
        try:
            loss, terms = self.training_step(batch)
            if not torch.isfinite(loss):
                last = self.run_dir / LAST
                kept = f"{last} holds the last good step" if last.exists() else "no checkpoint was written yet"
                raise TrainingError(f"The loss became {loss.item()} at step {self.step + 1}: training diverged "
                                    f"({kept}). Lower the learning rate (--lr, now {self.config.lr:g}) and train "
                                    "again.")
            self.optimizer_step(loss)
        except RuntimeError as err:
            if is_oom(err):
                raise oom_error(self.config, err) from None
            raise
        return loss, terms

    # ------------------------------------------------------------------------------------------- between steps

    def on_step_end(self, loss: torch.Tensor, terms: dict[str, float], seconds: float
                    ) -> Generator[Progress, None, None]:
        """After each optimiser step (``step`` counts it; ``finished`` and ``end_of_epoch`` say where it
        stands): :meth:`log_step` on rank 0, :meth:`save_last` when :meth:`checkpoint_due`, :meth:`validate`
        when :meth:`validation_due`. Override one of those to change what happens, this to change the order."""
        if self.dist.main:
            yield self.log_step(loss, terms, seconds)
        if self.checkpoint_due():
            self.save_last()
        if self.validation_due():
            yield from self.validate(self.epoch)

    def log_step(self, loss: torch.Tensor, terms: dict[str, float], seconds: float) -> Progress:
        """A ``metrics.csv`` row (every ``log_every`` steps, the first and the last) and the ``"train"`` event
        (losses, lr, time left)."""
        config, step, epoch, budget = self.config, self.step, self.epoch, self.budget
        estimated_total = budget.estimated_total(step)
        elapsed = time.perf_counter() - self.t_start
        eta = elapsed / max(1, step - self.start_step) * (estimated_total - step)
        losses = {"total": float(loss.detach())}
        losses.update({k: float(v) for k, v in terms.items() if k != "total"})
        lr = self.optimizer.param_groups[0]["lr"]
        if step % max(1, config.log_every) == 0 or self.finished or step == self.start_step + 1:
            self.metrics.write({"kind": "train", "step": step, "epoch": epoch, "lr": f"{lr:.6g}",
                                "seconds": f"{seconds:.3f}", **{f"loss_{k}": f"{v:.5f}" for k, v in losses.items()},
                                **{f"pseudo_{k}": f"{v:.4f}" for k, v in self.pseudo_stats.items()}})
        return Progress("train", step, estimated_total, {
            "epoch": epoch, "losses": losses, "lr": lr, "eta": eta, "step_seconds": seconds,
            "crf_wait_seconds": self.crf_wait, "pseudo": dict(self.pseudo_stats)})

    def checkpoint_due(self) -> bool:
        """``last.pt`` and ``resume.pt`` every ``checkpoint_every`` steps, at the end of each epoch and of the run."""
        return self.step % max(1, self.config.checkpoint_every) == 0 or self.end_of_epoch or self.finished

    def validation_due(self) -> bool:
        """With a validation set: every ``val_every_steps`` steps, else every ``val_every`` epochs; and at the end."""
        config = self.config
        if self.val_index is None:
            return False
        if config.val_every_steps:
            return self.step % config.val_every_steps == 0 or self.finished
        return (self.end_of_epoch and (self.epoch + 1) % max(1, config.val_every) == 0) or self.finished

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


def trainer_for(config: TrainConfig) -> type[Trainer]:
    """The Trainer class of a config's stage: :class:`Trainer` (stage 1) or ``Stage2Trainer``."""
    from .train_stage2 import Stage2Trainer  # a subclass of Trainer: imported here, not at the top

    return Stage2Trainer if config.stage2 else Trainer


def train_steps(config: TrainConfig, cancel: CancelToken | None = None,
                trainer_class: type[Trainer] | None = None) -> Generator[Progress, None, Path]:
    """Train per ``config``; a generator of Progress events returning the best (or last) checkpoint path.

    ``trainer_class``: a subclass of the stage's trainer (an ablation overriding hooks); default
    :func:`trainer_for`. See the module docstring for the events, cancellation, resume and distributed behaviour.
    """
    return (yield from (trainer_class or trainer_for(config))(config, cancel).run())


def train(config: TrainConfig, callback=None, cancel: CancelToken | None = None,
          trainer_class: type[Trainer] | None = None) -> Path:
    """Blocking form of :func:`train_steps`: events go to ``callback``; returns the best (or last) checkpoint."""
    return drive(train_steps(config, cancel, trainer_class), callback)
