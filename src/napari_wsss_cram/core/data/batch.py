"""A training batch as a named record, built by the DataLoader's ``collate_fn`` from the datasets' item dicts
(imports torch, so ``core.data`` does not import it).

:class:`~.patches.PatchDataset` items (stage 1) are ``{"image", "labels", "index", "strong_mask"}``;
:class:`~.pixel.PixelDataset` items (stage 2) are ``{"image", "target", "weight", "index"}``. Fields a stage does
not have are None.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch.utils.data import default_collate

#: item key -> Batch field
_FIELDS = {"image": "images", "labels": "labels", "index": "index", "strong_mask": "strong_masks",
           "target": "target", "weight": "weight"}


@dataclass
class Batch:
    """One batch of B samples (CPU tensors, as the DataLoader gives them).

    - ``images`` uint8 (B, H, W, 3)
    - ``labels`` float32 (B, K): image-level labels (stage 1)
    - ``index`` int64 (B,): the samples' dataset indices
    - ``strong_masks`` int64 (B, H, W): pixel labels of corrected patches, IGNORE_INDEX elsewhere (stage 1)
    - ``target`` int64 (B, H, W): pseudo/pixel labels, 255 = ignore (stage 2)
    - ``weight`` float32 (B,): per-sample loss weight (stage 2)
    """

    images: torch.Tensor
    index: torch.Tensor
    labels: torch.Tensor | None = None
    strong_masks: torch.Tensor | None = None
    target: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def pin_memory(self) -> Batch:
        """Called by the DataLoader with ``pin_memory=True``."""
        return Batch(**{f.name: (None if (v := getattr(self, f.name)) is None else v.pin_memory())
                        for f in fields(self)})


def collate_batch(items: list[dict]) -> Batch:
    """``collate_fn`` for the training DataLoader: a list of item dicts -> one :class:`Batch`."""
    stacked = default_collate(items)
    return Batch(**{_FIELDS[key]: value for key, value in stacked.items()})
