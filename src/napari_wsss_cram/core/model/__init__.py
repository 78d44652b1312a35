"""The WSSS-CRAM network: config, dilated ResNet backbone, DA / attention / DeepLab layers, CRAMNet.

``CRAMNet`` and the tensor helpers are imported on first use: ``ModelConfig`` alone (which the training presets
check) then needs no torch, and the Train dock opens without importing it on napari's GUI thread.
"""

from typing import Any

from .config import ModelConfig

__all__ = ["CRAMNet", "ModelConfig", "to_input_tensor", "to_rgb255"]


def __getattr__(name: str) -> Any:
    if name in ("CRAMNet", "to_input_tensor", "to_rgb255"):
        from . import cram

        return getattr(cram, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
