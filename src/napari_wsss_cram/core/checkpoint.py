"""Checkpoints: one torch file with the state_dict and everything needed to rebuild and use the model.

Saved atomically (temp file + rename). Loaded with ``torch.load(weights_only=True)``: a file that needs
pickle code execution is refused. A bioimage.io package exported by this plugin (``wsss-cram export-model``)
is accepted wherever a checkpoint is (``core/zoo/package.py`` reads it back).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from .classes import ClassSpec
from .errors import CheckpointError
from .io.atomic import atomic_path
from .model.config import ModelConfig
from .model.cram import CRAMNet
from .run_files import BEST, FINAL, LAST, resolve_checkpoint_path  # noqa: F401 (the run folder's models)
from .zoo.package import rdf_name, read_package_payload

FORMAT_NAME = "napari-wsss-cram"
FORMAT_VERSION = 1


@dataclass
class CheckpointInfo:
    """What a checkpoint says about its model, besides the weights."""

    classes: ClassSpec
    model_config: ModelConfig
    train_config: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    package_version: str = __version__
    extra: dict = field(default_factory=dict)
    path: Path | None = None


@dataclass(frozen=True)
class Resolution:
    """The resolution the model sees: a resample factor ``scale`` of the image, or a target ``mpp`` (µm/px).

    Exactly one of the two is set; ``origin`` says where it came from (shown by :meth:`describe`).
    """

    scale: float | None = None
    mpp: float | None = None
    origin: str = ""

    def __post_init__(self) -> None:
        if (self.scale is None) == (self.mpp is None):
            raise ValueError("A Resolution has either a scale or a µm/px, not both or neither.")

    def describe(self) -> str:
        """E.g. ``scale 2.5x (the checkpoint's training scale)``, ``0.5 µm/px (the checkpoint's training µm/px)``."""
        what = f"{self.mpp:g} µm/px" if self.mpp is not None else f"scale {self.scale:g}x"
        return f"{what} ({self.origin})" if self.origin else what

    def to_mpp(self, image_mpp: float | None) -> float | None:
        """The µm/px the model sees on an image of ``image_mpp`` µm/px (a scale s resamples it to mpp / s)."""
        if self.mpp is not None:
            return self.mpp
        return image_mpp / self.scale if image_mpp else None

    def to_scale(self, image_mpp: float | None) -> float | None:
        """The resample factor of an image of ``image_mpp`` µm/px that gives this resolution."""
        if self.scale is not None:
            return self.scale
        return image_mpp / self.mpp if image_mpp else None


def default_resolution(info: CheckpointInfo, image_has_mpp: bool = True) -> Resolution:
    """THE rule for the resolution a model is applied at when the user does not choose one.

    The checkpoint's training µm/px (``model_config.mpp``) when it records one and the image states its µm/px;
    otherwise its mean training rescale: ``model_config.train_scale``, else the mean of the recorded
    ``train_config`` ``scale_min``/``scale_max`` (for checkpoints whose ``train_scale`` is the unrecorded default
    1.0), else 1.0. The paper's preset trains at x2-x3, so its checkpoints predict at 2.5.
    """
    mpp = getattr(info.model_config, "mpp", None)
    if mpp is not None and image_has_mpp:
        return Resolution(mpp=float(mpp), origin="the checkpoint's training µm/px")
    scale = float(getattr(info.model_config, "train_scale", 1.0) or 1.0)
    config = info.train_config or {}
    if scale == 1.0 and "scale_min" in config and "scale_max" in config:
        try:
            scale = 0.5 * (float(config["scale_min"]) + float(config["scale_max"]))
        except (TypeError, ValueError):
            scale = 1.0
    if not (scale > 0 and math.isfinite(scale)):
        scale = 1.0
    return Resolution(scale=scale, origin="the checkpoint's training scale")


def model_card(info: CheckpointInfo) -> list[tuple[str, str]]:
    """What a user should know about a checkpoint, as ``(kind, text)`` lines: ``model`` (architecture, classes),
    ``data`` (what it was trained on), ``validation`` (recorded scores), ``warning`` (classes it never got right),
    ``resolution`` (its default) and ``note`` (e.g. the demo model's)."""
    config, train, extra = info.model_config, info.train_config or {}, info.extra or {}
    lines = [("model", f"{getattr(config, 'backbone', '?')}, classes {', '.join(info.classes.names)}")]
    data, pseudo, init = train.get("data"), train.get("pseudo"), train.get("init")
    # the steps it trained (recorded at save) before the settings: a time budget ends a run before its epochs
    step = extra.get("step")
    trained = step if isinstance(step, int) and step > 0 else train.get("steps")
    amount = f"{trained} steps" if trained else (f"{train['epochs']} epochs" if train.get("epochs") else "")
    # a segmentation round (the recipe's final model) learnt from pseudo-labels, not from the patch folder
    source = (f"trained on {_last_parts(data)}" if data else
              f"trained on the pseudo-labels in {_last_parts(pseudo)}" if train.get("stage2") and pseudo else "")
    if source:
        started = f", started from the network of {_last_parts(init)}" if init and init != "previous" else ""
        lines.append(("data", source + (f" ({amount})" if amount else "") + started))
    miou = extra.get("val_mIoU", extra.get("best_mIoU"))
    per_class = extra.get("per_class") or {}
    if isinstance(miou, int | float) and miou >= 0:
        scores = ", ".join(f"{name} {value:.2f}" for name, value in per_class.items()
                           if isinstance(value, int | float))
        lines.append(("validation", f"validation mIoU {miou:.2f}" + (f" ({scores})" if scores else "")))
        never = [name for name, value in per_class.items() if isinstance(value, int | float) and value == 0]
        if never:
            lines.append(("warning", f"never got {', '.join(never)} right on its validation set: "
                                     "do not trust those labels"))
    lines.append(("resolution", f"default resolution: {default_resolution(info).describe()}"))
    lines += [("note", str(note)) for key, note in extra.items() if key in ("demo_model", "note") and note]
    return lines


def _last_parts(path: str | os.PathLike) -> str:
    """A run or data path as a card shows it: its last two parts ("run/round1-pseudo")."""
    return "/".join(Path(str(path)).parts[-2:])


def _plain(data: dict | None) -> dict:
    """JSON round trip: only plain types survive, so weights_only loading can read them back."""
    return json.loads(json.dumps(data or {}, default=str))


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes (sorted by name): stored in every checkpoint
    and checked on load, so that damaged tensor bytes (a flipped bit on disk or in transfer) are refused
    instead of predicting garbage with status ok."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, model: CRAMNet, extra: dict | None = None,
                    train_config: dict | None = None) -> Path:
    """Write ``model`` (+ classes, config, versions, ``train_config`` and ``extra``) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "classes": model.classes.to_dict(),
        "model_config": model.config.to_dict(),
        "train_config": _plain(train_config),
        "extra": _plain(extra),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    payload["tensor_sha256"] = tensors_sha256(payload["state_dict"])
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_checkpoint_payload(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load and validate the raw checkpoint dict (weights-only) from a ``.pt`` file, a model package exported by
    this plugin, or a training run folder (its model, :func:`resolve_checkpoint_path`); raises CheckpointError
    with a plain message."""
    path = resolve_checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}. Check the path or train a model first.")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(f"{path} is not a readable torch checkpoint (corrupt, truncated or another "
                              f"file type). Use a .pt file written by 'wsss-cram train' or the Train dock.")
    if rdf_name(path) is not None:  # a bioimage.io package (a zip too): ours carries a whole checkpoint
        payload = read_package_payload(path, map_location)
    else:
        payload = _torch_load(path, map_location)
    return _validate_payload(payload, path)


