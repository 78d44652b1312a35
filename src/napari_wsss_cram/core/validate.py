"""The one check of numeric settings: finite, of the right kind, inside a documented range.

The typed settings (``PredictSettings``, ``CRFParams``, ``ModelConfig``, ``TrainConfig``, the patchify and
pseudo-label settings) call :func:`check_number` for each of their numbers when they are built, so the CLI, the
TOML presets and the docks meet the same limits and the same message. The ranges are in :data:`RANGES` (one
table, shown in the README); a value outside is refused with a ``WsssCramError`` naming the setting, never
clamped silently (a negative threshold or a NaN kernel width gives wrong maps or a crash far from its cause).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

from .errors import WsssCramError

#: setting -> (low, high, integer?). Bounds are inclusive. Why these: the CRF's lattice divides by its widths
#: (0 or NaN crashed pydensecrf with SIGSEGV; below 0.5 px the torch lattice of a 512² tile overflows), and one iteration takes ~60 ms per 512² tile, so 100 is >6 s a tile;
#: thresholds are gray levels or shares; scales beyond x16 are almost surely a µm/px typed as a scale.
RANGES: dict[str, tuple[float, float, bool]] = {
    "gaussian_sxy": (0.5, 1000.0, False),
    "gaussian_compat": (0.0, 1000.0, False),
    "bilateral_sxy": (0.5, 1000.0, False),
    "bilateral_srgb": (0.5, 1000.0, False),
    "bilateral_compat": (0.0, 1000.0, False),
    "iterations": (1, 100, True),
    "tissue_threshold": (128, 255, True),  # below 128 stained tissue itself is "background": an empty map
    "gate_threshold": (0.0, 1.0, False),
    "tile": (32, 8192, True),
    "batch": (1, 4096, True),
    "output_level": (0, 64, True),
    "stream_threshold_mp": (0.0, 1e6, False),
    "min_frac": (0.0, 1.0, False),
    "min_tissue": (0.0, 1.0, False),
    "patch_overlap": (0.0, 0.9, False),
    "scale": (0.01, 16.0, False),
    "mpp": (0.05, 100.0, False),
    "alpha": (0.0, 1.0, False),
    "beta": (0.0, 1.0, False),
}


def check_number(value: Any, name: str, low: float | None = None, high: float | None = None,
                 integer: bool | None = None, label: str | None = None,
                 error: type[WsssCramError] = WsssCramError) -> float | int:
    """``value`` as a number when it is finite and in ``[low, high]`` (default: :data:`RANGES` [name]), else an
    ``error`` (a ``WsssCramError``) naming ``label`` (default ``name``) and the range. Booleans are refused as
    numbers."""
    lo, hi, is_int = RANGES.get(name, (None, None, False))
    low = lo if low is None else low
    high = hi if high is None else high
    integer = is_int if integer is None else integer
    label = label or name
    span = f"{low:g}..{high:g}" if low is not None and high is not None else (
        f">= {low:g}" if low is not None else f"<= {high:g}" if high is not None else "a finite number")
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise error(f"{label} must be a number ({span}), got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise error(f"{label} must be a number ({span}), got {value!r}.") from None
    if not math.isfinite(number):
        raise error(f"{label} must be a finite number ({span}), got {value!r}.")
    if integer and number != int(number):
        raise error(f"{label} must be a whole number ({span}), got {value!r}.")
    if (low is not None and number < low) or (high is not None and number > high):
        raise error(f"{label} must be in {span}, got {value!r}.")
    return int(number) if integer else (value if isinstance(value, float) else number)


def check_fields(obj: Any, names: dict[str, str] | list[str], optional: tuple[str, ...] = (),
                 error: type[WsssCramError] = WsssCramError) -> None:
    """:func:`check_number` on attributes of ``obj`` (a dataclass); ``names`` maps attribute -> range key (or is
    a list of attributes named as their range key). Attributes in ``optional`` may be None. Integers are
    stored back as ``int`` (a TOML 10.0 becomes 10)."""
    pairs = names.items() if isinstance(names, dict) else ((n, n) for n in names)
    for attr, key in pairs:
        value = getattr(obj, attr)
        if value is None and attr in optional:
            continue
        checked = check_number(value, key, label=attr, error=error)
        if RANGES.get(key, (0, 0, False))[2]:
            object.__setattr__(obj, attr, checked)


def check_all_finite(obj: Any, error: type[WsssCramError] = WsssCramError) -> None:
    """Every number of the dataclass ``obj`` (and in its tuples) is finite: NaN passes every ``<``/``>`` test
    and went through as a silent all-background map or a NaN loss."""
    from dataclasses import fields

    for f in fields(obj):
        value = getattr(obj, f.name)
        for v in (value if isinstance(value, tuple) else (value,)):
            if isinstance(v, float) and not math.isfinite(v):
                raise error(f"{f.name} must be a finite number, got {v!r}.")


#: ranges of the training settings (TrainConfig), checked when a config is built (CLI, presets, dock)
TRAIN_RANGES: dict[str, tuple[float, float, bool]] = {
    "jitter": (0.0, 1.0, False), "mosaic_purity": (0.0, 1.0, False), "pseudo_label_scale": (0.01, 16.0, False),
    "pixel_weight": (0.0, 1000.0, False), "val_scale": (0.01, 16.0, False), "scale_min": (0.01, 16.0, False),
    "scale_max": (0.01, 16.0, False), "crop": (16, 8192, True), "batch_size": (1, 4096, True),
    "workers": (0, 256, True), "crf_workers": (0, 256, True), "threads": (1, 4096, True),
    "log_every": (1, 10 ** 9, True), "checkpoint_every": (1, 10 ** 9, True), "val_every": (1, 10 ** 9, True),
    "val_every_steps": (1, 10 ** 9, True), "joint_warmup_steps": (0, 10 ** 9, True),
}
#: ranges of the model settings (ModelConfig): thresholds, loss weights, the energy's kernel
MODEL_RANGES: dict[str, tuple[float, float, bool]] = {
    "tissue_threshold": (128, 255, True), "lambda_seg": (0.0, 1000.0, False), "alpha": (0.0, 1.0, False),
    "beta": (0.0, 1.0, False), "attention_dim": (1, 4096, True), "attention_heads": (1, 64, True),
    "attention_layers": (0, 64, True), "attention_pool": (1, 64, True), "aspp_channels": (1, 4096, True),
    "background_prior_weight": (0.0, 1000.0, False), "map_presence_weight": (0.0, 1000.0, False),
    "map_presence_top": (0.0, 1.0, False), "energy_weight": (0.0, 1e6, False),
    "energy_sigma_xy": (0.5, 1e5, False), "energy_sigma_rgb": (0.5, 1e5, False), "energy_scale": (0.01, 1.0, False),
    "constrained_weight": (0.0, 1000.0, False), "constrained_top": (0.0, 1.0, False),
    "constrained_share": (0.0, 1.0, False), "train_scale": (0.001, 1000.0, False), "mpp": (0.05, 100.0, False),
}


def check_table(obj: Any, table: dict[str, tuple[float, float, bool]],
                error: type[WsssCramError] = WsssCramError) -> None:
    """:func:`check_number` for each attribute of ``obj`` named in ``table`` (None is left to the owner)."""
    for attr, (low, high, integer) in table.items():
        value = getattr(obj, attr, None)
        if value is not None:
            check_number(value, attr, low, high, integer, label=attr, error=error)


def plausible_mpp(mpp: float | None, path: str | os.PathLike) -> float | None:
    """A µm/px read from ``path`` when plausible (:data:`RANGES` ["mpp"]), else None with a warning naming the
    file: 0.0001 µm/px would make the engine read a 1000x up-sampled image; such values are metadata errors
    (a unit in cm or inch misread, a scanner's default), and the image is used without a pixel size instead."""
    if mpp is None:
        return None
    low, high, _ = RANGES["mpp"]
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = float("nan")
    if math.isfinite(value) and low <= value <= high:
        return value
    warnings.warn(f"{path} states {mpp!r} µm per pixel, outside {low:g}..{high:g}; ignoring it (the image is "
                  "treated as having no pixel size: pass --scale, or --mpp with the right value).", stacklevel=2)
    return None
