"""The WSSS-CRAM network: config, dilated ResNet backbone, DA / attention / DeepLab layers, CRAMNet."""

from .config import ModelConfig
from .cram import CRAMNet, to_input_tensor, to_rgb255

__all__ = ["CRAMNet", "ModelConfig", "to_input_tensor", "to_rgb255"]