def _torch_load(path: Path, map_location) -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"Refusing to load {path}: it contains pickled Python objects, which could run code when "
            f"loaded. Only napari-wsss-cram checkpoints (tensors and plain settings) are accepted; "
            f"re-save the model with this package.") from err
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable torch checkpoint (corrupt or truncated?): "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err


def _validate_payload(payload: dict, path: Path) -> dict:
    """The checks every checkpoint payload passes, from a ``.pt`` file or a model package."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a napari-wsss-cram checkpoint (no '{FORMAT_NAME}' header). "
                              f"Use a .pt file written by 'wsss-cram train' or the Train dock.")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version}, newer than this package reads "
                              f"({FORMAT_VERSION}). Update napari-wsss-cram.")
    for key in ("classes", "model_config", "state_dict"):
        if not isinstance(payload.get(key), dict):
            raise CheckpointError(f"{path} is incomplete: '{key}' is missing.")
    state = payload["state_dict"]
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is damaged: its weights are not all tensors.")
    stored = payload.get("tensor_sha256")  # checkpoints written before 0.1 have none
    if stored is not None and stored != tensors_sha256(state):
        raise CheckpointError(f"{path} is damaged: its weights do not match the checksum written with them (a "
                              "corrupted copy or disk). Copy the file again from its source, or retrain.")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path} holds weights that are not finite (NaN or infinite) in {len(bad)} tensor(s), "
                              f"e.g. {bad[0]}: the training diverged. Use an earlier checkpoint, or retrain with a "
                              "lower learning rate.")
    return payload


def load_checkpoint(path: str | os.PathLike, map_location="cpu",
                    expect_classes: ClassSpec | None = None) -> tuple[CRAMNet, CheckpointInfo]:
    """Rebuild the model saved at ``path`` (a checkpoint file, or a training run folder: its final, best or last
    model) in eval mode and return it with its :class:`CheckpointInfo`."""
    path = resolve_checkpoint_path(path)
    payload = read_checkpoint_payload(path, map_location)
    try:
        classes = ClassSpec.from_dict(payload["classes"])
        config = ModelConfig.from_dict(payload["model_config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} has invalid class or model settings: {err}") from err
    if expect_classes is not None and tuple(n.lower() for n in expect_classes.names) != tuple(
            n.lower() for n in classes.names):
        raise CheckpointError(
            f"{path} was trained for classes {', '.join(classes.names)}, but "
            f"{', '.join(expect_classes.names)} were requested. Use a matching checkpoint or class list.")
    model = CRAMNet(classes, config, weights=None)
    state = payload["state_dict"]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        details = "; ".join(part for part in (
            f"missing {few(missing)}" if missing else "",
            f"unexpected {few(unexpected)}" if unexpected else "",
            f"wrong shape {few(wrong_shape)}" if wrong_shape else "") if part)
        raise CheckpointError(
            f"{path}: the weights do not match the architecture in its own config "
            f"({config.backbone}, output stride {config.output_stride}, stage {config.stage}): {details}. "
            f"The file was edited or written by an incompatible version.")
    model.load_state_dict(state)
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    model.eval()
    info = CheckpointInfo(
        classes=classes, model_config=config, train_config=dict(payload.get("train_config") or {}),
        format_version=int(payload["format_version"]),
        package_version=str(payload.get("package_version", "unknown")),
        extra=dict(payload.get("extra") or {}), path=path)
    return model, info
