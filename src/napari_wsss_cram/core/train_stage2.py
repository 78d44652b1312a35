"""Stage 2 of WSSS-CRAM as a :class:`~.train.Trainer` subclass: a segmentation network trained on saved pixel
labels (the joint model's pseudo-labels, ``wsss-cram pseudo-labels``), optionally mixed with pixel-labelled
corrections at their own weight. It overrides the data hooks (pixel-labelled sets; mosaics and synthesised
regions of pseudo-labelled cells) and the step (no image-level labels, no per-step pseudo-labels); the loss is
:func:`~.losses.joint_loss` in its stage-2 form. Everything else (schedule, checkpoints, resume, validation, DDP) is the Trainer's.
"""

from __future__ import annotations

import torch

from .data.batch import Batch
from .data.mosaic import CellBank, cells_from_pixel_labels
from .data.pixel import PixelDataset, PixelIndex, discover_pixel_dataset
from .errors import DatasetError
from .losses import joint_loss
from .pseudo_labels import PseudoLabeller
from .train import Trainer
from .train_config import TrainConfig


def stage2_samples(config: TrainConfig) -> tuple[PixelIndex, list[float]]:
    """The pixel-labelled samples of a stage-2 run and their weights: ``--pseudo`` (weight 1) plus
    ``--pixel-labels`` (weight ``pixel_weight``)."""
    if not config.pseudo:
        raise DatasetError("Stage 2 needs --pseudo DIR (written by `wsss-cram pseudo-labels`).")
    pseudo = discover_pixel_dataset(config.pseudo, config.classes)
    samples, weights = list(pseudo.samples), [1.0] * len(pseudo)
    if config.pixel_labels:
        pixel = discover_pixel_dataset(config.pixel_labels, pseudo.classes)
        samples += pixel.samples
        weights += [float(config.pixel_weight)] * len(pixel)
    return PixelIndex(samples, pseudo.classes, pseudo.root), weights


class Stage2Trainer(Trainer):
    """Stage 2: segmentation on saved pixel labels (see the module docstring). An ablation of stage 2 subclasses
    this class and passes it as ``train(config, trainer_class=...)``."""

    stage = 2

    def build_dataset(self) -> None:
        """The pseudo-labelled samples (and corrected masks at ``pixel_weight``) as one weighted dataset."""
        config = self.config
        pixel_index, weights = stage2_samples(config)
        self.classes = pixel_index.classes
        self.dataset = PixelDataset(pixel_index.samples, self.classes, self.augment, config.seed, weights)
        self.summary = f"stage 2: {len(self.dataset)} pixel-labelled samples ({config.pseudo}" + \
            (f" + {config.pixel_labels} weight {config.pixel_weight}" if config.pixel_labels else "") + ")"

    def build_mosaic_bank(self, cell: int | None = None) -> CellBank:
        """Cells (``cell`` px, default ``mosaic_cell``) of the pseudo-labelled regions that are at least
        ``mosaic_purity`` one class."""
        config = self.config
        return cells_from_pixel_labels(self.dataset.samples, self.classes, cell or config.mosaic_cell,
                                       config.mosaic_purity)

    def build_pseudo_labeller(self) -> PseudoLabeller | None:
        """None: stage 2 learns from saved labels, not from each step's maps."""
        return None

    def unused_parameters(self) -> bool:
        """Every parameter of the segmentation network gets a gradient."""
        return False

    def training_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward on the images alone, then the stage-2 loss on the batch's pixel labels and sample weights."""
        device = self.device
        x = self.model.normalize(batch.images)
        with torch.autocast(device.type, enabled=self.use_amp):
            out = self.net(x)
        out = {k: v.float() for k, v in out.items()}
        return joint_loss(out, None, batch.target.to(device), x, self.model.config, batch.weight.to(device))
