"""CRAMNet: shared dilated ResNet + pseudo-label branch (DA layer, collaborative classifier) + DeepLab v3 head.

Stage 1 (``config.stage == 1``) trains everything jointly from image-level labels; at inference only the
backbone and the segmentation head run (:meth:`CRAMNet.segment`, the paper's independent inference module).
Stage 2 builds the same encoder-decoder without the pseudo-label branch, trained seg-only on saved labels.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..classes import ClassSpec
from .backbone import ResNetBackbone, init_backbone_weights
from .config import ModelConfig
from .layers import CollaborativeClassifier, DiscriminativeActivation, PlainCAM, SegmentationHead


def to_input_tensor(rgb: np.ndarray | torch.Tensor, config: ModelConfig,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 RGB (H, W, 3) or (B, H, W, 3) -> normalised float (B, 3, H, W) as the network expects."""
    # a read-only array (a zarr 3 / tifffile region, a PNG read by Pillow) is copied: torch warns on every one
    tensor = torch.as_tensor(np.require(rgb, requirements=["C", "W"]) if isinstance(rgb, np.ndarray) else rgb)
    if tensor.dtype != torch.uint8:
        raise ValueError(f"to_input_tensor expects uint8 RGB, got {tensor.dtype}.")
    if tensor.ndim == 3:
        tensor = tensor[None]
    if tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"to_input_tensor expects (H, W, 3) or (B, H, W, 3), got {tuple(tensor.shape)}.")
    tensor = tensor.to(device) if device is not None else tensor
    x = tensor.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(config.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def to_rgb255(x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Inverse of :func:`to_input_tensor` as float RGB in 0..255, (B, 3, H, W) (for the energy loss)."""
    mean = torch.tensor(config.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x * std + mean) * 255.0).clamp(0.0, 255.0)


class CRAMNet(nn.Module):
    """WSSS-CRAM network for ``classes`` (K tissue classes; outputs K+1 channels, background last)."""

    def __init__(self, classes: ClassSpec, config: ModelConfig | None = None,
                 weights: str | os.PathLike | None = "auto") -> None:
        super().__init__()
        self.classes = classes
        self.config = config or ModelConfig()
        cfg = self.config
        k = classes.num_classes
        self.backbone = ResNetBackbone(cfg.backbone, cfg.output_stride)
        channels = self.backbone.out_channels
        self.da: DiscriminativeActivation | None = None
        self.cls_head: CollaborativeClassifier | None = None
        self.plain_cam: PlainCAM | None = None
        if cfg.stage == 1:
            if cfg.use_da:
                self.da = DiscriminativeActivation(channels, k + 1)
                self.cls_head = CollaborativeClassifier(
                    channels, k, dim=cfg.attention_dim, heads=cfg.attention_heads,
                    layers=cfg.attention_layers, use_attention=cfg.use_attention, pool=cfg.attention_pool)
            else:
                self.plain_cam = PlainCAM(channels, k)
        rates = cfg.aspp_rates if cfg.output_stride == 8 else tuple(max(1, r // 2) for r in cfg.aspp_rates)
        self.seg_head = SegmentationHead(channels, k + 1, rates, cfg.aspp_channels)
        self.weights_source = init_backbone_weights(self.backbone, weights)

    @property
    def has_pseudo_branch(self) -> bool:
        """False for stage-2 models, which hold only backbone + segmentation head."""
        return self.da is not None or self.plain_cam is not None

    def normalize(self, rgb: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB (B, H, W, 3) -> normalised input on this model's device."""
        return to_input_tensor(rgb, self.config, device=next(self.parameters()).device)

    def _pseudo_branch(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.da is not None:
            maps = self.da(features)
            return self.cls_head(features, maps), maps
        return self.plain_cam(features)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training forward. Returns ``cam`` (B, K+1, h, w) activation maps, ``logits`` (B, K) image logits
        and ``seg`` (B, K+1, H, W) segmentation logits at input size. Stage 2 returns ``seg`` only.
        ``labels`` is accepted for API symmetry; the classifier scores every class.
        """
        features = self.backbone(x)
        out = {"seg": self._upsample(self.seg_head(features), x)}
        if self.has_pseudo_branch:
            out["logits"], out["cam"] = self._pseudo_branch(features)
        return out

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Independent inference module: backbone + seg head -> logits (B, K+1, H, W) at input size."""
        return self._upsample(self.seg_head(self.backbone(x)), x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inference: (softmax of the seg head, activation maps), both (B, K+1, H, W) at input size.

        The maps are None for stage-2 models (no pseudo-label branch). Call ``model.eval()`` first.
        """
        features = self.backbone(x)
        seg_probs = self._upsample(self.seg_head(features), x).softmax(dim=1)
        cam = None
        if self.da is not None:
            cam = self._upsample(self.da(features), x)
        elif self.plain_cam is not None:
            cam = self._upsample(self.plain_cam(features)[1], x)
        return seg_probs, cam

    @torch.no_grad()
    def predict_with_presence(self, x: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Inference with class presence: (probabilities (B, K+1, H, W), maps or None, presence (B, K) or None).

        ``presence`` is the image-level classifier's sigmoid, each image scored alone (the collaborative
        attention would otherwise mix the tiles of one batch). A stage-1 model trained without joint training
        (the CAM-only and +DA ablations) has an untrained segmentation head: its probabilities are its
        activation maps, normalised over classes. Stage-2 models have neither maps nor presence.
        """
        features = self.backbone(x)
        cam = presence = None
        if self.da is not None:
            maps = self.da(features)
            logits = torch.cat([self.cls_head(features[i:i + 1], maps[i:i + 1]) for i in range(len(x))])
            presence, cam = logits.sigmoid(), self._upsample(maps, x)
        elif self.plain_cam is not None:
            logits, maps = self.plain_cam(features)
            presence, cam = logits.sigmoid(), self._upsample(maps, x)
        if cam is not None and not self.config.use_joint:
            # DA maps are L2-normalised (squares sum to 1); plain-CAM maps are max-normalised per class
            weights = cam.float().square() if self.da is not None else cam.float().clamp_min(0.0)
            probs = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-6)
        else:
            probs = self._upsample(self.seg_head(features), x).softmax(dim=1)
        return probs, cam, presence

    @staticmethod
    def _upsample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def parameter_groups(self) -> list[dict]:
        """Backbone (pretrained) and new layers, for a higher learning rate on the latter (``lr_mult``)."""
        backbone = list(self.backbone.parameters())
        ids = {id(p) for p in backbone}
        head = [p for p in self.parameters() if id(p) not in ids]
        return [{"params": backbone, "lr_mult": 1.0, "name": "backbone"},
                {"params": head, "lr_mult": 10.0, "name": "heads"}]
