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
from ..fields import setting
from ..model.config import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (re-exported: the engine's default)
from ..placement import Placement
from ..tissue import GATE_THRESHOLD, TISSUE_THRESHOLD

#: Smallest image side (output pixels) the engine accepts: below it there is nothing to segment.
MIN_SIDE = 8
#: Longest side, in its own pixels, of the tissue thumbnail that decides which tiles are skipped (each of
#: its pixels covers long side / THUMBNAIL_SIDE level-0 pixels, at least 1).
THUMBNAIL_SIDE = 1024
#: Tiles per batch when ``PredictSettings.batch`` is None, by device type. CPU: one tile per batch keeps Cancel
#: within about a second, at no cost in throughput (a CPU gains nothing from batching); GPUs fill up with more.
BATCH_PER_DEVICE = {"cpu": 1, "mps": 4, "cuda": 16}


@dataclass
class PredictSettings:
    """How to run the engine. ``tile``/``overlap`` are in work pixels (what the model sees)."""

    scale: float = setting(1.0, "resample the image by this factor before the model (1 = as stored)")
    mpp: float | None = setting(None, "instead of scale, process at this µm/px")
    tile: int = setting(512, "The image is processed in tiles of this size (pixels at the model's resolution); "
                        "larger tiles need more memory", label="Tile size", step=64, suffix=" px", dock=True)
    overlap: int = setting(64, "Tiles overlap by this many pixels and are blended, which hides tile seams",
                           label="Tile overlap", step=16, suffix=" px", low=0, high=4096, dock=True)
    # None: by device (BATCH_PER_DEVICE), resolved where the device is known (TileRunner)
    batch: int | None = setting(None, "tiles per batch (default: by device, BATCH_PER_DEVICE)")
    crf: bool = setting(False, "A dense CRF snaps class boundaries to colour edges of the H&E image (several "
                        "times slower; off by default: after the recipe's stage 2 it did not help, README)",
                        label="Refine labels with a dense CRF", dock=True)
    crf_params: CRFParams = setting(help="the CRF's kernels (CRFParams)", factory=CRFParams)
    # run a pydensecrf CRF in a helper process (GUI callers: the worker thread then never holds the GIL for a
    # whole tile); the torch backend releases the GIL by itself and ignores this
    crf_isolated: bool = False
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    output_level: int = 0
    tissue_threshold: int | None = TISSUE_THRESHOLD
    # "tissue": background is where the tissue mask says (near-white), every tissue pixel takes the arg-max
    # over the tissue classes; "model": the model's background channel competes with the classes (the paper).
    background: str = setting("tissue", "tissue: background = no tissue (near-white), every stained pixel gets "
                              "a tissue class; model: the model's background channel competes with the tissue "
                              "classes (the paper)", label="Background", choices=("tissue", "model"), dock=True)
    # zero the classes the image-level classifier calls absent in a tile (presence < gate_threshold). Off by
    # default: on real WSSS4LUAD images a CPU-trained classifier, which saw normal lung in few crops, put whole
    # normal-only images at presence 0.03-0.07, and gating then erased the class (benchmarks/README.md).
    gate_classes: bool = setting(False, "The image-level classifier decides per tile which classes are present; "
                                 "absent ones are never painted there",
                                 label="Drop classes the model finds absent in a tile", dock=True)
    gate_threshold: float = GATE_THRESHOLD
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
            if getattr(self, name) is not None or name != "batch":
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
        if self.batch is not None and self.batch < 1:
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
        check_fields(self, ["tile", "batch", "output_level", "gate_threshold", "stream_threshold_mp"],
                     optional=("batch",))
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




def build_predict_settings(info: Any, resolution: Any = None, *, image_has_mpp: bool = True, gui: bool = False,
                           **fields: Any) -> tuple[PredictSettings, PredictSettings | None]:
    """THE builder of predict settings: ``wsss-cram predict``, the Segment dock (one image and its batch),
    ``demo`` and ``evaluate`` call it, so the same checkpoint, image and untouched settings give the same labels.

    ``resolution``: a :class:`~napari_wsss_cram.core.checkpoint.Resolution` the user chose, or None for the
    checkpoint's default (``default_resolution(info, image_has_mpp)``). With a µm/px, ``scale`` holds the training
    scale (what images that state no µm/px are processed at). ``gui``: a pydensecrf CRF runs in a helper process
    (the GUI thread never waits on the GIL). ``fields``: any other :class:`PredictSettings` field; one left out
    keeps the dataclass default (``batch``: by device, ``BATCH_PER_DEVICE``).

    Returns ``(settings, fallback)``: ``fallback`` is the same at the training scale, for images that state no
    µm/px, when the µm/px is the model's default rather than the user's (None otherwise).
    """
    import dataclasses

    from ..checkpoint import default_resolution

    chosen = resolution
    if resolution is None:
        resolution = default_resolution(info, image_has_mpp=image_has_mpp)
    scale = resolution.scale if resolution.scale is not None else default_resolution(info, False).scale
    if isinstance(fields.get("crf_params"), dict):
        fields["crf_params"] = CRFParams.from_dict(fields["crf_params"])
    settings = PredictSettings(scale=float(scale), mpp=resolution.mpp, crf_isolated=gui, **fields)
    fallback = dataclasses.replace(settings, mpp=None) if settings.mpp is not None and chosen is None else None
    return settings, fallback
