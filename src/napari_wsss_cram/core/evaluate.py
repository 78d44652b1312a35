"""Scoring a model on a pixel-labelled set with THE metric (used by training's validation and `wsss-cram evaluate`).

Predictions go through the inference engine (``core.inference.predict_array``), so a score is what
``wsss-cram predict`` would produce on the same images at the same scale.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import torch

from .data.pixel import PixelIndex, load_pixel_sample
from .errors import DatasetError
from .metrics import ConfusionMatrix
from .progress import CancelToken, Progress, drive

__all__ = ["evaluate_model", "predict_labels"]


def predict_labels(model, rgb: np.ndarray, scale: float = 1.0, crf: bool = False,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """Label map (H, W) uint8 of one in-memory image, predicted by the inference engine at ``scale``
    (the training rescale), as ``wsss-cram predict`` would (tiling, tissue prior, optional CRF)."""
    from .checkpoint import Resolution
    from .inference import build_predict_settings, predict_array

    settings, _ = build_predict_settings(None, Resolution(scale=scale), crf=crf, device=str(device),
                                         with_probs=False, with_cam=False)
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
