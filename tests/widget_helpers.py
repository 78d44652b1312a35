"""Helpers shared by the plugin tests: a tiny random-init checkpoint and small H&E-like images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_wsss_cram.core.classes import WSSS4LUAD, ClassSpec


def make_tiny_checkpoint(path: Path, classes: ClassSpec = WSSS4LUAD) -> Path:
    """A random-init resnet18 WSSS-CRAM checkpoint written by the real save_checkpoint (fast to run on CPU)."""
    import torch

    from napari_wsss_cram.core.checkpoint import save_checkpoint
    from napari_wsss_cram.core.model.config import ModelConfig
    from napari_wsss_cram.core.model.cram import CRAMNet

    torch.manual_seed(0)
    config = ModelConfig(backbone="resnet18", aspp_channels=16, attention_dim=16, aspp_rates=(2, 4))
    model = CRAMNet(classes, config, weights=None).eval()
    return save_checkpoint(path, model)


def he_like_image(size: int = 96, seed: int = 0) -> np.ndarray:
    """A small RGB image with a purple (tumor-like), a pink (stroma-like) and a white (glass) region."""
    try:
        from napari_wsss_cram.core.sample import make_patch

        rgb, _ = make_patch(seed, size, (0, 1))
        return np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    except ImportError:
        rng = np.random.default_rng(seed)
        rgb = np.full((size, size, 3), 245, np.uint8)
        rgb[: size // 2, : size // 2] = (110, 60, 150)
        rgb[size // 2:, : size // 2] = (220, 140, 180)
        noise = rng.integers(-12, 12, rgb.shape)
        return np.clip(rgb.astype(int) + noise, 0, 255).astype(np.uint8)
