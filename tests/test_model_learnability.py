"""Learnability: the full joint WSSS-CRAM model (DA + batch attention + reliable CRF pseudo-labels + energy
loss + DeepLab head), trained from image-level labels only on synthetic tissue patches, makes its
*segmentation branch* segment pixels far better than chance.

Synthetic patches are made here (a few Voronoi regions of three tissue textures and white glass) so the test
does not depend on the sample generator.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.crf import CRFParams
from napari_wsss_cram.core.losses import joint_loss
from napari_wsss_cram.core.metrics import ConfusionMatrix
from napari_wsss_cram.core.model import CRAMNet, ModelConfig, to_input_tensor
from napari_wsss_cram.core.pseudo_labels import batch_pseudo_labels

SIZE = 64
# tumor: dark purple, dense nuclei; stroma: pink; normal: orange-pink (gray ~166, under the 200 tissue prior); background: near-white glass
COLOURS = np.array([(95, 45, 140), (225, 110, 160), (220, 150, 110), (248, 248, 248)], dtype=np.float32)


def make_synthetic_patch(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 (size, size, 3) and mask (size, size) in 0..3 from 1-3 Voronoi regions."""
    n_regions = rng.integers(1, 4)
    seeds = rng.uniform(0, size, (n_regions, 2))
    region_class = rng.choice(4, n_regions, p=[0.3, 0.3, 0.25, 0.15])
    ys, xs = np.mgrid[:size, :size]
    nearest = np.argmin((ys[..., None] - seeds[:, 0]) ** 2 + (xs[..., None] - seeds[:, 1]) ** 2, axis=-1)
    mask = region_class[nearest].astype(np.uint8)
    rgb = COLOURS[mask] + rng.normal(0, 12, (size, size, 3))
    dots = (rng.random((size, size)) < 0.08) & (mask < 3)  # nuclei-like dark dots on tissue
    rgb[dots] *= 0.6
    return np.clip(rgb, 0, 255).astype(np.uint8), mask


def image_labels(mask: np.ndarray, k: int = 3) -> np.ndarray:
    """Image-level labels: tissue classes covering at least 5% of the tissue pixels (WSSS4LUAD protocol)."""
    tissue = mask < k
    counts = np.bincount(mask[tissue], minlength=k)[:k]
    return (counts >= 0.05 * max(1, tissue.sum())).astype(np.float32)


def seg_miou(model: CRAMNet, images: np.ndarray, masks: np.ndarray) -> float:
    cm = ConfusionMatrix(WSSS4LUAD)
    model.eval()
    with torch.no_grad():
        seg_probs, _ = model.predict(to_input_tensor(images, model.config))
    for pred, mask in zip(seg_probs.argmax(1).numpy(), masks, strict=True):
        cm.update(pred, mask)
    model.train()
    return cm.miou()


@pytest.mark.slow
def test_joint_model_segmentation_branch_learns_from_image_labels():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # Small and short: resnet18 from random weights (no ImageNet offline), 64 px at output stride 16
    # (dilated 3x3 convs on 8x8 maps would mostly see padding), beta 0.8 and a light energy because the
    # maps of a 150-step random-init model rarely pass 0.9; the rest is the full joint method.
    cfg = ModelConfig(backbone="resnet18", output_stride=16, aspp_channels=32, attention_dim=32,
                      aspp_rates=(2, 4, 6), beta=0.8, energy_weight=1.0)
    model = CRAMNet(WSSS4LUAD, cfg, weights=None)
    test = [make_synthetic_patch(rng) for _ in range(24)]
    test_images = np.stack([t[0] for t in test])
    test_masks = np.stack([t[1] for t in test])
    chance = seg_miou(model, test_images, test_masks)

    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    crf = CRFParams() if cfg.use_crf else None
    steps, warmup, batch = 120, 30, 8  # warm-up: classification (+ background prior) only
    started = time.perf_counter()
    for step in range(steps):
        patches = [make_synthetic_patch(rng) for _ in range(batch)]
        images = np.stack([p[0] for p in patches])
        labels = torch.from_numpy(np.stack([image_labels(p[1]) for p in patches]))
        x = to_input_tensor(images, cfg)
        out = model(x)
        pseudo = batch_pseudo_labels(out["cam"], images, labels, cfg.alpha, cfg.beta, crf, cfg.tissue_threshold)
        pseudo_t = torch.from_numpy(pseudo).long() if step >= warmup else None
        loss, _terms = joint_loss(out, labels, pseudo_t, x, cfg)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    elapsed = time.perf_counter() - started
    miou = seg_miou(model, test_images, test_masks)
    print(f"seg-branch mIoU {miou:.3f} (untrained {chance:.3f}) after {steps} steps in {elapsed:.0f} s")
    # Measured (2 shared cores): 0.27 vs 0.09 untrained (150 steps), 0.26 at 120. Chance-level guessing stays near 0.1.
    assert miou > chance + 0.1
