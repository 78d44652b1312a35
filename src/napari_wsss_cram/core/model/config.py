"""ModelConfig: everything needed to rebuild a CRAMNet (architecture, method switches, input convention)."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields

from ..crf import CRFParams
from ..fields import setting
from ..tissue import TISSUE_THRESHOLD

#: the input normalisation of ImageNet-pretrained backbones (the engine's default for models that state none)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


@dataclass
class ModelConfig:
    """Architecture and method switches of WSSS-CRAM; saved in every checkpoint.

    Ablation rows (paper table): CAM only = ``use_da=False, use_joint=False, use_crf=False``;
    +DA = ``use_da=True``; +joint = ``use_joint=True``; +CRF = ``use_crf=True``.
    ``stage=2`` builds the same encoder-decoder trained seg-only on saved pseudo-labels (WSSS-CRAM2/3):
    the pseudo-label branch (DA layer, attention, classifier) is not built.
    """

    backbone: str = "resnet50"
    output_stride: int = 8
    stage: int = 1
    # Pseudo-label branch
    use_da: bool = True            # DA layer (K+1 maps, explicit background); off = plain CAM
    use_attention: bool = True     # batch self-attention over class features (needs use_da)
    attention_dim: int = 128
    attention_heads: int = 2
    attention_layers: int = 1
    attention_pool: int = 2        # average-pool class features before attention (fewer tokens)
    # Segmentation branch and joint training
    use_joint: bool = True         # train the seg head on the branch's pseudo-labels in the same step
    use_crf: bool = True           # pseudo-label = high-confidence map where it agrees with the dense CRF
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    aspp_channels: int = 256
    # Reliable pseudo-labels
    alpha: float = setting(0.3, "alpha: where every class activation is below alpha (on near-white glass), the "
                           "pseudo-label is background", label="alpha (background <)", step=0.05)
    beta: float = setting(0.9, "beta: a pixel is a reliable pseudo-label only where its class activation is above "
                          "beta; between alpha and beta it is left unlabelled (255)", label="beta (confident >)",
                          step=0.05)
    tissue_threshold: int = TISSUE_THRESHOLD    # gray level above which a pixel is glass/air (background prior)
    background_needs_white: bool = True  # alpha rule gives background only on near-white pixels
    crf: CRFParams = field(default_factory=CRFParams)
    # Losses: L = L_cls + background_prior_weight * L_bg + lambda_seg * (L_ce + energy_weight * L_energy)
    lambda_seg: float = 1.0
    background_prior_weight: float = 1.0  # squared error of the DA background map vs. the near-white prior (0 = off)
    # BCE of each class map's top-share mean vs. the image label (0 = off): makes the DA maps localise (see losses)
    map_presence_weight: float = 1.0
    map_presence_top: float = 0.1
    energy_weight: float = 15.0
    energy_sigma_xy: float = 200.0  # in input pixels (= 100 at the half scale used by RRM)
    energy_sigma_rgb: float = 15.0
    energy_scale: float = 0.5       # the energy is computed on the prediction resized by this factor
    # Label-constrained loss on the segmentation branch (0 = off, the paper): on each crop's tissue, the mass of
    # absent classes (and of background) is pushed to zero, each present class must be high in its top
    # ``constrained_top`` share of pixels, and in a crop with several present classes each must hold at
    # least ``constrained_share`` of the tissue (the labelling rule only promises 5%; see losses).
    constrained_weight: float = 0.0
    constrained_top: float = 0.05
    constrained_share: float = 0.3
    # Stage 2: how the labelled pixels of one image share its cross-entropy: "uniform", or "oeem" (online
    # easy-example mining: softmax(-loss) weights, mean 1; the pixels the model contradicts most count least), or
    # "balanced" (1/sqrt of each class's share of the batch's labelled pixels, mean 1)
    ce_weighting: str = "uniform"
    # Input convention
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    train_scale: float = 1.0        # downscale factor (vs. level 0) of the training patches
    mpp: float | None = None        # µm/pixel of the training patches at train_scale, if known

    def __post_init__(self) -> None:
        from ..errors import WsssCramError
        from ..validate import MODEL_RANGES, check_all_finite, check_table

        try:  # one check for every number (core.validate), first: NaN, None and out-of-range values named
            check_all_finite(self)
            check_table(self, MODEL_RANGES)
            for name in ("alpha", "beta", "attention_dim", "attention_heads"):
                if getattr(self, name) is None:
                    raise WsssCramError(f"{name} must be a number, got None.")
        except WsssCramError as err:
            raise ValueError(str(err)) from None
        if self.backbone not in BACKBONES:
            raise ValueError(f"Unknown backbone '{self.backbone}'; choose one of {', '.join(BACKBONES)}.")
        if self.output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {self.output_stride}.")
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}.")
        if not 0.0 <= self.alpha <= self.beta <= 1.0:
            raise ValueError(f"Need 0 <= alpha <= beta <= 1, got alpha={self.alpha}, beta={self.beta}.")
        if self.ce_weighting not in ("uniform", "oeem", "balanced"):
            raise ValueError(f"ce_weighting must be 'uniform', 'oeem' or 'balanced', got '{self.ce_weighting}'.")
        if self.attention_dim % self.attention_heads:
            raise ValueError("attention_dim must be divisible by attention_heads.")
        if isinstance(self.crf, dict):
            self.crf = CRFParams.from_dict(self.crf)
        self.aspp_rates = tuple(int(r) for r in self.aspp_rates)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)) or not all(v > 0 for v in self.std):
            raise ValueError(f"mean and std must be finite and std positive, got {self.mean}, {self.std}.")

    def to_dict(self) -> dict:
        """Plain, JSON-compatible dict (tuples become lists)."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys (from a newer version) are dropped with a warning."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(f"Ignoring unknown model settings: {', '.join(unknown)}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in names})
