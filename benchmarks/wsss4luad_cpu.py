"""WSSS4LUAD CPU ablation: the paper's Table 2 on the real sample, from image-level labels only, on a small CPU.

Protocol (issue 4, item 9), all through the project's own code paths:

1. ``patchify`` cuts patches out of validation images 00-20 (``--train-images``) and labels each with the classes
   covering >= 5% of its tissue pixels: the training set holds **image-level labels only** (the mask crops are kept
   aside in ``patches/_masks/`` to measure pseudo-label quality, never trained on).
2. Each ablation row trains a model with the ``cpu-small`` preset and the same step budget:
   CAM only; +DA; +DA+joint; +DA+joint+CRF (the full method); then stage 2, an independent segmentation model
   trained on the full model's pseudo-labels (``make_pseudo_labels`` + ``train --stage2``).
3. Every row is scored on the pixel masks of validation images 21-30 (``--test-images``) with THE metric
   (``core.metrics.ConfusionMatrix``: one matrix over all images, background pixels left out), predicted by the
   inference engine at the training scale. Rows without joint training have no trained segmentation head, so
   their score is the arg-max of their activation maps (the engine's ``cam`` output); joint rows are scored by
   the segmentation head (what ``wsss-cram evaluate`` does), their maps are shown beside it.
4. The pseudo-label quality of every stage-1 row is measured on the training patches against their masks:
   precision of the confident (non-255) pixels and the share of pixels left at 255.
5. The nearest-colour baseline (``benchmarks/nearest_colour.py``) is fitted on the masks of the training images.

Usage (from the repository root)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/wsss4luad_cpu.py --out runs/wsss4luad_cpu
    .venv/bin/python benchmarks/wsss4luad_cpu.py --quick --out runs/wsss4luad_smoke   # 20 steps per row

Tuning without touching the test images: ``--train-images 00-15 --test-images 16-20``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nearest_colour import fit_colour_lookup, image_names, score_colour_lookup  # noqa: E402

from napari_wsss_cram.core.classes import IGNORE_INDEX, ClassSpec  # noqa: E402
from napari_wsss_cram.core.metrics import ConfusionMatrix  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "wsss4luad"

#: (key, title, ModelConfig overrides); stage 2 is added after them
STAGE1_ROWS = [
    ("cam", "CAM only", {"use_da": False, "use_joint": False, "use_crf": False}),
    ("da", "+DA", {"use_da": True, "use_joint": False, "use_crf": False}),
    ("da_joint", "+DA+joint", {"use_da": True, "use_joint": True, "use_crf": False}),
    ("full", "+DA+joint+CRF", {"use_da": True, "use_joint": True, "use_crf": True}),
]
STAGE2 = ("stage2", "stage 2 (seg model on full's pseudo-labels)")
ALL_ROWS = [key for key, _, _ in STAGE1_ROWS] + [STAGE2[0]]


# ----------------------------------------------------------------------------------------------- scoring

def present_miou(cm: ConfusionMatrix) -> float:
    """Mean IoU over the tissue classes that occur in the ground truth (the test masks 21-30 hold no normal
    tissue, so THE mIoU counts normal as 0 as soon as one pixel is predicted normal)."""
    k = cm.classes.num_classes
    present = cm.matrix[:k].sum(axis=1) > 0
    iou = cm.iou()[present]
    return float(np.nanmean(iou)) if iou.size else float("nan")


def cm_summary(cm: ConfusionMatrix) -> dict:
    out = cm.to_dict()
    out["mIoU_present"] = present_miou(cm)
    return out


def image_level_labels(mask: np.ndarray, classes: ClassSpec, min_frac: float = 0.05) -> np.ndarray:
    """The image-level labels a mask implies (same 5%-of-tissue rule as patchify)."""
    from napari_wsss_cram.core.data.patchify import patch_labels

    return np.asarray(patch_labels(mask, classes, min_frac)[0], dtype=bool)


def score_model(model, info, test_index, scale: float, with_seg: bool) -> dict[str, ConfusionMatrix]:
    """Run the inference engine once per test image; score the seg head (``seg``), the arg-max of the
    activation maps (``maps``) and the maps with absent classes zeroed by the mask's image-level labels
    (``maps_oracle``: the usual WSSS convention for map quality, which leaks labels: shown, never compared)."""
    from napari_wsss_cram.core.data.pixel import load_pixel_sample
    from napari_wsss_cram.core.inference import PredictSettings, predict_array
    from napari_wsss_cram.core.progress import drive

    classes = test_index.classes
    k = classes.num_classes
    cms = {"maps": ConfusionMatrix(classes), "maps_oracle": ConfusionMatrix(classes)}
    if with_seg:
        cms["seg"] = ConfusionMatrix(classes)
    settings = PredictSettings(scale=scale, device="cpu", with_probs=False, with_cam=model.has_pseudo_branch)
    for sample in test_index.samples:
        rgb, mask = load_pixel_sample(sample, classes)
        prediction = drive(predict_array(model, info, rgb, settings))
        if with_seg:
            cms["seg"].update(np.asarray(prediction.labels), mask)
        if prediction.cam is None:
            cms.pop("maps", None)
            cms.pop("maps_oracle", None)
        else:
            cam = np.asarray(prediction.cam).astype(np.float32)
            cms["maps"].update(cam.argmax(0).astype(np.uint8), mask)
            present = image_level_labels(mask, classes)
            cam[:k][~present] = -1.0
            cms["maps_oracle"].update(cam.argmax(0).astype(np.uint8), mask)
        prediction.cleanup()
    return cms


def constant_majority_baseline(train_index, test_index) -> dict:
    """Every pixel gets the tissue class most common in the training masks: the floor below the colour lookup."""
    from napari_wsss_cram.core.data.pixel import load_mask

    classes = train_index.classes
    counts = np.zeros(classes.num_outputs, np.int64)
    for sample in train_index.samples:
        counts += np.bincount(load_mask(sample, classes).ravel(), minlength=256)[:classes.num_outputs]
    majority = int(counts[:classes.num_classes].argmax())
    cm = ConfusionMatrix(classes)
    for sample in test_index.samples:
        mask = load_mask(sample, classes)
        cm.update(np.full(mask.shape, majority, np.uint8), mask)
    return {"key": "constant", "title": f"constant '{classes.names[majority]}' (majority tissue class)",
            "scores": cm_summary(cm)}


def pseudo_label_quality(pseudo_dir: Path, patch_dir: Path, classes: ClassSpec) -> dict:
    """Pseudo-labels (``pseudo_dir/mask/*.png``) against the mask crops kept by patchify (``_masks/``):
    precision of the confident pixels (all classes, and tissue classes alone), share of pixels at 255, and
    per-class precision / recall of the confident pixels."""
    from napari_wsss_cram.core.data.patchify import MASKS_SUBDIR
    from napari_wsss_cram.core.io.outputs import read_index_png

    n = classes.num_outputs
    joint = np.zeros((n, n + 1), np.int64)  # rows: truth 0..K; columns: pseudo 0..K, then 255
    for path in sorted((pseudo_dir / "mask").glob("*.png")):
        pseudo = read_index_png(path)
        truth = read_index_png(patch_dir / MASKS_SUBDIR / path.name)
        keep = truth != IGNORE_INDEX
        t = truth[keep].astype(np.int64)
        p = pseudo[keep].astype(np.int64)
        p = np.where(p == IGNORE_INDEX, n, p)
        joint += np.bincount(t * (n + 1) + p, minlength=n * (n + 1)).reshape(n, n + 1)
    total = joint.sum()
    confident = joint[:, :n]
    k = classes.num_classes
    tissue_conf = confident[:k]
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class_precision = np.diag(confident) / confident.sum(axis=0)
        per_class_recall = np.diag(confident) / joint.sum(axis=1)
    return {
        "pixels": int(total),
        "ignored_share": float(joint[:, n].sum() / max(1, total)),
        "precision": float(np.trace(confident) / max(1, confident.sum())),
        "tissue_ignored_share": float(joint[:k, n].sum() / max(1, joint[:k].sum())),
        "tissue_precision": float(np.trace(tissue_conf[:, :k]) / max(1, tissue_conf.sum())),
        "per_class_precision": {c: _num(v) for c, v in zip(classes.all_names, per_class_precision, strict=True)},
        "per_class_recall": {c: _num(v) for c, v in zip(classes.all_names, per_class_recall, strict=True)},
        "confusion_with_ignore": joint.tolist(),
    }


def _num(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)


# ----------------------------------------------------------------------------------------------- training

def _row_config(args, patch_dir: Path, out: Path, model_overrides: dict, stage2_pseudo: Path | None = None):
    from napari_wsss_cram.core.train_config import TrainConfig, load_config

    data = load_config(args.config).to_dict()
    data["model"] = {**data["model"], **model_overrides}
    data.update(out=str(out), seed=args.seed, val=None)
    if args.budget_steps is not None:
        data["steps"] = args.budget_steps
    if args.threads is not None:
        data["threads"] = args.threads
    if stage2_pseudo is not None:
        data.update(stage2=True, pseudo=str(stage2_pseudo), data="")
    else:
        data["data"] = str(patch_dir)
    return TrainConfig.from_dict(data)


def _printer(title: str):
    last = [0.0]

    def callback(event) -> None:
        now = time.perf_counter()
        if event.stage == "data":
            print(f"  [{title}] {event.info.get('summary', '')}".replace("\n", "\n  "), flush=True)
        elif event.stage == "train" and (now - last[0] > 30 or event.done == event.total):
            last[0] = now
            losses = " ".join(f"{k}={v:.3f}" for k, v in event.info.get("losses", {}).items())
            print(f"  [{title}] step {event.done}/{event.total} {losses} eta {event.info.get('eta', 0):.0f}s",
                  flush=True)

    return callback


def run_row(args, key: str, title: str, config, test_index, patch_dir: Path) -> dict:
    from napari_wsss_cram.core.checkpoint import load_checkpoint
    from napari_wsss_cram.core.progress import drive
    from napari_wsss_cram.core.train import make_pseudo_labels, train

    row_dir = Path(config.out)
    if row_dir.exists():
        shutil.rmtree(row_dir)
    t0 = time.perf_counter()
    checkpoint = train(config, _printer(title))
    train_s = time.perf_counter() - t0
    model, info = load_checkpoint(checkpoint)
    t1 = time.perf_counter()
    with_seg = config.stage2 or bool(config.model.get("use_joint", True))
    cms = score_model(model, info, test_index, config.mean_scale, with_seg)
    result = {"key": key, "title": title, "checkpoint": str(checkpoint), "train_seconds": train_s,
              "steps": config.steps, "scale": config.mean_scale,
              "scores": {name: cm_summary(cm) for name, cm in cms.items()}}
    if not config.stage2:
        pseudo_dir = row_dir / "pseudo"
        drive(make_pseudo_labels(checkpoint, patch_dir, pseudo_dir, scale=config.mean_scale, device="cpu",
                                 overwrite=True))
        result["pseudo_dir"] = str(pseudo_dir)
        result["pseudo"] = pseudo_label_quality(pseudo_dir, patch_dir, test_index.classes)
    result["eval_seconds"] = time.perf_counter() - t1
    return result


# ----------------------------------------------------------------------------------------------- report

def _fmt(v) -> str:
    return "  n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def format_table(results: dict) -> str:
    """Markdown tables: the ablation (primary score per row), the maps of every stage-1 row, pseudo-labels."""
    names = results["classes"]
    lines = ["| row | scored output | mIoU | mIoU (classes in test masks) | "
             + " | ".join(f"{n} IoU" for n in names) + " | pseudo-label precision | pseudo-label 255 share "
             "| train s |",
             "|---" * (7 + len(names) - 3 + 3) + "|"]
    for base in results["baselines"]:
        s = base["scores"]
        how = "fitted on masks (full supervision)" if base["key"].startswith("colour") else "training masks' class shares"
        lines.append(f"| {base['title']} | {how} | {_fmt(s['mIoU'])} | "
                     f"{_fmt(s['mIoU_present'])} | " + " | ".join(_fmt(s["per_class"][n]) for n in names)
                     + " | | | |")
    for row in results["rows"]:
        output = "seg" if "seg" in row["scores"] else "maps"
        s = row["scores"][output]
        pseudo = row.get("pseudo") or {}
        label = "segmentation head" if output == "seg" else "arg-max of activation maps"
        lines.append(f"| {row['title']} | {label} | {_fmt(s['mIoU'])} | {_fmt(s['mIoU_present'])} | "
                     + " | ".join(_fmt(s["per_class"][n]) for n in names)
                     + f" | {_fmt(pseudo.get('precision'))} | {_fmt(pseudo.get('ignored_share'))} | "
                     f"{row['train_seconds']:.0f} |")
    lines += ["", "Activation maps of the stage-1 rows (label-free arg-max; and with absent classes zeroed by the "
              "test masks' image-level labels, which leaks those labels and is for reading only):", "",
              "| row | maps mIoU | maps mIoU (classes in test) | " + " | ".join(names)
              + " | oracle-label maps mIoU (classes in test) | " + " | ".join(f"oracle {n}" for n in names) + " |",
              "|---" * (4 + 2 * len(names)) + "|"]
    for row in results["rows"]:
        if "maps" not in row["scores"]:
            continue
        m, o = row["scores"]["maps"], row["scores"]["maps_oracle"]
        lines.append(f"| {row['title']} | {_fmt(m['mIoU'])} | {_fmt(m['mIoU_present'])} | "
                     + " | ".join(_fmt(m["per_class"][n]) for n in names) + f" | {_fmt(o['mIoU_present'])} | "
                     + " | ".join(_fmt(o["per_class"][n]) for n in names) + " |")
    all_names = names + ["background"]
    lines += ["", "Pseudo-labels of the training patches (the joint branch's reliable labels, at the training scale) "
              "against their masks: precision of confident pixels, share left at 255, per-class precision / "
              "recall:", "",
              "| row | precision | 255 share | tissue precision | tissue 255 share | "
              + " | ".join(f"{n} P/R" for n in all_names) + " |", "|---" * (5 + len(all_names)) + "|"]
    for row in results["rows"]:
        p = row.get("pseudo")
        if not p:
            continue
        lines.append(f"| {row['title']} | {_fmt(p['precision'])} | {_fmt(p['ignored_share'])} | "
                     f"{_fmt(p['tissue_precision'])} | {_fmt(p['tissue_ignored_share'])} | "
                     + " | ".join(f"{_fmt(p['per_class_precision'][n])}/{_fmt(p['per_class_recall'][n])}"
                                  for n in all_names) + " |")
    return "\n".join(lines)


def verdict(results: dict) -> str:
    rows = {r["key"]: r for r in results["rows"]}
    if "cam" not in rows or "full" not in rows:
        return ""
    cam = rows["cam"]["scores"]["maps"]
    full = rows["full"]["scores"]["seg"]
    gap = full["mIoU"] - cam["mIoU"]
    gap_p = full["mIoU_present"] - cam["mIoU_present"]
    ok = "meets" if gap >= 0.05 else "does NOT meet"
    return (f"Full method (+DA+joint+CRF, seg head) minus CAM only: {gap:+.3f} mIoU ({gap_p:+.3f} over the classes "
            f"in the test masks): {ok} the >= 0.05 target.")


# ----------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="the WSSS4LUAD sample (default: ../shared/data/wsss4luad beside the repository)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "wsss4luad_cpu",
                        help="run folder (patches, one sub-folder per row, results.json, table.md)")
    parser.add_argument("--config", default="cpu-small", help="training preset (default: cpu-small)")
    parser.add_argument("--budget-steps", type=int, default=None,
                        help="optimiser steps per row (default: the preset's `steps`)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps per row")
    parser.add_argument("--rows", default=",".join(ALL_ROWS), help=f"rows to run, of {','.join(ALL_ROWS)}")
    parser.add_argument("--train-images", default="00-20", help="validation images cut into training patches")
    parser.add_argument("--test-images", default="21-30", help="validation images whose masks are scored")
    parser.add_argument("--patch-size", default="96-160", help="patch side range in px for patchify")
    parser.add_argument("--patch-overlap", type=float, default=0.5, help="patchify overlap (more patches)")
    parser.add_argument("--min-frac", type=float, default=0.05, help="share of tissue that makes a label")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick and args.budget_steps is None:
        args.budget_steps = 20
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ALL_ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {ALL_ROWS}")
    if "stage2" in rows and "full" not in rows:
        parser.error("stage2 needs the full row's pseudo-labels: add 'full' to --rows")

    val = Path(args.data) / "2.validation"
    if not (val / "img").is_dir() or not (val / "mask").is_dir():
        print(f"error: the WSSS4LUAD sample was not found at {args.data} (expected 2.validation/img and mask). "
              "This benchmark needs the shared data (../shared/data/wsss4luad); pass --data.", file=sys.stderr)
        return 2

    from napari_wsss_cram.core.data.patchify import patchify
    from napari_wsss_cram.core.data.pixel import discover_pixel_dataset

    t_start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    dataset = discover_pixel_dataset(val)
    train_names, test_names = image_names(args.train_images), image_names(args.test_images)
    if set(train_names) & set(test_names):
        parser.error("--train-images and --test-images overlap")
    train_index, test_index = dataset.subset(train_names), dataset.subset(test_names)
    classes = dataset.classes

    smin, smax = (int(v) for v in args.patch_size.split("-")) if "-" in args.patch_size else (int(args.patch_size),) * 2
    patch_dir = out / "patches"
    cut = patchify(train_index, patch_dir, min_frac=args.min_frac, size=(smin, smax), overlap=args.patch_overlap,
                   seed=args.seed, keep_masks=True, overwrite=True)
    from napari_wsss_cram.core.data.patches import discover_patches

    print(f"patchify: images {args.train_images} -> {len(cut.paths)} patches of {args.patch_size} px "
          f"(overlap {args.patch_overlap}, labels: classes >= {args.min_frac:.0%} of tissue)")
    print("  " + discover_patches(patch_dir).summary().replace("\n", "\n  "), flush=True)

    results: dict = {"started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "data": str(args.data), "train_images": args.train_images, "test_images": args.test_images,
                     "config": args.config, "patches": len(cut.paths), "patch_size": args.patch_size,
                     "patch_overlap": args.patch_overlap, "classes": list(classes.names), "baselines": [],
                     "rows": []}

    majority = constant_majority_baseline(train_index, test_index)
    results["baselines"].append(majority)
    print(f"baseline {majority['title']}: mIoU {majority['scores']['mIoU']:.3f}", flush=True)
    lookup = fit_colour_lookup(train_index)
    for name, cm in score_colour_lookup(lookup, test_index).items():
        title = {"mean": "nearest mean colour", "histogram": "colour lookup (16^3 RGB cells)"}[name]
        results["baselines"].append({"key": f"colour_{name}", "title": title, "scores": cm_summary(cm)})
        print(f"baseline {title}: mIoU {cm.miou():.3f}, over classes in test {present_miou(cm):.3f}", flush=True)

    for key, title, overrides in STAGE1_ROWS:
        if key not in rows:
            continue
        config = _row_config(args, patch_dir, out / key, overrides)
        print(f"== {title}: {config.steps} steps, crop {config.crop}, scale {config.scale_min}-{config.scale_max}, "
              f"{config.model.get('backbone')}", flush=True)
        result = run_row(args, key, title, config, test_index, patch_dir)
        results["rows"].append(result)
        _print_row(result)
    if "stage2" in rows:
        full = next(r for r in results["rows"] if r["key"] == "full")
        config = _row_config(args, patch_dir, out / "stage2", {}, stage2_pseudo=Path(full["pseudo_dir"]))
        print(f"== {STAGE2[1]}: {config.steps} steps", flush=True)
        result = run_row(args, *STAGE2, config, test_index, patch_dir)
        results["rows"].append(result)
        _print_row(result)

    results["wall_seconds"] = time.perf_counter() - t_start
    results["command"] = " ".join([Path(sys.executable).name, "benchmarks/wsss4luad_cpu.py", *(argv or sys.argv[1:])])
    table = format_table(results)
    note = verdict(results)
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    (out / "table.md").write_text(table + "\n\n" + note + "\n", encoding="utf-8")
    print()
    print(f"WSSS4LUAD CPU ablation: train on patches of images {args.train_images}, score masks {args.test_images}")
    print(table)
    if note:
        print()
        print(note)
    print(f"\nwall time {results['wall_seconds'] / 60:.1f} min; results in {out / 'results.json'}")
    return 0


def _print_row(result: dict) -> None:
    for name, s in result["scores"].items():
        per = ", ".join(f"{k} {_fmt(v)}" for k, v in s["per_class"].items())
        print(f"  {result['title']} [{name}]: mIoU {_fmt(s['mIoU'])} (in-test {_fmt(s['mIoU_present'])}); {per}")
    if "pseudo" in result:
        p = result["pseudo"]
        print(f"  pseudo-labels: precision {p['precision']:.3f}, 255 share {p['ignored_share']:.3f}, "
              f"tissue precision {p['tissue_precision']:.3f}")
    print(f"  train {result['train_seconds']:.0f} s, eval {result['eval_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
