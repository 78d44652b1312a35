"""Can a stain feature tell tumor from stroma inside the crops labelled with both better than the hematoxylin
density the stain prior uses (``core/stain_prior.py``)? AUC of tumor against stroma pixels over the tissue of the
two-fold benchmark's mixed training crops; their masks (``patches/_masks``, written by ``wsss4luad_cpu.py``) only
score a feature, never fit one, except in the row marked as a ceiling.

    .venv/bin/python benchmarks/stain_prior_features.py --out runs/user30

Rows: stain-invariant versions of the density (no fitting); a logistic regression on 25 stain features fitted
positive-unlabelled (stroma-only crops against the mixed crops), fitted on the density's own confident tails, and,
as a ceiling, fitted with the masks. The fitted rows are fitted on the first half of the mixed crops (sorted by
name, so mostly other images) and scored on the second half, against the density on that half.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

SIGMAS = (4, 8, 12, 24, 48)  # px at 40x: a nucleus to a gland


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Mann-Whitney AUC: the chance that a positive pixel scores above a negative one."""
    values = np.concatenate([positive, negative])
    ranks = values.argsort().argsort().astype(np.float64)
    n = len(positive)
    return float((ranks[:n].sum() - n * (n - 1) / 2) / (n * len(negative)))


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, 128)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def crop_features(rgb: np.ndarray, tissue: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pixel features of one crop: the prior's density, its invariant versions and the 25 stain features."""
    from napari_wsss_cram.core.stain_prior import _UNMIX, hematoxylin_density

    od = -np.log10(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)
    hed = od @ _UNMIX
    raw_h = hed[..., 0]
    h_tissue = raw_h[tissue]
    density = hematoxylin_density(rgb, tissue)
    weight = tissue.astype(np.float32)
    stack = []
    for sigma in SIGMAS:
        norm = np.maximum(gaussian_filter(weight, sigma), 1e-6)

        def smooth(a, sigma=sigma, norm=norm):
            return gaussian_filter(a * weight, sigma) / norm
        h, e = smooth(raw_h), smooth(hed[..., 1])
        stack += [h, e, smooth(raw_h ** 2) - h ** 2, smooth((raw_h > 0.35).astype(np.float32)), norm]
    weight_12 = np.maximum(gaussian_filter(weight, 12), 1e-6)
    return {
        "density": density,
        "density / crop's 95th percentile of H": density / np.quantile(h_tissue, 0.95),
        "density / crop's 99th percentile of H": density / np.quantile(h_tissue, 0.99),
        "nuclear coverage above the crop's Otsu threshold": gaussian_filter(
            (raw_h > _otsu(h_tissue)).astype(np.float32) * weight, 12) / weight_12,
        "density - crop's median H": density - np.median(h_tissue),
        "density / crop's median eosin": density / max(float(np.median(hed[..., 1][tissue])), 1e-3),
        "stack": np.stack(stack, -1),
    }


def _logistic(x: np.ndarray, y: np.ndarray, positive_weight: float = 1.0) -> torch.nn.Linear:
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], 1)
    optimiser = torch.optim.Adam(model.parameters(), 1e-2, weight_decay=1e-4)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    for _ in range(400):
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xt)[:, 0], yt,
                                                                    pos_weight=torch.tensor(positive_weight))
        loss.backward()
        optimiser.step()
    return model


def run_fold(patch_dir: Path, pixels_per_crop: int = 2000, seed: int = 0) -> None:
    from napari_wsss_cram.core.io.png import read_index_png

    rng = np.random.default_rng(seed)
    mixed: dict[str, list[np.ndarray]] = {}
    truth, half, stroma_only = [], [], []
    paths = sorted(patch_dir.glob("*.png"))
    mixed_paths = []
    for path in paths:
        labels = [int(v) for v in re.search(r"\[(.*)\]", path.name).group(1).replace(" ", "").split(",")]
        if labels[0] and labels[1]:
            mixed_paths.append(path)
        elif labels[1] and not labels[0] and not any(labels[2:]):
            stroma_only.append(path)
    for i, path in enumerate([*mixed_paths, *stroma_only]):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        tissue = (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) <= 200
        if tissue.sum() < 50:
            continue
        features = crop_features(rgb, tissue)
        is_mixed = i < len(mixed_paths)
        mask = read_index_png(patch_dir / "_masks" / path.name).ravel() if is_mixed else None
        keep = tissue.ravel() & ((mask == 0) | (mask == 1)) if is_mixed else tissue.ravel()
        index = np.flatnonzero(keep)
        if index.size == 0:
            continue
        index = rng.choice(index, min(pixels_per_crop, index.size), replace=False)
        for name, value in features.items():
            flat = value.reshape(-1, value.shape[-1]) if name == "stack" else value.ravel()
            mixed.setdefault(name if is_mixed else f"stroma-only {name}", []).append(flat[index])
        if is_mixed:
            truth.append(mask[index])
            half.append(np.full(index.size, i < len(mixed_paths) // 2))
    truth_all, first = np.concatenate(truth), np.concatenate(half)
    tumor = truth_all == 0
    print(f"{patch_dir.parent.name} fold: {len(mixed_paths)} mixed crops, {len(stroma_only)} stroma-only crops")
    for name, values in mixed.items():
        if name.startswith("stroma-only") or name == "stack":
            continue
        v = np.concatenate(values)
        print(f"  {name}: AUC {auc(v[tumor], v[~tumor]):.3f}")
    stack = np.concatenate(mixed["stack"])
    stroma_stack = np.concatenate(mixed["stroma-only stack"])
    mean, std = stack.mean(0), stack.std(0) + 1e-6
    density = np.concatenate(mixed["density"])
    second = ~first
    print(f"  on the second half of the mixed crops: density AUC "
          f"{auc(density[second & tumor], density[second & ~tumor]):.3f}")

    def scored(model: torch.nn.Linear) -> float:
        with torch.no_grad():
            s = model(torch.tensor((stack[second] - mean) / std, dtype=torch.float32))[:, 0].numpy()
        t = tumor[second]
        return auc(s[t], s[~t])
    x_pu = np.concatenate([stroma_stack, stack[first]])
    y_pu = np.r_[np.zeros(len(stroma_stack)), np.ones(int(first.sum()))]
    print(f"  25 features, positive-unlabelled (stroma-only vs mixed): AUC "
          f"{scored(_logistic((x_pu - mean) / std, y_pu, len(stroma_stack) / first.sum())):.3f}")
    d_first = density[first]
    low, high = np.quantile(d_first, [0.3, 0.7])
    tails = (d_first < low) | (d_first > high)
    print(f"  25 features fitted on the density's 30% tails: AUC "
          f"{scored(_logistic((stack[first][tails] - mean) / std, (d_first[tails] > high).astype(float))):.3f}")
    print(f"  25 features fitted WITH THE MASKS (a ceiling, not a method): AUC "
          f"{scored(_logistic((stack[first] - mean) / std, tumor[first].astype(float))):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the two-fold benchmark's --out folder (holds <fold>/patches)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for fold in ("even", "odd"):
        run_fold(Path(args.out) / fold / "patches")


if __name__ == "__main__":
    main()
