"""The trainer: patch folders in, checkpoints out. Shared by the CLI, ``training/`` recipes and the napari dock.

API (both Qt-free):

- :func:`train_steps` ``(config, cancel=None)`` is a **generator**: it yields :class:`Progress` events
  (``stage="data"`` once with the dataset summary, ``"train"`` every step with
  ``info={"epoch", "losses", "lr", "eta"}``, ``"val"`` after each validation with ``info={"mIoU", "per_class"}``)
  and *returns* the path of the best (or last) checkpoint. napari's ``thread_worker`` drives it directly.
- :func:`train` ``(config, callback=None, cancel=None)`` is the blocking form: it drives the generator, passes
  every event to ``callback``, and returns the same path.

Cancellation (``CancelToken``) is checked every step; on cancel or Ctrl-C a usable ``last.pt`` is written, then
:class:`Cancelled` / ``KeyboardInterrupt`` propagates. ``config.resume`` continues from ``last.pt`` exactly in
schedule: model, optimiser, scheduler, AMP scaler, RNG states and the step are saved, augmentation is seeded per
``(seed, epoch, sample)`` and the shuffling per ``(seed, epoch)``, so a resumed run sees the same batches.

Pseudo-labels: the reliable CRF pseudo-labels of each step are made from that step's own activation maps (the
paper's joint training), so they cannot be precomputed by DataLoader workers. They run in a pool of
``crf_workers`` processes, one image per task, in parallel with each other and outside the GIL; the main process
hands over numpy maps and images and gets uint8 label maps back. ``pseudo_label_scale`` < 1 runs the CRF on a
smaller copy (its cost is linear in pixels).

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DDP, a ``DistributedSampler``
shards each epoch, and only rank 0 logs, validates and writes checkpoints. The batch self-attention mixes the
images of one process's batch only.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import time
from collections.abc import Generator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .classes import IGNORE_INDEX, ClassSpec
from .data.augment import AugmentConfig
from .data.patches import PatchDataset, PatchIndex, discover_patches
from .data.pixel import PixelDataset, PixelIndex, discover_pixel_dataset, load_pixel_sample
from .device import resolve_device
from .errors import CheckpointError, DatasetError, OutOfMemoryError
from .metrics import ConfusionMatrix
from .progress import Cancelled, CancelToken, Progress, drive
from .train_config import TrainConfig, dumps_toml, load_config

log = logging.getLogger(__name__)

LAST = "last.pt"
RESUME = "resume.pt"  # model + optimiser + scheduler + scaler + RNG + step, for --resume
BEST = "best.pt"
METRICS = "metrics.csv"
CONFIG = "config.toml"

__all__ = ["TrainConfig", "load_config", "train", "train_steps", "evaluate_model", "resolve_device",
           "PseudoLabeller", "make_pseudo_labels"]


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


# ----------------------------------------------------------------------------------------------- pseudo-labels

def _pseudo_label_job(maps: np.ndarray, image: np.ndarray, labels: np.ndarray, model_config: dict,
                      use_crf: bool) -> np.ndarray:
    """One image's reliable pseudo-label (runs in a pool process; numpy in, numpy out)."""
    from .crf import CRFParams
    from .pseudo_labels import reliable_pseudo_labels

    crf = CRFParams.from_dict(model_config.get("crf")) if use_crf else None
    return reliable_pseudo_labels(maps, image, labels, alpha=model_config["alpha"], beta=model_config["beta"],
                                  crf=crf, tissue_threshold=model_config["tissue_threshold"])


def _noop() -> None:
    return None


