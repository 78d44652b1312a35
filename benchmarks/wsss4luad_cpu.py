"""WSSS4LUAD two-fold benchmark on the CPU: image-level labels in, pixel masks scored, nothing else touched.

Protocol (DEVELOPERS.md "Real-data protocol"; issue 13), through the project's own code paths:

1. Two folds over ``2.validation`` (31 images): the even-numbered images and the odd-numbered ones (normal
   tissue is only in 02, 05, 08 and 09, so both folds hold some). For each fold, ``patchify`` cuts crops of
   150-300 px out of the *other* fold's images and labels each with the classes covering >= 5% of its tissue:
   the training set holds image-level labels only. The mask crops go to ``patches/_masks/`` to measure the
   pseudo-labels and are never trained on. The scored fold's masks touch nothing but the metric.
2. Each row trains with the preset (``cpu-small``) under one wall-clock budget (``--minutes``, the same for
   every row) and is predicted by the inference engine with ``predict``'s defaults (the checkpoint's resolution,
   background from the tissue mask, class gating), unless the row says otherwise.
3. Scores: one confusion matrix pooled over both folds (THE metric: background pixels of the truth left out),
   per-class IoU, the share of true tissue called background, and the pseudo-label precision / recall per class
   on the training crops (the joint rows' reliable labels, made by ``make_pseudo_labels``).

Rows: constant stroma; plain CAM (maps, gated, tissue background); the paper's WSSS-CRAM as written (its
background class competes with tissue, no gating, no constrained loss); the default recipe with each output rule
switched off in turn (re-scored, no retraining); the joint model (``cpu-small`` as shipped); stage 2 on its labels
(random weights; stain-prior labels; stain-prior labels started from the joint model = the recipe's final model).

Usage (from the repository root; the folds run in parallel, one core each)::

    .venv/bin/python benchmarks/wsss4luad_cpu.py --out runs/wsss4luad_2fold --minutes 8
    .venv/bin/python benchmarks/wsss4luad_cpu.py --quick --out runs/wsss4luad_quick   # ~4 min smoke run

Prints the table (markdown) and writes ``results.json`` and ``table.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from napari_wsss_cram.core.classes import IGNORE_INDEX, ClassSpec
from napari_wsss_cram.core.metrics import ConfusionMatrix

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "wsss4luad"
FOLDS = ("even", "odd")

#: key -> (title, ModelConfig overrides for training, PredictSettings overrides for scoring, trains a model)
ROWS: dict[str, tuple[str, dict, dict, bool]] = {
    "cam": ("plain CAM (maps, tissue background)",
            {"use_da": False, "use_joint": False, "use_crf": False, "constrained_weight": 0.0}, {}, True),
    "paper": ("WSSS-CRAM as written (paper switches)",
              {"use_da": True, "use_joint": True, "use_crf": True, "constrained_weight": 0.0,
               "background_needs_white": False}, {"background": "model", "gate_classes": False}, True),
    "constrained_only": ("default without pseudo-labels (constrained loss alone on the seg branch)",
                         {"lambda_seg": 0.0, "use_crf": False, "energy_weight": 0.0}, {}, True),
    "default": ("default recipe (cpu-small as shipped)", {}, {}, True),
    "default_control": ("default recipe again, on a step budget (control of the step-budget rows)", {}, {}, True),
    "stain": ("default + H&E stain jitter 0.1", {}, {}, True),
    "mosaic": ("default + mosaics of single-label crops (25% of items)", {}, {}, True),
    "torch_crf": ("default, pseudo-label CRF on the torch backend (step budget)", {"crf": {"backend": "torch"}}, {},
                  True),
}
#: rows that change training settings (TrainConfig keys) rather than the model: key -> overrides
TRAIN_OVERRIDES = {
    "stain": {"stain": 0.1},
    "mosaic": {"mosaic_share": 0.25},
    "stage2_mosaic": {"mosaic_share": 0.25},
    "stage2_stain_warm_jitter": {"stain": 0.2},
    # about 0.5 µm/px (x0.45-0.65 of the 40x crops), a 96 px crop = ~190 px of the crop at 40x; scored at the
    # checkpoint's mean training scale (0.55)
    "stage2_stain_warm_halfres": {"scale_min": 0.45, "scale_max": 0.65, "crop": 96},
    # HisynSeg: half of the items get one or two Bezier regions of another class (96 px windows >= 90% one class
    # of the stain-prior labels) pasted in
    "stage2_stain_warm_synth": {"synthesis_share": 0.5, "synthesis_region": 96},
    "stage2_stain_warm_synth_seed1": {"synthesis_share": 0.5, "synthesis_region": 96},
    # the same, pasting tumor and stroma regions only (the pair the recipe confuses; normal regions of two images,
    # pasted as often as the others, made the odd fold call stroma normal)
    "stage2_stain_warm_synth_ts": {"synthesis_share": 0.5, "synthesis_region": 96, "synthesis_classes": "tumor,stroma"},
    "stage2_stain_warm_synth_ts_seed1": {"synthesis_share": 0.5, "synthesis_region": 96,
                                         "synthesis_classes": "tumor,stroma"},
}
#: segmentation rounds (stage 2, 3, ...): key -> (title, the row whose checkpoint labels the crops (its
#: segmentation branch restricted to each crop's classes), refinement of those labels, ModelConfig overrides, seed)
STAGE2_ROWS: dict[str, tuple[str, str, str, dict, int]] = {
    "stage2": ("stage 2 on the default's pseudo-labels", "default", "none", {}, 0),
    "stage2_seed1": ("stage 2 again, seed 1 (noise of the stage-2 rows)", "default", "none", {}, 1),
    "stage2_mosaic": ("stage 2 + mosaics of pseudo-labelled cells >= 90% one class (25% of items)", "default",
                      "none", {}, 0),
    "stage2_oeem": ("stage 2 + OEEM pixel weighting of the cross-entropy", "default", "none",
                    {"ce_weighting": "oeem"}, 0),
    "stage2_par": ("stage 2 on PAR-refined pseudo-labels (colour affinities)", "default", "par", {}, 0),
    "stage2_stain": ("stage 2 on stain-prior pseudo-labels (hematoxylin density decides tumor/stroma)", "default",
                     "stain", {}, 0),
    "stage2_stain_seed1": ("stage 2 on stain-prior pseudo-labels, seed 1", "default", "stain", {}, 1),
    "stage2_stain_seed2": ("stage 2 on stain-prior pseudo-labels, seed 2", "default", "stain", {}, 2),
    "stage2_stain_balanced": ("stage 2 on stain-prior pseudo-labels + class-balanced cross-entropy", "default",
                              "stain", {"ce_weighting": "balanced"}, 0),
    "stage2_stain_warm": ("stage 2 on stain-prior pseudo-labels, starting from the joint model's network",
                          "default", "stain", {}, 0),
    "stage2_stain_warm_seed1": ("stage 2 on stain-prior pseudo-labels from the joint model's network, seed 1",
                                "default", "stain", {}, 1),
    "stage2_stain_warm_seed2": ("stage 2 on stain-prior pseudo-labels from the joint model's network, seed 2",
                                "default", "stain", {}, 2),
    "stage2_stain_warm_jitter": ("stage 2 on stain-prior pseudo-labels from the joint model's network + H&E stain "
                                 "jitter 0.2 (the scored images' stain differs from the training crops')",
                                 "default", "stain", {}, 0),
    "stage2_stain_warm_halfres": ("stage 2 on stain-prior pseudo-labels from the joint model's network at half "
                                  "resolution (~0.5 µm/px, 96 px crop: context for the pixels)", "default", "stain",
                                  {}, 0),
    "stage2_stain_warm_synth": ("stage 2 on stain-prior pseudo-labels from the joint model's network + boundary "
                                "synthesis (HisynSeg: Bezier regions of another class pasted into half the items)",
                                "default", "stain", {}, 0),
    "stage2_stain_warm_synth_seed1": ("stage2_stain_warm_synth again, seed 1", "default", "stain", {}, 1),
    "stage2_stain_warm_synth_ts": ("stage2_stain_warm_synth pasting tumor and stroma regions only", "default",
                                   "stain", {}, 0),
    "stage2_stain_warm_synth_ts_seed1": ("stage2_stain_warm_synth_ts again, seed 1", "default", "stain", {}, 1),
    "stage2_stain_warm_half": ("stage 2 on stain-prior pseudo-labels from the joint model's network (half of "
                               "stage 2's budget: the first round of stage3_warm)", "default", "stain", {}, 0),
    "stage2_stain_warm_half_seed1": ("stage2_stain_warm_half again, seed 1 (two half-length rounds from one joint "
                                     "network: their average is one round's budget)", "default", "stain", {}, 1),
    "stage3_warm": ("stage 3: a self-training round from stage2_stain_warm_half's network on its labels (the two "
                    "rounds share stage 2's budget)", "stage2_stain_warm_half", "none", {}, 0),
    "stage3": ("stage 3: a self-training round on stage 2's pseudo-labels", "stage2", "none", {}, 0),
    "stage3_oeem": ("stage 3 + OEEM on stage 2 + OEEM's pseudo-labels", "stage2_oeem", "none",
                    {"ce_weighting": "oeem"}, 0),
    "stage3_par_oeem": ("stage 3 + OEEM on PAR-refined labels of stage 2 + OEEM", "stage2_oeem", "par",
                        {"ce_weighting": "oeem"}, 0),
}
#: segmentation rounds that start from their labeller's network (``init``) rather than from random weights
WARM_ROWS = {"stage2_stain_warm", "stage2_stain_warm_seed1", "stage2_stain_warm_seed2", "stage2_stain_warm_jitter",
             "stage2_stain_warm_halfres", "stage2_stain_warm_synth", "stage2_stain_warm_synth_seed1",
             "stage2_stain_warm_synth_ts", "stage2_stain_warm_synth_ts_seed1", "stage2_stain_warm_half", "stage2_stain_warm_half_seed1", "stage3_warm"}
TTA = {"tta_scales": (0.75, 1.0, 1.25), "tta_flip": True}
#: re-scorings of a trained row's checkpoint with other output rules (no training): key -> (title, row, overrides)
RESCORE = {
    "cam_gated": ("plain CAM + class gating", "cam", {"gate_classes": True}),
    "cam_tta": ("plain CAM, multi-scale + flip maps", "cam", TTA),
    "default_gated": ("default + class gating", "default", {"gate_classes": True}),
    "default_model_bg": ("default, model background (not tissue mask)", "default", {"background": "model"}),
    "default_tta": ("default + multi-scale + flip at inference", "default", TTA),
    "default_crf": ("default + dense CRF at inference (DSRG parameters)", "default", {"crf": True}),
    "stage2_tta": ("stage 2 + multi-scale + flip at inference", "stage2", TTA),
    "stage2_crf": ("stage 2 + dense CRF at inference (DSRG parameters)", "stage2", {"crf": True}),
}
ALL_ROWS = ["constant", "cam", "paper", "constrained_only", "default", "default_control", "torch_crf", "stain",
            "mosaic", *STAGE2_ROWS]


def fold_images(fold: str, n: int = 31) -> tuple[list[str], list[str]]:
    """(training images, scored images) of a fold: ``even`` scores 00, 02, ... and trains on the odd ones."""
    even = [f"{i:02d}" for i in range(0, n, 2)]
    odd = [f"{i:02d}" for i in range(1, n, 2)]
    return (odd, even) if fold == "even" else (even, odd)


# ----------------------------------------------------------------------------------------------- scoring

def score_model(checkpoint: Path, test_index, overrides: dict) -> ConfusionMatrix:
    """Predict every scored image with the engine (predict's defaults + ``overrides``) and pool one matrix."""
    from napari_wsss_cram.core.checkpoint import default_resolution, load_checkpoint
    from napari_wsss_cram.core.data.pixel import load_pixel_sample
    from napari_wsss_cram.core.inference import PredictSettings, predict_array
    from napari_wsss_cram.core.progress import drive

    model, info = load_checkpoint(checkpoint)
    resolution = default_resolution(info, image_has_mpp=False)
    settings = PredictSettings(scale=resolution.scale or 1.0, device="cpu", with_probs=False, with_cam=False,
                               **overrides)
    cm = ConfusionMatrix(test_index.classes)
    for sample in test_index.samples:
        rgb, mask = load_pixel_sample(sample, test_index.classes)
        prediction = drive(predict_array(model, info, rgb, settings))
        cm.update(np.asarray(prediction.labels), mask)
        prediction.cleanup()
    return cm


def constant_cm(test_index, class_name: str = "stroma") -> ConfusionMatrix:
    from napari_wsss_cram.core.data.pixel import load_mask

    classes = test_index.classes
    cm = ConfusionMatrix(classes)
    for sample in test_index.samples:
        mask = load_mask(sample, classes)
        cm.update(np.full(mask.shape, classes.names.index(class_name), np.uint8), mask)
    return cm


def pseudo_label_counts(pseudo_dir: Path, patch_dir: Path, classes: ClassSpec) -> np.ndarray:
    """Joint counts (K+1, K+2): rows truth 0..K, columns pseudo-label 0..K then 255, over the training crops."""
    from napari_wsss_cram.core.data.patchify import MASKS_SUBDIR
    from napari_wsss_cram.core.io.png import read_index_png

    n = classes.num_outputs
    joint = np.zeros((n, n + 1), np.int64)
    for path in sorted((pseudo_dir / "mask").glob("*.png")):
        pseudo = read_index_png(path)
        truth = read_index_png(patch_dir / MASKS_SUBDIR / path.name)
        keep = truth != IGNORE_INDEX
        t = truth[keep].astype(np.int64)
        p = pseudo[keep].astype(np.int64)
        p = np.where(p == IGNORE_INDEX, n, p)
        joint += np.bincount(t * (n + 1) + p, minlength=n * (n + 1)).reshape(n, n + 1)
    return joint


def pseudo_label_quality(joint: np.ndarray, classes: ClassSpec) -> dict:
    n = classes.num_outputs
    confident = joint[:, :n]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.diag(confident) / confident.sum(axis=0)
        recall = np.diag(confident) / joint.sum(axis=1)
    return {"precision": {c: _num(v) for c, v in zip(classes.all_names, precision, strict=True)},
            "recall": {c: _num(v) for c, v in zip(classes.all_names, recall, strict=True)},
            "ignored_share": float(joint[:, n].sum() / max(1, joint.sum()))}


def tissue_as_background(matrix: np.ndarray, k: int) -> float:
    """Share of true tissue pixels predicted as background."""
    tissue = matrix[:k]
    return float(tissue[:, k].sum() / max(1, tissue.sum()))


def _num(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)


# ----------------------------------------------------------------------------------------------- one fold

def _row_config(args, patch_dir: Path, out: Path, model_overrides: dict, stage2_pseudo: Path | None = None,
                train_overrides: dict | None = None, seed: int | None = None):
    from napari_wsss_cram.core.train_config import TrainConfig, load_config

    data = load_config(args.config).to_dict()
    data["model"] = {**data["model"], **model_overrides}
    data.update(out=str(out), seed=args.seed + (seed or 0), val=None, threads=1, weights="none", crf_workers=0, workers=0,
                steps=args.steps, minutes=None if args.steps else args.minutes, **{"init": None, **(train_overrides or {})})
    if args.warmup_steps is not None:
        # a step budget that repeats a timed run: give it that run's warm-up
        data["joint_warmup_steps"] = args.warmup_steps
    elif data["joint_warmup_steps"] and args.steps:
        data["joint_warmup_steps"] = min(data["joint_warmup_steps"], args.steps // 3)
    elif data["joint_warmup_steps"] and data.get("minutes") and not args.steps:
        # the preset's warm-up is sized for its own budget: keep the same share of a shorter one
        data["joint_warmup_steps"] = int(data["joint_warmup_steps"] * min(1.0, args.minutes / data_minutes(args)))
    if stage2_pseudo is not None:
        data.update(stage2=True, pseudo=str(stage2_pseudo), data="")
    else:
        data["data"] = str(patch_dir)
    return TrainConfig.from_dict(data)


def data_minutes(args) -> float:
    from napari_wsss_cram.core.train_config import load_config

    return float(load_config(args.config).minutes or args.minutes)


def data_has_pseudo_branch(key: str) -> bool:
    """Rows whose reliable pseudo-labels are measured (the DA rows with joint training)."""
    return key in ("paper", "default", "default_control", "torch_crf", "stain", "mosaic")


def _log(fold: str, message: str) -> None:
    print(f"[{fold} {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _train(config, fold: str, title: str) -> tuple[Path, float, int]:
    from napari_wsss_cram.core.train import train

    if Path(config.out).exists():
        shutil.rmtree(config.out)
    steps = [0]

    def callback(event) -> None:
        if event.phase == "train":
            steps[0] = event.done

    t0 = time.perf_counter()
    checkpoint = train(config, callback)
    seconds = time.perf_counter() - t0
    _log(fold, f"{title}: trained {steps[0]} steps in {seconds / 60:.1f} min")
    return checkpoint, seconds, steps[0]


def run_fold(args, fold: str) -> dict:
    """Train and score every row on one fold; returns confusion matrices (lists) and pseudo-label counts."""
    import torch

    from napari_wsss_cram.core.data.patchify import patchify
    from napari_wsss_cram.core.data.pixel import discover_pixel_dataset
    from napari_wsss_cram.core.progress import drive
    from napari_wsss_cram.core.pseudo_labels import make_pseudo_labels

    torch.set_num_threads(1)
    val = Path(args.data) / "2.validation"
    dataset = discover_pixel_dataset(val)
    train_names, test_names = fold_images(fold, len(dataset.samples))
    if args.quick:
        test_names = test_names[:4]
    train_index, test_index = dataset.subset(train_names), dataset.subset(test_names)
    assert not set(s.name for s in train_index.samples) & set(s.name for s in test_index.samples)
    classes = dataset.classes
    out = Path(args.out) / fold
    out.mkdir(parents=True, exist_ok=True)
    patch_dir = out / "patches"
    previous = out / "fold.json"
    if previous.is_file() and patch_dir.is_dir():
        # rows added to a finished run train on the crops its rows trained on (cut once, by the same seed)
        n_crops = len(list(patch_dir.glob("*.png")))
    else:
        n_crops = len(patchify(train_index, patch_dir, min_frac=0.05, size=(150, 300), overlap=args.overlap,
                               seed=args.seed, keep_masks=True, overwrite=True).paths)
    _log(fold, f"patchify: images {','.join(train_names)} -> {n_crops} crops; scoring "
               f"{','.join(test_names)}")
    result: dict = {"fold": fold, "train_images": train_names, "test_images": test_names,
                    "crops": n_crops, "rows": {}}
    if previous.is_file():
        # rows added to a finished run (same crops, same scored images): keep the rows already there
        old = json.loads(previous.read_text(encoding="utf-8"))
        if old.get("test_images") == test_names and old.get("crops") == n_crops:
            result = {**old, "rows": dict(old["rows"])}
    rows = args.rows
    if "constant" in rows:
        result["rows"]["constant"] = {"matrix": constant_cm(test_index).matrix.tolist()}
    checkpoints: dict[str, Path] = {}
    for key in ROWS:
        if key not in rows:
            continue
        title, model_overrides, predict_overrides, _ = ROWS[key]
        config = _row_config(args, patch_dir, out / key, model_overrides, train_overrides=TRAIN_OVERRIDES.get(key))
        checkpoint, seconds, steps = _train(config, fold, title)
        checkpoints[key] = checkpoint
        row = {"matrix": score_model(checkpoint, test_index, predict_overrides).matrix.tolist(),
               "train_seconds": seconds, "steps": steps}
        if data_has_pseudo_branch(key):
            pseudo_dir = out / key / "pseudo"
            # the reliable labels the joint training learnt from (the activation maps' alpha/beta + CRF)
            drive(make_pseudo_labels(checkpoint, patch_dir, pseudo_dir, device="cpu", overwrite=True, source="maps"))
            row["pseudo_counts"] = pseudo_label_counts(pseudo_dir, patch_dir, classes).tolist()
        result["rows"][key] = row
        _log(fold, f"{title}: scored")
    for key, (title, labeller, refine, model_overrides, seed) in STAGE2_ROWS.items():
        if key not in rows:
            continue
        checkpoint = out / labeller / "last.pt"
        if not checkpoint.is_file() or labeller not in result["rows"]:
            raise SystemExit(f"error: row {key} needs row {labeller}'s checkpoint ({checkpoint}); add row {labeller}.")
        # the labeller's segmentation branch restricted to each crop's classes (made once per labeller/refinement)
        seg_dir = out / labeller / ("pseudo_seg" if refine == "none" else f"pseudo_seg_{refine}")
        counts_key = f"pseudo_counts/{labeller}/{refine}"
        if not (seg_dir / "mask").is_dir() or counts_key not in result:
            drive(make_pseudo_labels(checkpoint, patch_dir, seg_dir, device="cpu", overwrite=True, refine=refine))
            result[counts_key] = pseudo_label_counts(seg_dir, patch_dir, classes).tolist()
        overrides = {**TRAIN_OVERRIDES.get(key, {}), **({"init": str(checkpoint)} if key in WARM_ROWS else {})}
        config = _row_config(args, patch_dir, out / key, model_overrides, stage2_pseudo=seg_dir,
                             train_overrides=overrides, seed=seed)
        checkpoint, seconds, steps = _train(config, fold, title)
        result["rows"][key] = {"matrix": score_model(checkpoint, test_index, {}).matrix.tolist(),
                               "train_seconds": seconds, "steps": steps, "pseudo_counts": result[counts_key]}
        _log(fold, f"{title}: scored")
    # the re-scoring rows of the rows trained now (a row added later does not re-score the others)
    rescore(result, out, test_index, bases=set(rows))
    (out / "fold.json").write_text(json.dumps(result), encoding="utf-8")
    return result


def rescore(result: dict, out: Path, test_index, rows_too: bool = False, bases: set[str] | None = None) -> None:
    """Score the trained rows' checkpoints again with each RESCORE variant (no training); ``rows_too``: the
    trained rows themselves as well (after a change of the engine's defaults); ``bases``: only the variants of
    these rows."""
    if rows_too:
        for key, row in result["rows"].items():
            checkpoint = out / key / "last.pt"
            if checkpoint.is_file() and (key in ROWS or key in STAGE2_ROWS):
                overrides = ROWS[key][2] if key in ROWS else {}
                row["matrix"] = score_model(checkpoint, test_index, overrides).matrix.tolist()
    for rkey, (_, base, overrides) in RESCORE.items():
        checkpoint = out / base / "last.pt"
        if base in result["rows"] and checkpoint.is_file() and (bases is None or base in bases):
            result["rows"][rkey] = {"matrix": score_model(checkpoint, test_index, overrides).matrix.tolist()}


def rescore_fold(args, fold: str) -> dict:
    """``--rescore``: add the RESCORE rows to a finished fold (same images, same checkpoints)."""
    import torch

    from napari_wsss_cram.core.data.pixel import discover_pixel_dataset

    torch.set_num_threads(1)
    out = Path(args.out) / fold
    result = json.loads((out / "fold.json").read_text(encoding="utf-8"))
    test_index = discover_pixel_dataset(Path(args.data) / "2.validation").subset(result["test_images"])
    rescore(result, out, test_index, rows_too=True)
    (out / "fold.json").write_text(json.dumps(result), encoding="utf-8")
    return result


# ----------------------------------------------------------------------------------------------- report

TITLES = {"constant": "constant stroma", **{k: v[0] for k, v in ROWS.items()},
          **{k: v[0] for k, v in RESCORE.items()}, **{k: v[0] for k, v in STAGE2_ROWS.items()}}
#: the table's row order (every key of ROWS, RESCORE and STAGE2_ROWS; test_benchmark checks none is missing)
ORDER = ["constant", "cam", "cam_gated", "cam_tta", "paper", "constrained_only", "default_gated", "default_model_bg",
         "default_control", "torch_crf", "stain", "mosaic", "default", "default_tta", "default_crf", "stage2",
         "stage2_seed1", "stage2_tta", "stage2_crf", "stage2_mosaic", "stage2_oeem", "stage2_par", "stage2_stain", "stage2_stain_seed1", "stage2_stain_seed2",
         "stage2_stain_balanced", "stage2_stain_warm", "stage2_stain_warm_seed1",
         "stage2_stain_warm_seed2", "stage2_stain_warm_jitter",
         "stage2_stain_warm_halfres", "stage2_stain_warm_synth", "stage2_stain_warm_synth_seed1",
         "stage2_stain_warm_synth_ts", "stage2_stain_warm_synth_ts_seed1", "stage2_stain_warm_half", "stage2_stain_warm_half_seed1", "stage3_warm", "stage3",
         "stage3_oeem", "stage3_par_oeem"]


def pool(folds: list[dict], classes: ClassSpec) -> dict:
    """Pool each row's confusion matrices (and pseudo-label counts) over the folds into one report."""
    k = classes.num_classes
    report: dict = {}
    for key in ORDER:
        parts = [f["rows"][key] for f in folds if key in f["rows"]]
        if not parts:
            continue
        cm = ConfusionMatrix(classes)
        cm.matrix = np.sum([np.asarray(p["matrix"], np.int64) for p in parts], axis=0)
        iou = cm.iou()
        row = {"title": TITLES[key], "folds": len(parts), "mIoU": _num(cm.miou()),
               "iou": {n: _num(v) for n, v in zip(classes.names, iou, strict=True)},
               "tissue_as_background": tissue_as_background(cm.matrix, k),
               "matrix": cm.matrix.tolist(),
               "train_minutes": (sum(p.get("train_seconds", 0.0) for p in parts) / 60.0 / len(parts)) or None,
               "steps": [p.get("steps") for p in parts]}
        counts = [np.asarray(p["pseudo_counts"], np.int64) for p in parts if "pseudo_counts" in p]
        if counts:
            row["pseudo"] = pseudo_label_quality(np.sum(counts, axis=0), classes)
        report[key] = row
    return report


def format_table(report: dict, classes: ClassSpec) -> str:
    names = list(classes.names)
    head = ("| row | mIoU | " + " | ".join(f"{n} IoU" for n in names) + " | tissue called background | "
            + " | ".join(f"PL {n} P/R" for n in names) + " | train min / fold |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in report.values():
        pseudo = row.get("pseudo")
        pl = [f"{_fmt(pseudo['precision'][n])}/{_fmt(pseudo['recall'][n])}" if pseudo else "" for n in names]
        minutes = "" if not row["train_minutes"] else f"{row['train_minutes']:.1f}"
        lines.append(f"| {row['title']} | {_fmt(row['mIoU'])} | " + " | ".join(_fmt(row["iou"][n]) for n in names)
                     + f" | {row['tissue_as_background']:.1%} | " + " | ".join(pl) + f" | {minutes} |")
    return "\n".join(lines)


def format_confusion(row: dict, classes: ClassSpec) -> str:
    """Row-normalised confusion of tissue pixels (truth rows; predicted tissue classes and background)."""
    names = list(classes.all_names)
    m = np.asarray(row["matrix"], np.float64)[: classes.num_classes]
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    lines = ["| truth \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, n in enumerate(classes.names):
        lines.append(f"| {n} | " + " | ".join(f"{v:.2f}" for v in share[i]) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


# ----------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="the WSSS4LUAD sample (default: ../shared/data/wsss4luad beside the repository)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "wsss4luad_2fold")
    parser.add_argument("--config", default="cpu-small", help="training preset (default: cpu-small)")
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget of every row")
    parser.add_argument("--steps", type=int, default=None, help="a step budget instead of --minutes")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="classification-only steps of the joint rows (default: the preset's, scaled to the "
                             "budget); with --steps, repeat a timed run's warm-up")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 6 steps per row, rows constant,cam,default,stage2 (the shipped recipe: the "
                             "joint model and its segmentation round), 4 scored images per fold")
    parser.add_argument("--rows", default=",".join(ALL_ROWS), help=f"rows to run, of {','.join(ALL_ROWS)}")
    parser.add_argument("--folds", default=",".join(FOLDS), help="even,odd (both are needed for the pooled score)")
    parser.add_argument("--overlap", type=float, default=0.5, help="patchify overlap (more crops per image)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rescore", action="store_true",
                        help="no training: score a finished --out's checkpoints again with the current engine "
                             "(every trained row and the re-scoring rows)")
    parser.add_argument("--fold-worker", choices=FOLDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = args.steps or 6
        if args.rows == ",".join(ALL_ROWS):
            args.rows = "constant,cam,default,stage2,stage2_stain,stage2_stain_warm"
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(args.rows) - set(ALL_ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {ALL_ROWS}")
    val = Path(args.data) / "2.validation"
    if not (val / "img").is_dir() or not (val / "mask").is_dir():
        print(f"error: the WSSS4LUAD sample was not found at {args.data} (expected 2.validation/img and mask). "
              "This benchmark needs the shared data (../shared/data/wsss4luad); pass --data.", file=sys.stderr)
        return 2
    if args.fold_worker:
        (rescore_fold if args.rescore else run_fold)(args, args.fold_worker)
        return 0

    t0 = time.perf_counter()
    folds = [f.strip() for f in args.folds.split(",") if f.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--fold")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, *passthrough, "--folds", fold, "--fold-worker", fold],
                              env=env) for fold in folds]
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"error: a fold failed (exit codes {codes}); see the output above.", file=sys.stderr)
        return 1
    from napari_wsss_cram.core.classes import WSSS4LUAD

    results = [json.loads((args.out / fold / "fold.json").read_text(encoding="utf-8")) for fold in folds]
    report = pool(results, WSSS4LUAD)
    command = " ".join([".venv/bin/python", "benchmarks/wsss4luad_cpu.py", *passthrough])
    table = format_table(report, WSSS4LUAD)
    text = [f"WSSS4LUAD two-fold benchmark ({', '.join(folds)}; crops per fold "
            f"{', '.join(str(r['crops']) for r in results)}), pooled over the folds. Command: `{command}`", "",
            table]
    for key in ("cam", "default", "stage2"):
        if key in report:
            text += ["", f"Row-normalised confusion of tissue pixels, {report[key]['title']}:", "",
                     format_confusion(report[key], WSSS4LUAD)]
    wall = (time.perf_counter() - t0) / 60.0
    text += ["", f"wall time {wall:.1f} min"]
    (args.out / "results.json").write_text(json.dumps({"command": command, "folds": results, "report": report,
                                                       "wall_minutes": wall}, indent=1), encoding="utf-8")
    (args.out / "table.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
