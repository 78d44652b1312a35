"""Datasets (image-level patches, pixel-labelled sets), augmentation and patchify; torch-free."""

from .augment import AugmentConfig, augment
from .patches import PatchDataset, PatchIndex, discover_patches, parse_patch_name
from .pixel import PixelDataset, PixelIndex, PixelSample, discover_pixel_dataset, load_mask, load_pixel_sample

__all__ = [
    "AugmentConfig", "augment", "PatchDataset", "PatchIndex", "discover_patches", "parse_patch_name",
    "PixelDataset", "PixelIndex", "PixelSample", "discover_pixel_dataset", "load_mask", "load_pixel_sample",
]
