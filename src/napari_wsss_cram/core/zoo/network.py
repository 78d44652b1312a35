"""The network inside an exported package: the inference path of a :class:`CRAMNet` as one ``forward``.

``forward(x)`` takes the normalised input (B, 3, H, W) (the package's preprocessing does the normalisation) and
returns per-class probabilities (B, K+1, H, W) with the rule ``wsss-cram predict`` uses by default
(``--background tissue``): the last channel is background = "not tissue" (near-white after a 5x5 majority vote,
from the pixels the input was normalised from), and on tissue the K tissue classes share the probability mass
(the segmentation head's softmax renormalised over the tissue classes). The same class is the TorchScript that
is traced and the architecture of the state-dict weights; its state dict keys are exactly a CRAMNet's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..classes import ClassSpec
from ..model.config import ModelConfig
from ..model.cram import CRAMNet
from ..tissue import GRAY_WEIGHTS, restrict_to_tissue

#: gray level above which a pixel is glass/air: the engine's default (``PredictSettings.tissue_threshold``)
TISSUE_THRESHOLD = 200
#: the majority vote of :func:`napari_wsss_cram.core.tissue.near_white_mask`
CLEANUP = 5


class ExportedCRAMNet(CRAMNet):
    """A CRAMNet whose ``forward`` is the inference path (see the module docstring).

    Built from plain values (what a bioimage.io ``architecture.kwargs`` holds): ``classes`` as
    :meth:`ClassSpec.to_dict` gives it, ``model_config`` as :meth:`ModelConfig.to_dict` gives it.
    """

    def __init__(self, classes: dict[str, Any], model_config: dict[str, Any],
                 tissue_threshold: float = TISSUE_THRESHOLD) -> None:
        super().__init__(ClassSpec.from_dict(classes), ModelConfig.from_dict(model_config), weights=None)
        cfg = self.config
        # not persistent: the state dict stays exactly a CRAMNet's (the checkpoint's weights load as they are)
        self.register_buffer("rgb_mean", torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("rgb_std", torch.tensor(cfg.std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("gray_weights", torch.tensor(GRAY_WEIGHTS).view(1, 3, 1, 1), persistent=False)
        self.tissue_threshold = float(tissue_threshold)
        # a stage-1 model trained without joint training has an untrained segmentation head: its probabilities
        # are its activation maps normalised over classes, as in CRAMNet.predict_with_presence
        self.maps_as_probs = self.has_pseudo_branch and not cfg.use_joint
        self.eval()

    @classmethod
    def from_model(cls, model: CRAMNet, tissue_threshold: float = TISSUE_THRESHOLD) -> ExportedCRAMNet:
        """The exported network with ``model``'s weights (on the CPU, in eval mode)."""
        net = cls(model.classes.to_dict(), model.config.to_dict(), tissue_threshold)
        net.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
        return net.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Normalised RGB (B, 3, H, W) -> probabilities (B, K+1, H, W), background last (= not tissue)."""
        features = self.backbone(x)
        if self.maps_as_probs:
            if self.da is not None:
                weights = self._upsample(self.da(features), x).float().square()
            else:
                weights = self._upsample(self.plain_cam(features)[1], x).float().clamp_min(0.0)
            probs = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-6)
        else:
            probs = self._upsample(self.seg_head(features), x).float().softmax(dim=1)
        # the 8-bit pixels the input was normalised from, as the engine's tissue mask sees them
        rgb = (x.float() * self.rgb_std + self.rgb_mean).round().clamp(0.0, 255.0)
        return restrict_to_tissue(probs, self.near_white(rgb), None)

    def near_white(self, rgb: torch.Tensor) -> torch.Tensor:
        """:func:`~napari_wsss_cram.core.tissue.near_white_mask` on (B, 3, H, W), with its gray weights as a
        buffer: a traced ``torch.tensor`` would be a constant pinned to the CPU, and the TorchScript could not
        move to a GPU."""
        white = ((rgb * self.gray_weights).sum(dim=1, keepdim=True) > self.tissue_threshold).float()
        white = F.avg_pool2d(white, CLEANUP, stride=1, padding=CLEANUP // 2, count_include_pad=False)
        return white[:, 0] > 0.5
