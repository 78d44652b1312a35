"""The one device resolver for training, inference and the docks."""

from __future__ import annotations

import os
from typing import Any

from .errors import WsssCramError


def resolve_device(name: str | None = "auto") -> Any:
    """``auto`` -> CUDA (the ``LOCAL_RANK`` GPU under torchrun) > MPS > CPU; else a usable ``torch.device``.

    Raises WsssCramError for an unknown name or a device this machine does not have.
    """
    import torch

    name = (name or "auto").strip().lower()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        return torch.device("mps") if has_mps else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise WsssCramError(f"Unknown device '{name}': use auto, cpu, cuda, cuda:N or mps.") from err
    if device.type not in ("cpu", "cuda", "mps"):  # meta, xla, ...: no data lives there; tracebacks followed
        raise WsssCramError(f"Device '{name}' cannot run wsss-cram; use auto, cpu, cuda, cuda:N or mps.")
    if device.type == "cuda" and device.index is not None and torch.cuda.is_available() \
            and device.index >= torch.cuda.device_count():
        raise WsssCramError(f"Device '{name}' does not exist here ({torch.cuda.device_count()} CUDA device(s)).")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WsssCramError(f"Device '{name}' was asked for but CUDA is not available here; use cpu or auto.")
    if device.type == "mps" and not has_mps:
        raise WsssCramError(f"Device '{name}' was asked for but MPS is not available here; use cpu or auto.")
    return device


def tensor_of(array: Any, dtype: Any = None) -> Any:
    """``array`` as a CPU torch tensor sharing its memory where it can: C-contiguous and writable (a read-only
    array, e.g. a decoded image or a memory-mapped tile, is copied once; torch warns on and may write through a
    read-only buffer)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.require(array, dtype, ["C", "W"]))
