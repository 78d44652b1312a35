"""The one segmentation metric: a confusion matrix accumulated over all images.

WSSS4LUAD scoring: IoU per tissue class from one confusion matrix over the whole set, with pixels
whose ground truth is background (index K) left out, and mIoU the mean over tissue classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .classes import IGNORE_INDEX, ClassSpec

#: why an mIoU is undefined
NO_TISSUE_NOTE = ("mIoU n/a: no tissue-class pixel in the masks or the predictions (all background or "
                  "unlabelled); check that the masks use the class indices of the model.")


@dataclass
class ConfusionMatrix:
    """Rows are ground truth, columns are predictions, over the ``K + 1`` classes (background last)."""

    classes: ClassSpec
    matrix: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = self.classes.num_outputs
        self.matrix = np.zeros((n, n), dtype=np.int64)

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        """Add one image. Pixels whose target is background or IGNORE_INDEX are not counted."""
        prediction = np.asarray(prediction)
        target = np.asarray(target)
        if prediction.shape != target.shape:
            raise ValueError(f"Prediction {prediction.shape} and mask {target.shape} differ in shape.")
        n = self.classes.num_outputs
        keep = (target != self.classes.background_index) & (target != IGNORE_INDEX) & (target < n)
        t = target[keep].astype(np.int64)
        p = prediction[keep].astype(np.int64)
        # A prediction outside the class range (e.g. 255) counts as background: never as a hit.
        p = np.where((p >= 0) & (p < n), p, self.classes.background_index)
        self.matrix += np.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def iou(self) -> np.ndarray:
        """IoU of each tissue class (length K); NaN for a class absent from both truth and prediction."""
        k = self.classes.num_classes
        m = self.matrix
        tp = np.diag(m)[:k].astype(np.float64)
        fp = m[:, :k].sum(axis=0) - np.diag(m)[:k]
        fn = m[:k, :].sum(axis=1) - np.diag(m)[:k]
        denom = tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)

    def miou(self) -> float:
        """Mean IoU over tissue classes that occur (NaN classes are skipped)."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")

    def to_dict(self) -> dict:
        iou = self.iou()
        miou = self.miou()
        return {
            "mIoU": None if np.isnan(miou) else miou,  # JSON has no NaN: null, explained by "note"
            **({"note": NO_TISSUE_NOTE} if np.isnan(miou) else {}),
            "per_class": {n: (None if np.isnan(v) else float(v)) for n, v in zip(self.classes.names, iou, strict=True)},
            "confusion": self.matrix.tolist(),
            "classes": list(self.classes.all_names),
        }

    def table(self) -> str:
        """A plain-text table of per-class IoU and mIoU."""
        lines = [f"{'class':<14}{'IoU':>8}"]
        for n, v in zip(self.classes.names, self.iou(), strict=True):
            lines.append(f"{n:<14}{'n/a' if np.isnan(v) else f'{v:.4f}':>8}")
        miou = self.miou()
        lines.append(f"{'mIoU':<14}{'n/a' if np.isnan(miou) else f'{miou:.4f}':>8}")
        if np.isnan(miou):
            lines.append(NO_TISSUE_NOTE)
        else:
            missing = [n for n, v in zip(self.classes.names, self.iou(), strict=True) if np.isnan(v)]
            if missing:
                lines.append(f"n/a: {', '.join(missing)} neither in the masks nor predicted; left out of the mIoU.")
        return "\n".join(lines)