class PseudoLabeller:
    """Makes reliable pseudo-labels for a batch, in ``workers`` processes (0 = in this process).

    Processes are forked once, before torch starts its thread pools, and live for the whole run; each task
    is one image's maps (K+1, h, w) float32, the image (h, w, 3) uint8 and its label vector.
    """

    def __init__(self, workers: int, model_config: dict, use_crf: bool) -> None:
        self.model_config = {k: model_config[k] for k in ("alpha", "beta", "tissue_threshold", "crf")}
        if hasattr(self.model_config["crf"], "to_dict"):  # CRFParams -> plain dict for the worker processes
            self.model_config["crf"] = self.model_config["crf"].to_dict()
        self.use_crf = use_crf
        self.pool: ProcessPoolExecutor | None = None
        if workers > 0:
            import multiprocessing as mp

            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(method))
            for f in [self.pool.submit(_noop) for _ in range(workers)]:
                f.result()  # start the processes now, while this process is still single-threaded
        self.seconds = 0.0  # main-process time spent waiting for labels

    def submit(self, maps: np.ndarray, images: np.ndarray, labels: np.ndarray) -> list[Future] | np.ndarray:
        if self.pool is None:
            return np.stack([_pseudo_label_job(m, i, lab, self.model_config, self.use_crf)
                             for m, i, lab in zip(maps, images, labels, strict=True)])
        return [self.pool.submit(_pseudo_label_job, m, i, lab, self.model_config, self.use_crf)
                for m, i, lab in zip(maps, images, labels, strict=True)]

    def result(self, pending: list[Future] | np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = pending if isinstance(pending, np.ndarray) else np.stack([f.result() for f in pending])
        self.seconds += time.perf_counter() - t0
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def batch_pseudo_labels(labeller: PseudoLabeller, cam: torch.Tensor, images_u8: torch.Tensor,
                        labels: torch.Tensor, size: int) -> torch.Tensor:
    """Reliable pseudo-labels (B, H, W) int64 for a batch: maps and images resized to ``size`` for the CRF,
    labels brought back to the input size (nearest)."""
    b, h, w, _ = images_u8.shape
    with torch.no_grad():
        maps = F.interpolate(cam.detach().float(), size=(size, size), mode="bilinear", align_corners=False)
        maps = maps.clamp_min(0).cpu().numpy().astype(np.float32)
        imgs = images_u8.cpu()
        if size != h or size != w:
            imgs = F.interpolate(imgs.permute(0, 3, 1, 2).float(), size=(size, size), mode="area")
            imgs = imgs.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        imgs = np.ascontiguousarray(imgs.numpy())
    pending = labeller.submit(maps, imgs, labels.cpu().numpy().astype(np.uint8))
    out = torch.from_numpy(labeller.result(pending).astype(np.int64))
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


# ----------------------------------------------------------------------------------------------- evaluation

def predict_labels(model, rgb: np.ndarray, scale: float = 1.0, crf: bool = False,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """Label map (H, W) uint8 of one in-memory image, predicted by the inference engine at ``scale``
    (the training rescale), as ``wsss-cram predict`` would (tiling, tissue prior, optional CRF)."""
    from .inference import PredictSettings, predict_array

    settings = PredictSettings(scale=scale, crf=crf, device=str(device), with_probs=False, with_cam=False)
    prediction = drive(predict_array(model, None, rgb, settings))
    labels = np.asarray(prediction.labels, dtype=np.uint8)
    prediction.cleanup()
    return labels


def evaluate_model(model, dataset: PixelIndex, scale: float = 1.0, crf: bool = False,
                   device: torch.device | str = "cpu",
                   cancel: CancelToken | None = None) -> Generator[Progress, None, ConfusionMatrix]:
    """Score ``model`` on a pixel-labelled set with THE metric (one confusion matrix over all images,
    background pixels excluded). Yields ``Progress("evaluate", i, n)``; returns the ConfusionMatrix."""
    if dataset.classes.all_names != model.classes.all_names:
        raise DatasetError(f"{dataset.root}: classes {', '.join(dataset.classes.all_names)} differ from the "
                           f"checkpoint's {', '.join(model.classes.all_names)}; pass --classes.")
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(model.classes)
    try:
        for i, sample in enumerate(dataset.samples):
            if cancel is not None:
                cancel.raise_if_cancelled()
            rgb, mask = load_pixel_sample(sample, dataset.classes)
            cm.update(predict_labels(model, rgb, scale, crf, device), mask)
            yield Progress("evaluate", i + 1, len(dataset.samples), {"image": sample.name})
    finally:
        model.train(was_training)
    return cm


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

    save_checkpoint(path, model, extra=extra, train_config=config.to_dict())


def _atomic_torch_save(obj: dict, path: Path) -> None:
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------------------------- loop

def _oom_error(config: TrainConfig, err: BaseException) -> OutOfMemoryError:
    return OutOfMemoryError(
        f"Out of memory while training (batch {config.batch_size}, crop {config.crop}, backbone "
        f"{config.model.get('backbone', 'resnet50')}): lower --batch-size, then --crop, or use resnet18 "
        f"(e.g. --config training/cpu-small.toml). ({str(err).splitlines()[0]})")


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


def _build_model(config: TrainConfig, classes: ClassSpec, model_config):
    from .model.cram import CRAMNet

    weights = config.weights
    if weights in (None, "none", "random"):
        weights = "random"
    return CRAMNet(classes, model_config, weights=weights)


def _stage1_loss(model, out: dict, x: torch.Tensor, labels: torch.Tensor, pseudo: torch.Tensor | None):
    """L = L_cls + lambda (L_ce + w L_energy) via the model issue's ``joint_loss``; returns (total, terms)."""
    from .losses import joint_loss

    return joint_loss(out, labels, pseudo, x, model.config)


def _stage2_loss(model, out: dict, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor):
    """Stage 2: cross-entropy of the seg head on pseudo/pixel labels (255 ignored), each image weighted
    (pixel-labelled vs pseudo-labelled), plus the dense energy term as in :func:`losses.joint_loss`."""
    from .losses import dense_energy_loss
    from .model.cram import to_rgb255

    cfg = model.config
    ce = F.cross_entropy(out["seg"].float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    valid = (target != IGNORE_INDEX).float()
    per_image = (ce * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1.0)
    total = (per_image * weight).sum() / weight.sum().clamp_min(1e-6)
    terms = {"ce": float(total.detach())}
    if cfg.energy_weight > 0:
        energy = dense_energy_loss(out["seg"], to_rgb255(x.detach(), cfg), target, cfg.energy_sigma_xy,
                                   cfg.energy_sigma_rgb, cfg.energy_scale)
        terms["energy"] = float(energy.detach())
        total = total + cfg.energy_weight * energy
    return total, terms


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


def train_steps(config: TrainConfig, cancel: CancelToken | None = None) -> Generator[Progress, None, Path]:
    """Train per ``config``; a generator of Progress events returning the best (or last) checkpoint path.

    See the module docstring for the events, cancellation, resume and distributed behaviour.
    """
    if not config.out:
        raise DatasetError("No run folder given (--out RUN_DIR).")
    if config.threads:
        torch.set_num_threads(int(config.threads))
    dist = _init_distributed(config.device)
    device = resolve_device(config.device) if dist.world == 1 or not torch.cuda.is_available() \
        else torch.device("cuda", dist.local_rank)
    stage = 2 if config.stage2 else 1
    run_dir = Path(config.out)
    last_path = run_dir / LAST
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not config.resume and last_path.exists():
            raise DatasetError(f"{run_dir} already holds a run ({LAST}); pass --resume to continue it, "
                               "or choose another --out.")
    if config.resume and not (run_dir / RESUME).exists():
        raise CheckpointError(f"--resume: {run_dir / RESUME} does not exist; start without --resume.")

    # --- data
    aug = AugmentConfig(config.scale_min, config.scale_max, config.crop, config.flip, config.rot90, config.jitter)
    if stage == 1:
        if not config.data:
            raise DatasetError("No training data given (DATA_DIR).")
        index: PatchIndex = discover_patches(config.data, config.classes)
        classes = index.classes
        dataset: Any = PatchDataset(index, aug, config.seed)
        summary = index.summary()
    else:
        pixel_index, weights = _load_stage2_data(config, config.classes)
        classes = pixel_index.classes
        dataset = PixelDataset(pixel_index.samples, classes, aug, config.seed, weights)
        summary = f"stage 2: {len(dataset)} pixel-labelled samples ({config.pseudo}" + \
            (f" + {config.pixel_labels} weight {config.pixel_weight}" if config.pixel_labels else "") + ")"
    val_index = discover_pixel_dataset(config.val, classes) if config.val else None
    if len(dataset) < config.batch_size * dist.world:
        raise DatasetError(f"{config.data or config.pseudo}: {len(dataset)} samples are fewer than one batch "
                           f"({config.batch_size} x {dist.world} processes); lower --batch-size.")
    per_epoch = steps_per_epoch(len(dataset), config.batch_size, dist.world)
    total_steps = int(config.steps) if config.steps else int(config.epochs) * per_epoch
    if dist.main:
        yield Progress("data", 0, total_steps, {"summary": summary, "steps_per_epoch": per_epoch,
                                                "device": str(device)})

    # --- pseudo-labeller (its processes fork before torch builds the model and starts its threads), model
    model_config = _model_config(config, stage)
    use_joint = stage == 1 and model_config.use_joint
    labeller = PseudoLabeller(config.crf_workers, model_config.__dict__, model_config.use_crf) if use_joint else None
    try:
        _seed_everything(config.seed)
        model = _build_model(config, classes, model_config)
        result = yield from _train_loop(config, model, dataset, val_index, dist, device, stage, labeller,
                                        per_epoch, total_steps, run_dir, cancel)
    finally:
        if labeller is not None:
            labeller.close()
        if dist.world > 1:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()
    return result


def _train_loop(config, model, dataset, val_index, dist, device, stage, labeller, per_epoch, total_steps,
                run_dir, cancel):
    classes: ClassSpec = model.classes
    last_path, best_path = run_dir / LAST, run_dir / BEST
    model.to(device)
    model.train()
    groups = model.parameter_groups()
    for g in groups:
        if g.get("name") != "backbone":
            g["lr_mult"] = config.head_lr_mult
        g["lr"] = config.lr * g["lr_mult"]
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.0, 1.0 - s / max(1, total_steps)) ** config.poly_power)
    use_amp = bool(config.amp) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    step, best_miou = 0, -1.0
    if config.resume:
        resume_path = run_dir / RESUME
        try:
            train_state = torch.load(resume_path, map_location="cpu", weights_only=True)
            model.load_state_dict(train_state["model"])
        except Exception as err:
            raise CheckpointError(f"--resume: cannot continue from {resume_path} ({str(err).splitlines()[0]}); "
                                  "was it written by this config (same classes and backbone)?") from None
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        scaler.load_state_dict(train_state["scaler"])
        step, best_miou = int(train_state["step"]), float(train_state["best_miou"])
        _set_rng_state(train_state["rng"], device)
        del train_state

    net = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      # the seg head is unused with joint training off (ablation rows) or during the warm-up
                                      find_unused_parameters=stage == 1 and (not model.config.use_joint
                                                                             or config.joint_warmup_steps > 0))

    sampler = ResumableSampler(len(dataset), dist, config.seed, config.batch_size)
    loader_gen = torch.Generator()
    workers = max(0, int(config.workers))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, num_workers=workers, drop_last=True,
        pin_memory=device.type == "cuda", generator=loader_gen, persistent_workers=False,
        multiprocessing_context=("fork" if workers and os.name == "posix" else None))
    metrics = _MetricsLog(run_dir / METRICS, classes, step if config.resume else None) if dist.main else None
    if dist.main and not config.resume:
        (run_dir / CONFIG).write_text(dumps_toml(config.to_dict()), encoding="utf-8")

    pseudo_size = max(16, round(config.crop * config.pseudo_label_scale))

    def train_state() -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "best_miou": best_miou,
                "rng": _rng_state(device), "world": dist.world}

    def save_last() -> None:
        if dist.main:
            _atomic_torch_save(train_state(), run_dir / RESUME)
            _save(last_path, model, config, {"step": step, "best_mIoU": best_miou})

    def validate(epoch: int):
        nonlocal best_miou
        cm = None
        if dist.main:
            scale = config.val_scale or config.mean_scale
            cm = yield from evaluate_model(model, val_index, scale, False, device, cancel)
            miou = cm.miou()
            per_class = {n: (None if np.isnan(v) else float(v)) for n, v in zip(classes.names, cm.iou(), strict=True)}
            metrics.write({"kind": "val", "step": step, "epoch": epoch, "mIoU": f"{miou:.5f}",
                           **{f"iou_{n}": ("" if v is None else f"{v:.5f}") for n, v in per_class.items()}})
            if not np.isnan(miou) and miou > best_miou:
                best_miou = miou
                _save(best_path, model, config, {"step": step, "val_mIoU": miou, "per_class": per_class})
            yield Progress("val", step, total_steps, {"epoch": epoch, "mIoU": miou, "per_class": per_class,
                                                      "best_mIoU": best_miou})
        if dist.world > 1:
            import torch.distributed as tdist

            tdist.barrier()

    t_start = time.perf_counter()
    start_step = step
    crf_wait = 0.0
    pseudo_stats: dict[str, float] = {}
    epoch = step // per_epoch
    try:
        while step < total_steps:
            skip = step - epoch * per_epoch
            sampler.set_epoch(epoch, skip)
            dataset.set_epoch(epoch)
            loader_gen.manual_seed(config.seed * 1000003 + epoch)
            for batch in loader:
                if cancel is not None:
                    cancel.raise_if_cancelled()
                t_step = time.perf_counter()
                images_u8 = batch[0]
                x = model.normalize(images_u8)
                try:
                    # Mixed precision for the network only; the losses run in float32 (BCE and the dense energy
                    # are not autocast-safe, and fp16 sums over N^2 pixel pairs would lose precision).
                    with torch.autocast(device.type, enabled=use_amp):
                        out = net(x, batch[1].to(device)) if stage == 1 else net(x)
                    out = {k: v.float() for k, v in out.items()}
                    if stage == 1:
                        labels = batch[1].to(device)
                        pseudo = None
                        if labeller is not None and step >= config.joint_warmup_steps:
                            t_crf = time.perf_counter()
                            pseudo = merge_strong_labels(
                                batch_pseudo_labels(labeller, out["cam"], images_u8, batch[1], pseudo_size),
                                batch[3]).to(device)
                            crf_wait += time.perf_counter() - t_crf
                            # label coverage: what the seg head is taught from (all 255 = nothing to learn)
                            confident = pseudo != IGNORE_INDEX
                            pseudo_stats = {"confident": float(confident.float().mean()),
                                            "foreground": float((pseudo < classes.background_index).float().mean())}
                        loss, terms = _stage1_loss(model, out, x, labels, pseudo)
                    else:
                        loss, terms = _stage2_loss(model, out, x, batch[1].to(device), batch[2].to(device))
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"The loss became {loss.item()} at step {step}; lower --lr.")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                except RuntimeError as err:
                    if _is_oom(err):
                        raise _oom_error(config, err) from None
                    raise
                step += 1
                if dist.main:
                    elapsed = time.perf_counter() - t_start
                    eta = elapsed / max(1, step - start_step) * (total_steps - step)
                    losses = {"total": float(loss.detach())}
                    losses.update({k: float(v) for k, v in terms.items() if k != "total"})
                    lr = optimizer.param_groups[0]["lr"]
                    if step % max(1, config.log_every) == 0 or step == total_steps or step == start_step + 1:
                        metrics.write({"kind": "train", "step": step, "epoch": epoch, "lr": f"{lr:.6g}",
                                       "seconds": f"{time.perf_counter() - t_step:.3f}",
                                       **{f"loss_{k}": f"{v:.5f}" for k, v in losses.items()},
                                       **{f"pseudo_{k}": f"{v:.4f}" for k, v in pseudo_stats.items()}})
                    yield Progress("train", step, total_steps, {
                        "epoch": epoch, "losses": losses, "lr": lr, "eta": eta,
                        "step_seconds": time.perf_counter() - t_step, "crf_wait_seconds": crf_wait,
                        "pseudo": dict(pseudo_stats)})
                end_of_epoch = step % per_epoch == 0
                if step % max(1, config.checkpoint_every) == 0 or end_of_epoch or step == total_steps:
                    save_last()
                if val_index is not None and (
                        (config.val_every_steps and step % config.val_every_steps == 0)
                        or (not config.val_every_steps and end_of_epoch and (epoch + 1) % max(1, config.val_every) == 0)
                        or step == total_steps):
                    yield from validate(epoch)
                if step >= total_steps or end_of_epoch:
                    break
            epoch += 1
    except (KeyboardInterrupt, Cancelled):
        save_last()
        if dist.main:
            log.warning("Stopped at step %d; a usable checkpoint is in %s (continue with --resume).", step, last_path)
        raise
    except torch.cuda.OutOfMemoryError as err:
        raise _oom_error(config, err) from None
    if dist.world > 1:
        # DDP keeps replicas identical; check it once, and record it (a divergence would be a bug).
        diff = ranks_param_difference(model)
        if dist.main:
            _save(last_path, model, config, {"step": step, "best_mIoU": best_miou, "world_size": dist.world,
                                             "ranks_param_max_difference": diff})
            if diff != 0.0:
                log.warning("DDP replicas differ after training (max checksum difference %g).", diff)
    if dist.main and labeller is not None and step > start_step:
        log.info("Pseudo-labelling (CRF) wait: %.2f s over %d steps (%.0f%% of training time).", crf_wait,
                 step - start_step, 100.0 * crf_wait / max(1e-9, time.perf_counter() - t_start))
    return best_path if best_path.exists() else last_path


