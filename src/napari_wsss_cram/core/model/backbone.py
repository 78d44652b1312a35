"""Dilated torchvision ResNets and their weights: ImageNet (torch hub cache, downloaded on request), a local
file, or random init.

``weights="auto"`` (the default) never touches the network: ImageNet weights are used only when torchvision's
weights file is already in the torch hub cache (``$TORCH_HOME/hub/checkpoints``). ``weights="imagenet"`` fetches
the file through torchvision's weights API (with a progress bar, into that cache) when it is not there yet, and
fails at once offline with a message naming the file and the folder to put it in.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

import torch
from torch import nn

from ..._torchvision import import_torchvision
from ..errors import CheckpointError

log = logging.getLogger(__name__)

#: Environment variable naming a local backbone weights file, tried after the torch hub cache.
WEIGHTS_ENV = "WSSS_CRAM_BACKBONE_WEIGHTS"
#: Seconds to wait for the weights server before saying we are offline (instead of hanging on a firewall).
PROBE_TIMEOUT = 10.0
_warned_random: set[str] = set()

FEATURE_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


class ResNetBackbone(nn.Module):
    """ResNet stem + layer1..4, dilated to output stride 8 or 16. Keys match torchvision's (minus ``fc``)."""

    def __init__(self, name: str = "resnet50", output_stride: int = 8) -> None:
        super().__init__()
        tv = import_torchvision()
        net = tv.models.get_model(name, weights=None)
        self.name = name
        self.output_stride = output_stride
        self.out_channels = FEATURE_CHANNELS[name]
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        # Dilate in place instead of torchvision's replace_stride_with_dilation, which BasicBlock
        # (resnet18/34) refuses; the weights keep their shapes, so ImageNet weights still load.
        if output_stride == 8:
            _dilate(self.layer3, 2)
            _dilate(self.layer4, 4)
        elif output_stride == 16:
            _dilate(self.layer4, 2)
        else:
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _dilate(layer: nn.Module, dilation: int) -> None:
    """Turn the strided convs of a ResNet stage into stride 1 and dilate its 3x3 convs."""
    for module in layer.modules():
        if isinstance(module, nn.Conv2d):
            if module.stride != (1, 1):
                module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = (dilation, dilation)
                module.padding = (dilation, dilation)


def hub_cache_dir() -> Path:
    """torch's weights cache folder, ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME`` moves it)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_weights(name: str) -> tuple[object, Path]:
    """torchvision's recommended ImageNet weights entry for backbone ``name`` and its torch hub cache path."""
    tv = import_torchvision()
    entry = tv.models.get_model_weights(name).DEFAULT
    return entry, hub_cache_dir() / os.path.basename(urlparse(entry.url).path)


def cached_imagenet_weights(name: str) -> tuple[object, Path] | None:
    """The torchvision weights entry whose file is already in the torch hub cache, or None (no download)."""
    tv = import_torchvision()
    try:
        entries = list(tv.models.get_model_weights(name))
    except (ValueError, KeyError):
        return None
    default = getattr(tv.models.get_model_weights(name), "DEFAULT", None)
    entries.sort(key=lambda w: w is not default)  # prefer the recommended weights when both are cached
    cache = hub_cache_dir()
    for entry in entries:
        path = cache / os.path.basename(urlparse(entry.url).path)
        if path.is_file():
            return entry, path
    return None


def _probe(url: str) -> None:
    """Raise URLError/OSError at once when ``url`` cannot be reached (torch's download has no timeout)."""
    with urlopen(Request(url, method="HEAD"), timeout=PROBE_TIMEOUT):
        pass


def fetch_imagenet_weights(name: str, progress: bool = True) -> tuple[dict, Path]:
    """ImageNet weights of backbone ``name``: (state_dict, cache file), downloaded into the torch hub cache
    through torchvision's weights API (hash-checked, with a progress bar) unless a file is already cached.

    Raises CheckpointError naming the file and the folder to put it in when it cannot be downloaded.
    """
    found = cached_imagenet_weights(name)
    if found is None:
        entry, path = imagenet_weights(name)
        try:
            _probe(entry.url)
            path.parent.mkdir(parents=True, exist_ok=True)
            log.info("Downloading ImageNet weights for %s: %s -> %s", name, entry.url, path)
            state = entry.get_state_dict(progress=progress, check_hash=True, weights_only=True)
        except (URLError, OSError, RuntimeError) as err:  # RuntimeError: torch's hash check
            reason = getattr(err, "reason", None) or err
            raise CheckpointError(
                f"Cannot download the ImageNet weights for {name} ({reason}). Without internet, download "
                f"{entry.url} elsewhere and put the file {path.name} into {path.parent} (torch's hub cache; "
                f"$TORCH_HOME moves it), or pass --weights PATH to a local copy, or --weights none to start "
                f"from random weights.") from None
        return state, path
    entry, path = found
    try:
        return entry.get_state_dict(progress=False, weights_only=True), path
    except Exception:  # torch's own reason suggests weights_only=False (running the file's code): not shown
        raise CheckpointError(f"The cached ImageNet weights {path} cannot be read as a torch weights file "
                              f"(damaged or incomplete): delete the file and run again to download it anew.") \
            from None


