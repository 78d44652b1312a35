"""Two (or more) trained rows of the two-fold benchmark, averaged: their weights (one network) and their class
probabilities (an ensemble). No training; reads ``OUT/<fold>/<row>/last.pt`` and ``OUT/<fold>/fold.json``
written by ``wsss4luad_cpu.py`` and scores the fold's images with predict's defaults.

    .venv/bin/python benchmarks/average_rounds.py --out runs/user30 --rows stage2_stain_warm,stage2_stain_warm_seed1

The rows must share an architecture (and, for the weight average to mean anything, the network they started
from: the segmentation rounds that start from the joint model do).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wsss4luad"


def score_fold(out: Path, fold: str, rows: list[str], data: Path) -> dict:
    """The project's ConfusionMatrix of each row, of their weight average and of their ensemble."""
    from napari_wsss_cram.core.checkpoint import default_resolution, load_checkpoint
    from napari_wsss_cram.core.data.pixel import discover_pixel_dataset, load_pixel_sample
    from napari_wsss_cram.core.inference import PredictSettings, predict_array
    from napari_wsss_cram.core.metrics import ConfusionMatrix
    from napari_wsss_cram.core.progress import drive

    result = json.loads((out / fold / "fold.json").read_text(encoding="utf-8"))
    test_index = discover_pixel_dataset(data / "2.validation").subset(result["test_images"])
    models = [load_checkpoint(out / fold / row / "last.pt") for row in rows]
    info = models[0][1]
    averaged = copy.deepcopy(models[0][0])  # the first model's architecture, its weights replaced below
    state = averaged.state_dict()
    states = [model.state_dict() for model, _ in models]
    for name, tensor in state.items():
        if tensor.is_floating_point():  # weights and BatchNorm statistics; the batch counter stays
            state[name] = sum(s[name] for s in states) / len(states)
    averaged.load_state_dict(state)
    settings = PredictSettings(scale=default_resolution(info, image_has_mpp=False).scale or 1.0, device="cpu",
                               with_probs=True, with_cam=False)
    k = test_index.classes.num_classes  # tissue classes; the label k is background (tissue rule)
    matrices = {name: ConfusionMatrix(test_index.classes) for name in [*rows, "weight average", "ensemble"]}
    for sample in test_index.samples:
        rgb, mask = load_pixel_sample(sample, test_index.classes)
        mask = np.asarray(mask)
        probs = []
        for (model, model_info), row in zip(models, rows, strict=True):
            prediction = drive(predict_array(model, model_info, rgb, settings))
            labels = np.array(prediction.labels)
            probs.append(np.array(prediction.probs, dtype=np.float32))  # copied: cleanup() frees the store
            prediction.cleanup()
            matrices[row].update(labels, mask)
        background = labels == k  # the tissue mask's background, the same for every model
        prediction = drive(predict_array(averaged, info, rgb, settings))
        matrices["weight average"].update(np.asarray(prediction.labels), mask)
        prediction.cleanup()
        mean = sum(probs) / len(probs)
        matrices["ensemble"].update(np.where(background, k, mean[:k].argmax(0)), mask)
    return matrices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the benchmark's --out folder")
    parser.add_argument("--rows", required=True, help="comma-separated trained rows to average")
    parser.add_argument("--data", default=str(SHARED), help="the WSSS4LUAD folder (holds 2.validation)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = args.rows.split(",")
    pooled: dict = {}
    per_fold: dict[str, list[float]] = {}
    for fold in ("even", "odd"):
        for name, cm in score_fold(Path(args.out), fold, rows, Path(args.data)).items():
            if name in pooled:
                pooled[name].matrix += cm.matrix
            else:
                pooled[name] = cm
            per_fold.setdefault(name, []).append(cm.miou())
    print("| models | pooled mIoU | per class IoU | stroma -> tumor | tumor -> stroma | normal -> stroma | even / odd |")
    print("|---|---|---|---|---|---|---|")
    for name, cm in pooled.items():
        per_fold_text = " / ".join(f"{v:.3f}" for v in per_fold[name])
        m = cm.matrix.astype(float)
        rows_norm = m[:3] / m[:3].sum(1, keepdims=True)
        ious = cm.iou()
        print(f"| {name} | {cm.miou():.3f} | {' / '.join(f'{v:.3f}' for v in ious)} | {rows_norm[1, 0]:.2f} | "
              f"{rows_norm[0, 1]:.2f} | {rows_norm[2, 1]:.2f} | {per_fold_text} |")


if __name__ == "__main__":
    main()