def train(config: TrainConfig, callback=None, cancel: CancelToken | None = None) -> Path:
    """Blocking form of :func:`train_steps`: events go to ``callback``; returns the best (or last) checkpoint."""
    return drive(train_steps(config, cancel), callback)


# ----------------------------------------------------------------------------------------------- stage 2 input

def make_pseudo_labels(checkpoint: str | Path, patches: str | Path, out_dir: str | Path, scale: float | None = None,
                       device: str = "auto", crf_workers: int = 0, overwrite: bool = False,
                       cancel: CancelToken | None = None) -> Generator[Progress, None, Path]:
    """Write the joint model's reliable pseudo-labels of every patch as ``out_dir/mask/<name>.png`` (palette
    PNG, 255 = unreliable) with the patch under ``out_dir/img/`` (hard link, else copy): a pixel-labelled set
    for ``train --stage2 --pseudo out_dir``. Returns ``out_dir``."""
    import shutil
    import tempfile

    from PIL import Image

    from .checkpoint import load_checkpoint
    from .data.patches import load_patch_rgb
    from .errors import OutputExistsError
    from .io.outputs import write_index_png

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite.")
    dev = resolve_device(device)
    model, info = load_checkpoint(checkpoint, map_location="cpu")
    if not model.has_pseudo_branch:
        raise CheckpointError(f"{checkpoint} is a stage-2 model without the pseudo-label branch; give the joint "
                              "(stage 1) checkpoint.")
    index = discover_patches(patches, info.classes)
    if scale is None:
        scale = float(info.train_config.get("scale_min", 1.0) + info.train_config.get("scale_max", 1.0)) / 2 \
            if info.train_config else 1.0
    model.to(dev).eval()
    labeller = PseudoLabeller(crf_workers, model.config.__dict__, model.config.use_crf)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "img").mkdir()
        (tmp / "mask").mkdir()
        for i, path in enumerate(index.paths):
            if cancel is not None:
                cancel.raise_if_cancelled()
            rgb = load_patch_rgb(path)
            h, w = rgb.shape[:2]
            size = (max(8, round(w * scale)), max(8, round(h * scale)))
            big = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR)) if abs(scale - 1) > 1e-6 else rgb
            with torch.no_grad():
                _, cam = model.predict(model.normalize(big[None]))
            maps = cam[0].float().clamp_min(0).cpu().numpy()
            label = labeller.result(labeller.submit(maps[None], np.ascontiguousarray(big)[None],
                                                    index.labels[i][None]))[0].astype(np.uint8)
            if label.shape != (h, w):
                label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
            name = path.stem + ".png"
            write_index_png(tmp / "mask" / name, label, info.classes)
            try:
                os.link(path, tmp / "img" / path.name)
            except OSError:
                shutil.copy2(path, tmp / "img" / path.name)
            yield Progress("pseudo-labels", i + 1, len(index), {"image": path.name})
        from .data.patches import write_classes_file

        write_classes_file(tmp, info.classes)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        labeller.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