def describe_weights(name: str, weights: str | os.PathLike | None) -> str:
    """What a run with backbone ``name`` and ``weights`` starts from, in words; looks at files only (offline)."""
    if weights in (None, "none", "random"):
        return "random weights (no ImageNet)"
    if weights in ("auto", "imagenet"):
        found = cached_imagenet_weights(name)
        if found is not None:
            return f"ImageNet weights from the torch hub cache ({found[1]})"
        entry_path = imagenet_weights(name)[1]
        if weights == "imagenet":
            return f"ImageNet weights, downloaded at the start into {entry_path}"
        if os.environ.get(WEIGHTS_ENV):
            return f"the weights file ${WEIGHTS_ENV} = {os.environ[WEIGHTS_ENV]}"
        return (f"random weights: {entry_path.name} is not in {entry_path.parent} "
                f"(choose ImageNet / --weights imagenet to download it)")
    return f"the weights file {weights}"


def _clean_state_dict(state: dict) -> dict:
    """Accept a bare state_dict or a wrapper holding one; strip common prefixes (DataParallel, nesting)."""
    for key in ("state_dict", "model", "backbone"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    cleaned = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in ("module.", "backbone.", "encoder."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def load_backbone_file(backbone: ResNetBackbone, path: str | os.PathLike) -> None:
    """Load ResNet weights from a local file (torchvision-style keys); raises CheckpointError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Backbone weights file not found: {path}. Give an existing .pth file or "
                              f"use --weights imagenet (download) or auto.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"Could not read backbone weights {path} as a weights-only torch file ({err}). "
                              f"Save the state_dict with torch.save(model.state_dict(), path).") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state_dict.")
    state = _clean_state_dict(state)
    own = backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(usable) < 0.9 * len(own):
        raise CheckpointError(f"{path} does not look like {backbone.name} weights: only {len(usable)} of "
                              f"{len(own)} tensors match. Use a torchvision {backbone.name} state_dict.")
    backbone.load_state_dict(usable, strict=False)


def init_backbone_weights(backbone: ResNetBackbone, weights: str | os.PathLike | None = "auto") -> str:
    """Initialise ``backbone`` and return where its weights came from.

    ``weights``: ``"auto"`` = ImageNet from the torch hub cache, else the file named by
    ``$WSSS_CRAM_BACKBONE_WEIGHTS``, else random init with one warning (never the network);
    ``"imagenet"`` = ImageNet, downloaded into the torch hub cache when not there yet (CheckpointError when
    that fails); ``None`` or ``"random"`` = random init silently (e.g. before loading a checkpoint); any other
    string or path = that local weights file.
    """
    if weights is None or weights == "random":
        return "random"
    if weights == "imagenet":
        state, path = fetch_imagenet_weights(backbone.name)
        backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
        return f"imagenet:{path.name}"
    if weights == "auto":
        found = cached_imagenet_weights(backbone.name)
        if found is not None:
            entry, path = found
            try:
                state = entry.get_state_dict(progress=False, weights_only=True)
                backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
                return f"imagenet:{path.name}"
            except Exception as err:  # a corrupt cache must not crash a run
                log.warning("Could not load cached ImageNet weights %s: %s", path, err)
        env_path = os.environ.get(WEIGHTS_ENV)
        if env_path:
            load_backbone_file(backbone, env_path)
            return f"file:{env_path}"
        if backbone.name not in _warned_random:
            _warned_random.add(backbone.name)
            warnings.warn(
                f"No ImageNet weights for {backbone.name} in the torch hub cache "
                f"({Path(torch.hub.get_dir()) / 'checkpoints'}) and ${WEIGHTS_ENV} is not set: the backbone "
                f"starts from random weights, which trains much slower and worse. Put torchvision's "
                f"{backbone.name} weights file in that folder, point ${WEIGHTS_ENV} at a local copy, or pass "
                f"--weights imagenet to download it.",
                UserWarning, stacklevel=3,
            )
        return "random"
    load_backbone_file(backbone, weights)
    return f"file:{weights}"
