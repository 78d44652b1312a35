"""The engine's settings (``PredictSettings``) and its result (``Prediction``, its temporary stores)."""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..classes import ClassSpec
from ..crf import CRFParams
from ..errors import WsssCramError
from ..placement import Placement

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Smallest image side (output pixels) the engine accepts: below it there is nothing to segment.
MIN_SIDE = 8
#: Long side (level-0 pixels per thumbnail pixel chosen so that) of the tissue thumbnail.
THUMBNAIL_SIDE = 1024
#: All output formats, and the default set of the CLI.
FORMATS = ("png", "ome-tiff", "geojson", "probs")
DEFAULT_FORMATS = ("png", "ome-tiff", "geojson")


@dataclass
class PredictSettings:
    """How to run the engine. ``tile``/``overlap`` are in work pixels (what the model sees)."""

    scale: float = 1.0
    mpp: float | None = None
    tile: int = 512
    overlap: int = 64
    batch: int = 4
    crf: bool = False
    crf_params: CRFParams = field(default_factory=CRFParams)
    # run a pydensecrf CRF in a helper process (GUI callers: the worker thread then never holds the GIL for a
    # whole tile); the torch backend releases the GIL by itself and ignores this
    crf_isolated: bool = False
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    output_level: int = 0
    tissue_threshold: int | None = 200
    # "tissue": background is where the tissue mask says (near-white), every tissue pixel takes the arg-max
    # over the tissue classes; "model": the model's background channel competes with the classes (the paper).
    background: str = "tissue"
    # zero the classes the image-level classifier calls absent in a tile (presence < gate_threshold). Off by
    # default: on real WSSS4LUAD images a CPU-trained classifier, which saw normal lung in few crops, put whole
    # normal-only images at presence 0.03-0.07, and gating then erased the class (benchmarks/README.md). The
    # threshold is low because gating out a present class loses it outright.
    gate_classes: bool = False
    gate_threshold: float = 0.3
    # test-time augmentation: the model at each of these scales (and mirrored), averaged; costs len x (2 x) time
    tta_scales: tuple[float, ...] = (1.0,)
    tta_flip: bool = False
    with_probs: bool = True
    with_cam: bool = False
    stream_threshold_mp: float = 64.0
    work_dir: str | None = None

    def __post_init__(self) -> None:
        self.validate()  # when built: the CLI, the presets and the docks meet the same limits

    def validate(self) -> None:
        """Refuse settings outside their documented ranges (``core.validate.RANGES``) with a clear message."""
        from ..validate import check_fields, check_number

        for name in ("scale", "tile", "overlap", "batch"):  # types first: the range checks below compare them
            check_number(getattr(self, name), name, -math.inf, math.inf, integer=name != "scale",
                         label=f"--{name}")
        if self.mpp is not None:
            check_number(self.mpp, "mpp", -math.inf, math.inf, label="--mpp")
        if self.mpp is None and not (self.scale > 0 and math.isfinite(self.scale)):
            raise WsssCramError(f"--scale must be a positive number, got {self.scale}.")
        if self.mpp is None and not MIN_SCALE <= self.scale <= MAX_SCALE:
            # x250 of a 100 px patch is 25000^2 px of work: almost surely a µm/px or a percentage typed as a scale
            raise WsssCramError(f"--scale {self.scale:g} is outside {MIN_SCALE:g}..{MAX_SCALE:g} (a factor on the "
                                "image's pixels: 1 = as stored, 2.5 = the paper's). For a pixel size use --mpp.")
        if self.mpp is not None and not MIN_MPP <= self.mpp <= MAX_MPP:
            raise WsssCramError(f"--mpp {self.mpp:g} is outside {MIN_MPP:g}..{MAX_MPP:g} µm per pixel (40x scans are "
                                "about 0.25, 20x about 0.5).")
        if self.mpp is not None and not self.mpp > 0:
            raise WsssCramError(f"--mpp must be a positive number of µm per pixel, got {self.mpp}.")
        if self.tile < 32:
            raise WsssCramError(f"--tile must be at least 32 pixels, got {self.tile}.")
        if not 0 <= self.overlap <= self.tile // 2:
            raise WsssCramError(f"--overlap must be between 0 and half the tile ({self.tile // 2}), "
                                f"got {self.overlap}.")
        if self.batch < 1:
            raise WsssCramError(f"--batch must be at least 1, got {self.batch}.")
        if not self.tta_scales or not all(0.25 <= float(v) <= 4.0 for v in self.tta_scales):
            raise WsssCramError(f"test-time scales must lie between 0.25 and 4, got {self.tta_scales}.")
        if self.work_dir is not None and not Path(self.work_dir).is_dir():
            raise WsssCramError(f"--work-dir '{self.work_dir}' is not an existing folder; create it or leave the "
                                "option out (the system's temporary folder is used).")
        if self.background not in ("tissue", "model"):
            raise WsssCramError(f"background must be 'tissue' or 'model', got '{self.background}'.")
        if not isinstance(self.crf_params, CRFParams):
            raise WsssCramError(f"crf_params must be CRFParams, got {type(self.crf_params).__name__}.")
        check_fields(self, ["tile", "batch", "output_level", "gate_threshold", "stream_threshold_mp"])
        if self.tissue_threshold is not None:  # a negative threshold made every pixel background, silently
            check_number(self.tissue_threshold, "tissue_threshold", label="--tissue-threshold")


#: disk-backed stores of large slides: a folder per prediction, holding the owner's process id
STORE_PREFIX, STORE_OWNER = "wsss-cram-predict-", "owner.pid"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its store
    return True


def remove_stale_stores(parent: Path) -> list[Path]:
    """Remove the disk-backed stores in ``parent`` whose process is gone (killed with ``kill -9`` or by a power
    cut, it could not clean up); a live run's store is kept. Returns the folders removed."""
    removed = []
    for store in sorted(Path(parent).glob(f"{STORE_PREFIX}*")):
        try:
            pid = int((store / STORE_OWNER).read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            continue  # not ours, or being created right now
        if pid != os.getpid() and not _process_alive(pid):
            shutil.rmtree(store, ignore_errors=True)
            removed.append(store)
    return removed


#: the resampling factors and pixel sizes the engine accepts (beyond them, a typing slip is likelier than intent)
MIN_SCALE, MAX_SCALE = 0.01, 16.0
MIN_MPP, MAX_MPP = 0.05, 100.0


@dataclass
class Prediction:
    """Result of the engine for one image or region (see the module docstring)."""

    labels: Any
    probs: Any
    cam: Any
    classes: ClassSpec
    placement: Placement
    region: tuple[int, int, int, int]
    class_pixels: dict[str, int]
    info: dict[str, Any] = field(default_factory=dict)
    store_dir: Path | None = None

    @property
    def scale(self) -> tuple[float, float]:
        """napari ``scale`` of the output pixels in level-0 pixels (see :class:`Placement`)."""
        return self.placement.scale

    @property
    def translate(self) -> tuple[float, float]:
        """napari ``translate`` (pixel centres) in level-0 pixels (see :class:`Placement`)."""
        return self.placement.translate

    @property
    def mpp(self) -> float | None:
        """µm per output pixel (None when the image does not state its pixel size)."""
        return self.placement.mpp

    @property
    def level(self) -> int:
        return self.placement.level

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.labels.shape)  # type: ignore[return-value]

    @property
    def streamed(self) -> bool:
        return self.store_dir is not None

    def cleanup(self) -> None:
        """Remove the temporary disk-backed arrays of a streamed prediction (no-op in memory)."""
        if self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)
            self.store_dir = None


