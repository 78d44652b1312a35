"""What a training run needs around its model: the torchrun process group, seeding and RNG state, the resumable
sampler, the step/time budget, checkpoint writing that says plainly why it failed, and the out-of-memory message.
Used by :class:`~.train.Trainer`; nothing here knows the method.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import OutOfMemoryError, TrainingError, WsssCramError
from .train_config import TrainConfig


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank)


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global generators (the model's initialisation, dropout)."""
    # numpy's global RNG is not used: augmentation draws from Generators seeded per (seed, epoch, sample).
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """The global RNG states (torch, Python, CUDA) for ``resume.pt``."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what :func:`rng_state` saved."""
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

    def __init__(self, n: int, dist: DistInfo, seed: int, batch_size: int) -> None:
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


# ----------------------------------------------------------------------------------------------- checkpoints

def save_model_checkpoint(path: Path, model, config: TrainConfig, extra: dict) -> None:
    """A model checkpoint with the run's config; a failed write raises a plain :class:`TrainingError`."""
    from .checkpoint import save_checkpoint

    try:
        save_checkpoint(path, model, extra=extra, train_config=config.to_dict())
    except (OSError, RuntimeError) as err:
        raise checkpoint_write_error(path, err) from None


def atomic_torch_save(obj: dict, path: Path) -> None:
    """``torch.save`` under a temporary name, renamed into place whole; a failed write raises a plain TrainingError."""
    from .io.atomic import atomic_path

    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError from its zip writer
        raise checkpoint_write_error(path, err) from None


def checkpoint_write_error(path: Path, err: BaseException) -> TrainingError:
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


# ----------------------------------------------------------------------------------------------- errors

def oom_error(config: TrainConfig, err: BaseException) -> OutOfMemoryError:
    """Out of memory, said with what to lower first."""
    return OutOfMemoryError(
        f"Out of memory while training (batch {config.batch_size}, crop {config.crop}, backbone "
        f"{config.model.get('backbone', 'resnet50')}): lower --batch-size, then --crop, or use resnet18 "
        f"(e.g. --config cpu-small). ({str(err).splitlines()[0]})")


def without_worker_traceback(err: WsssCramError) -> WsssCramError:
    """A DataLoader worker's error comes back with the worker's whole traceback in its message; the user needs
    only the message itself (which names the file)."""
    text = str(err)
    if "DataLoader worker process" not in text or "Original Traceback" not in text:
        return err
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return type(err)(last[len(prefix):] if last.startswith(prefix) else last)


def is_oom(err: BaseException) -> bool:
    """True for torch's out-of-memory errors (CUDA's type, or the message other backends give)."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
