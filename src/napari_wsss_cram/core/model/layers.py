"""WSSS-CRAM layers: the Discriminative Activation (DA) layer, the batch collaborative attention classifier,
the plain-CAM classifier used for the ablation, and the DeepLab v3 segmentation head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..._torchvision import import_torchvision


class DiscriminativeActivation(nn.Module):
    """A 3x3 conv to K+1 maps, L2-normalised across channels at each pixel, then absolute value (EDAM).

    The result M (B, K+1, h, w) lies in [0, 1] with sum_k M_k^2 = 1 at each pixel: the channels compete,
    so a pixel that belongs to no present class is pushed into the explicit background channel (index K).
    """

    def __init__(self, in_channels: int, num_outputs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_outputs, 3, padding=1, bias=False)
        nn.init.xavier_uniform_(self.conv.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.conv(features), p=2, dim=1).abs()


class PlainCAM(nn.Module):
    """Ablation baseline: a 1x1 class conv whose GAP gives the image logits (Zhou et al. CAM).

    Maps are ReLU'd and max-normalised per image and class; the background channel is 1 - max_k map_k,
    so the output keeps the K+1 layout of the DA layer without learning a background.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(in_channels, num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.classifier(features)
        logits = raw.mean(dim=(2, 3))
        cam = F.relu(raw)
        cam = cam / cam.amax(dim=(2, 3), keepdim=True).clamp(min=1e-5)
        background = 1.0 - cam.amax(dim=1, keepdim=True)
        return logits, torch.cat([cam, background], dim=1)


class PerClassLinear(nn.Module):
    """K independent linear maps applied in one batched einsum: (K, T, in) -> (K, T, out)."""

    def __init__(self, num_groups: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_groups, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(num_groups, 1, out_features))
        nn.init.xavier_uniform_(self.weight.view(num_groups * in_features, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ktd,kde->kte", x, self.weight) + self.bias


class PerClassTransformerBlock(nn.Module):
    """A pre-norm transformer block with separate weights per class (EDAM keeps one block per class)."""

    def __init__(self, num_classes: int, dim: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1_weight = nn.Parameter(torch.ones(num_classes, 1, dim))
        self.norm1_bias = nn.Parameter(torch.zeros(num_classes, 1, dim))
        self.norm2_weight = nn.Parameter(torch.ones(num_classes, 1, dim))
        self.norm2_bias = nn.Parameter(torch.zeros(num_classes, 1, dim))
        self.qkv = PerClassLinear(num_classes, dim, 3 * dim)
        self.proj = PerClassLinear(num_classes, dim, dim)
        self.ff1 = PerClassLinear(num_classes, dim, 4 * dim)
        self.ff2 = PerClassLinear(num_classes, 4 * dim, dim)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:]) * weight + bias

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (K, T, D): for each class, the T tokens of all images in the batch together."""
        k, t, d = tokens.shape
        q, key, v = self.qkv(self._norm(tokens, self.norm1_weight, self.norm1_bias)).chunk(3, dim=-1)
        q, key, v = (z.view(k, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, key, v))
        drop = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, key, v, dropout_p=drop)
        tokens = tokens + F.dropout(self.proj(attended.transpose(1, 2).reshape(k, t, d)), drop, self.training)
        hidden = F.gelu(self.ff1(self._norm(tokens, self.norm2_weight, self.norm2_bias)))
        return tokens + F.dropout(self.ff2(hidden), drop, self.training)


class CollaborativeClassifier(nn.Module):
    """The self-supervised (collaborative) layer: image logits from class features M_k * F.

    For each tissue class k the reduced features are weighted by the DA map M_k; with attention on, the
    tokens of *all images of the batch* form one sequence per class, so attention can mine patterns that
    co-occur across images; then a per-image GAP and a per-class linear classifier give one logit.
    With attention off, it is GAP of the class features and the same classifier (ablation).
    """

    def __init__(self, in_channels: int, num_classes: int, dim: int = 128, heads: int = 2, layers: int = 1,
                 use_attention: bool = True, pool: int = 2) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.use_attention = use_attention
        self.pool = max(1, int(pool))
        self.reduce = nn.Conv2d(in_channels, dim, 1, bias=False)
        nn.init.xavier_uniform_(self.reduce.weight)
        self.blocks = nn.ModuleList(
            [PerClassTransformerBlock(num_classes, dim, heads) for _ in range(layers if use_attention else 0)]
        )
        self.classifier_weight = nn.Parameter(torch.empty(num_classes, dim))
        self.classifier_bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.normal_(self.classifier_weight, std=1.0 / math.sqrt(dim))

    def forward(self, features: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """``features`` (B, C, h, w), ``maps`` (B, K+1, h, w) -> logits (B, K)."""
        # The 1x1 conv commutes with the per-pixel weighting by M_k, so reduce first (cheaper). The ReLU keeps
        # class evidence non-negative (as in CAM): then lowering an absent class's logit lowers its map.
        reduced = F.relu(self.reduce(features))
        class_features = maps[:, : self.num_classes, None] * reduced[:, None]  # (B, K, D, h, w)
        b, k, d, h, w = class_features.shape
        if self.use_attention and len(self.blocks):
            if self.pool > 1 and min(h, w) >= 2 * self.pool:
                pooled = F.avg_pool2d(class_features.reshape(b * k, d, h, w), self.pool, ceil_mode=True)
                h, w = pooled.shape[-2:]
                class_features = pooled.view(b, k, d, h, w)
            tokens = class_features.permute(1, 0, 3, 4, 2).reshape(k, b * h * w, d)
            for block in self.blocks:
                tokens = block(tokens)
            pooled_features = tokens.view(k, b, h * w, d).mean(dim=2).transpose(0, 1)  # (B, K, D)
        else:
            pooled_features = class_features.mean(dim=(3, 4))
        return (pooled_features * self.classifier_weight).sum(-1) + self.classifier_bias


class SegmentationHead(nn.Module):
    """DeepLab v3 head (ASPP + 3x3 conv + classifier) giving K+1 logits at feature resolution."""

    def __init__(self, in_channels: int, num_outputs: int, rates: tuple[int, ...] = (6, 12, 18),
                 channels: int = 256) -> None:
        super().__init__()
        tv = import_torchvision()
        from torchvision.models.segmentation.deeplabv3 import ASPP  # after the compat import above

        del tv
        self.aspp = ASPP(in_channels, list(rates), channels)
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(channels, num_outputs, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(self.aspp(features)))
