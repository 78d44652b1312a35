"""TrainConfig: every training setting, with the paper's defaults; TOML presets in the package's
``presets/*.toml`` (found by name, e.g. ``cpu-small``) load into it.

A preset is flat ``key = value`` lines for :class:`TrainConfig` plus a ``[model]`` table of
:class:`~napari_wsss_cram.core.model.config.ModelConfig` overrides (and ``[model.crf]`` for the dense CRF).
CLI flags override the preset. The run folder keeps the resolved config as ``config.toml``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from .data.augment import AugmentConfig
from .errors import DatasetError
from .fields import setting
from .resources import PRESETS_DIR, preset_names, preset_path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

__all__ = ["PRESETS_DIR", "TrainConfig", "dumps_toml", "load_config", "preset_path"]

#: ``init`` value of the recipe: each segmentation round starts from the model of the stage before
PREVIOUS = "previous"


@dataclass
class TrainConfig:
    """Training settings. Defaults: the paper (SGD lr 1e-3, momentum 0.9, wd 2e-4, batch 8, poly decay,
    x2-x3 rescale + 513 crop, resnet50, alpha 0.3, beta 0.9)."""

    data: str = ""                   # stage 1: patch folder or CSV (image-level labels)
    out: str = ""                    # run folder: config.toml, metrics.csv, last.pt, best.pt
    val: str | None = None           # pixel-labelled set (img/ mask/ [background-mask/]) for best-by-mIoU
    classes: str | None = None       # "a,b,c"; default: from the data
    # schedule
    # (the fields marked dock=True are the Train dock's form, built from this metadata: widgets/_forms.py)
    epochs: int = setting(10, "Passes over the patches (a time budget or a step count may end training sooner)",
                          label="Epochs", low=1, high=100_000, dock=True)
    steps: int | None = setting(None, "Optimiser steps to train (overrides epochs when set)", label="Steps",
                                step=10, low=0, high=10 ** 9, none_label="by epochs / time", dock=True)
    minutes: float | None = setting(None, "Wall-clock budget: training (and its poly schedule) ends when it is "
                                    "spent, or at the steps or epochs if they come first", label="Time budget",
                                    step=5.0, suffix=" min", low=0.0, high=10 ** 6 - 1,
                                    none_label="no time limit", dock=True)
    batch_size: int = setting(8, "Patches per step: lower it when memory runs out", label="Batch", dock=True)
    optimizer: str = "sgd"           # sgd (paper) | adam (short random-init CPU runs)
    lr: float = setting(1e-3, "Base learning rate: lower it if the loss becomes NaN", label="Learning rate",
                        step=1e-4, decimals=6, low=1e-6, high=1.0, dock=True)
    head_lr_mult: float = 10.0       # new layers (DA, attention, ASPP) learn faster, as in DeepLab/EDAM
    momentum: float = 0.9
    weight_decay: float = 2e-4
    poly_power: float = 0.9
    # augmentation: defaults owned by AugmentConfig (the component), written there once
    scale_min: float = AugmentConfig.scale_min
    scale_max: float = AugmentConfig.scale_max
    crop: int = setting(AugmentConfig.crop, "Training crop size in pixels", label="Crop", step=16, suffix=" px",
                        dock=True)
    flip: bool = AugmentConfig.flip
    rot90: bool = AugmentConfig.rot90
    jitter: float = AugmentConfig.jitter
    stain: float = AugmentConfig.stain  # haematoxylin/eosin stain jitter (0 = off; 0.05 light, 0.2 strong)
    # PistoSeg-style mosaics of cells of known class, as strong pixel labels: the share of items replaced by one
    # (0 = off); cells from single-label patches (stage 1) or pseudo-labelled regions >= mosaic_purity one class
    mosaic_share: float = 0.0
    mosaic_cell: int = 32            # cell side in pixels of the source images
    mosaic_purity: float = 0.9
    # HisynSeg-style boundary synthesis: the share of items given one or two random closed Bezier regions of
    # another class (0 = off), cut from synthesis_region px squares of one class (single-label patches in stage 1,
    # pseudo-labelled windows >= mosaic_purity one class in stage 2): core/data/synthesis.py
    synthesis_share: float = 0.0
    synthesis_region: int = 96
    synthesis_classes: str | None = None  # "tumor,stroma": only these classes' regions are pasted (None: all)
    # model (ModelConfig overrides, e.g. backbone, use_da, use_joint, use_crf, lambda_seg, alpha, beta, crf)
    model: dict[str, Any] = field(default_factory=dict)
    weights: str | None = "auto"     # "auto" (torchvision cache), a file path, or "none" (random init)
    # start from a trained model's network: a checkpoint (.pt or run folder) whose backbone and segmentation head
    # (every tensor of the same name and shape) replace the initial weights; in the recipe "previous" = each
    # segmentation round starts from the model that made its pseudo-labels (None: from `weights`)
    init: str | None = None
    # steps of classification-only training before the pseudo-labels and the segmentation loss switch on: a
    # randomly initialised backbone's first maps are noise, and the seg head would learn "all background" from them
    joint_warmup_steps: int = 0
    # pseudo-labels: the CRF runs at this fraction of the crop size; with the pydensecrf backend (CRF "auto" on the
    # CPU) in `crf_workers` processes (0 = in-process), with the torch backend (auto on CUDA) in the step on the
    # model's device (no processes)
    pseudo_label_scale: float = 1.0
    crf_workers: int = 2
    # runtime
    device: str = "auto"             # auto = cuda > mps > cpu
    amp: bool = True                 # mixed precision (CUDA only)
    workers: int = 2                 # DataLoader worker processes
    threads: int | None = None       # torch CPU threads (leave the GUI a core); None = torch's default
    seed: int = 0
    log_every: int = 10              # steps between metrics.csv rows (and progress info)
    checkpoint_every: int = 200      # steps between `last` checkpoints (also at each epoch end)
    val_every: int = 1               # epochs between validations (with `val`)
    val_every_steps: int | None = None
    val_scale: float | None = None   # scale of validation images; default: the mean training rescale
    resume: bool = False
    # stage 2 (independent segmentation model on saved pseudo-labels, WSSS-CRAM2/3)
    stage2: bool = False
    pseudo: str | None = None        # folder written by `wsss-cram pseudo-labels` (img/ + mask/)
    pixel_labels: str | None = None  # optional extra pixel-labelled set (img/ mask/)
    pixel_weight: float = 1.0        # loss weight of pixel-labelled vs pseudo-labelled samples
    # the recipe (`wsss-cram train` without --stage; core/recipe.py): segmentation rounds after the joint model
    # (0 = the joint model only; 1 = + stage 2; 2 = + a self-training round, "stage 3"), each stage's share of
    # the wall-clock budget (empty = equal), and how the next round's pseudo-labels are refined ("none", "par",
    # "stain": core/stain_prior.py)
    rounds: int = 1
    stage_shares: list[float] = field(default_factory=list)
    pseudo_refine: str = "none"

    def __post_init__(self) -> None:
        self._check_types()
        if self.init is not None and str(self.init).strip().lower() in ("", "none", "random"):
            self.init = None  # `--init none` turns off a preset's init
        for name in ("epochs", "steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DatasetError(f"{name} must be at least 1, got {value} (leave it out for the preset's length).")
        for name in ("lr", "momentum", "weight_decay", "poly_power", "head_lr_mult"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise DatasetError(f"{name} must be a finite {'positive' if name == 'lr' else 'non-negative'} "
                                   f"number, got {value}.")
        if self.batch_size < 1:
            raise DatasetError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.crop < 16:
            raise DatasetError(f"crop must be >= 16 px, got {self.crop}.")
        if not 0 < self.scale_min <= self.scale_max:
            raise DatasetError(f"Need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}.")
        if self.minutes is not None and not (isinstance(self.minutes, int | float) and 0 < self.minutes < 1e6):
            raise DatasetError(f"minutes must be a positive number, got {self.minutes}.")
        if not 0.0 <= self.mosaic_share <= 1.0:
            raise DatasetError(f"mosaic_share must be between 0 and 1, got {self.mosaic_share}.")
        if self.mosaic_cell < 4:
            raise DatasetError(f"mosaic_cell must be >= 4 px, got {self.mosaic_cell}.")
        if not 0.0 <= self.synthesis_share <= 1.0:
            raise DatasetError(f"synthesis_share must be between 0 and 1, got {self.synthesis_share}.")
        if self.synthesis_region < 8:
            raise DatasetError(f"synthesis_region must be >= 8 px, got {self.synthesis_region}.")
        if not 0.0 <= self.stain < 1.0:
            raise DatasetError(f"stain must be in [0, 1), got {self.stain}.")
        if not 0 <= self.rounds <= 5:
            raise DatasetError(f"rounds must be between 0 and 5, got {self.rounds}.")
        shares = self.stage_shares or []
        if not isinstance(shares, list | tuple) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in shares):
            raise DatasetError(f"stage_shares must be a list of numbers, e.g. [1, 1], got {shares!r}.")
        self.stage_shares = [float(v) for v in shares]
        if any(not math.isfinite(v) or v <= 0 for v in self.stage_shares):
            raise DatasetError(f"stage_shares must be positive numbers, got {self.stage_shares}.")
        from .pseudo_labels import PSEUDO_LABEL_REFINEMENTS

        if self.pseudo_refine not in PSEUDO_LABEL_REFINEMENTS:
            raise DatasetError(f"pseudo_refine must be one of {', '.join(PSEUDO_LABEL_REFINEMENTS)}, "
                               f"got '{self.pseudo_refine}'.")
        if self.optimizer not in ("sgd", "adam"):
            raise DatasetError(f"optimizer must be 'sgd' or 'adam', got '{self.optimizer}'.")
        from .validate import TRAIN_RANGES, check_all_finite, check_table

        check_all_finite(self, DatasetError)
        check_table(self, TRAIN_RANGES, DatasetError)
        self.model = dict(self.model or {})
        if self.model:
            from .model.config import ModelConfig

            unknown = sorted(set(self.model) - {f.name for f in fields(ModelConfig)})
            if unknown:  # a misspelt [model] key would otherwise be a switch that does nothing
                raise DatasetError(f"Unknown [model] settings: {', '.join(unknown)} (known: "
                                   f"{', '.join(sorted(f.name for f in fields(ModelConfig)))}).")
            try:  # its numbers meet the same limits here as in a checkpoint (the preset names the file)
                ModelConfig(**self.model)
            except (TypeError, ValueError) as err:
                raise DatasetError(f"[model]: {err}") from None

    def _check_types(self) -> None:
        """Each setting has the type its annotation says (a TOML typo such as ``lr = "fast"`` or ``crop = 1.5``
        is named here, not deep in the trainer); ints are accepted for floats."""
        kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
        words = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}
        for f in fields(self):
            value = getattr(self, f.name)
            parts = [t.strip() for t in str(f.type).split("|")]
            if value is None and "None" in parts:
                continue
            allowed = tuple(t for part in parts for t in kinds.get(part, ()))
            if not allowed:
                continue  # dict (the model table): checked by ModelConfig
            if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
                wanted = " or ".join(words.get(p, p) for p in parts if p != "None")
                raise DatasetError(f"setting '{f.name}' must be {wanted}, got {value!r} ({type(value).__name__}).")

    @property
    def mean_scale(self) -> float:
        """The scale the model sees images at on average: the one to predict at."""
        return 0.5 * (self.scale_min + self.scale_max)

    def augment_config(self):
        """The :class:`~.data.augment.AugmentConfig` of this run: its fields, taken by name from these settings."""
        return AugmentConfig(**{f.name: getattr(self, f.name) for f in fields(AugmentConfig)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DatasetError(f"Unknown training settings: {', '.join(unknown)} (known: {', '.join(sorted(names))}).")
        return cls(**data)

    def updated(self, **overrides: Any) -> TrainConfig:
        """A copy with the non-None ``overrides`` applied (``backbone=`` goes into the model table)."""
        data = self.to_dict()
        model = dict(data["model"])
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "backbone":
                model["backbone"] = value
            else:
                data[key] = value
        data["model"] = model
        return TrainConfig.from_dict(data)


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Load a TOML preset (or the paper's defaults when ``path`` is None) and apply ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        p = preset_path(str(path))
        if not p.is_file():
            raise DatasetError(f"{p}: training config not found. Give a .toml file or a preset name: "
                               f"{', '.join(preset_names())}.")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise DatasetError(f"{p}: not valid TOML ({err}).") from None
        data.pop("description", None)
        try:
            base = TrainConfig.from_dict(data)
        except DatasetError as err:
            raise DatasetError(f"{p}: {err}") from None
    else:
        base = TrainConfig()
    return base.updated(**overrides)


def _without_none(table: dict[str, Any]) -> dict[str, Any]:
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in table.items() if v is not None}


def dumps_toml(data: dict[str, Any]) -> str:
    """The config as TOML (``tomli_w``); None values (unset settings) are left out, as TOML has no null."""
    return tomli_w.dumps(_without_none(data))
