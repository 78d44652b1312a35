"""Reading an exported bioimage.io package back as a checkpoint (no bioimageio library needed).

A package written by :func:`napari_wsss_cram.core.zoo.export.export_model` is a zip holding ``rdf.yaml`` (its
``config.napari_wsss_cram`` section carries what a checkpoint carries besides the weights: classes, model and
training settings, recorded scores, the tensor checksum) and the state dict of the ``pytorch_state_dict``
weights entry. :func:`read_package_payload` turns it into the same payload dict a ``.pt`` checkpoint holds, so
``load_checkpoint`` (and with it ``predict``, ``evaluate``, ``pseudo-labels`` and the Segment dock) accepts
either. Other bioimage.io packages are refused with a message saying what they are.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

#: names a bioimage.io description may have inside a package (``rdf.yaml`` is the one the library writes)
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
#: the key of our section in the description's ``config``
CONFIG_KEY = "napari_wsss_cram"


def rdf_name(path: str | os.PathLike) -> str | None:
    """The description's name inside ``path`` when it is a zip holding one at its top level, else None (a torch
    ``.pt`` is a zip too, without one)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except Exception:  # any damage (bad entries, undecodable names): not a package; torch.load names the damage
        return None
    return next((name for name in RDF_NAMES if name in names), None)


def _load_yaml(text: str, path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with napari
        try:
            from ruyaml import YAML
        except ImportError as err:
            raise CheckpointError(f"Reading the model package {path} needs PyYAML: pip install pyyaml") from err
        data = YAML(typ="safe").load(text)
    else:
        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a damaged rdf.yaml (not a mapping). Export the model again.")
    return data


def read_package_payload(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint payload (``format``, ``classes``, ``model_config``, ``state_dict``...) stored in a
    package exported by this plugin; raises :class:`CheckpointError` for any other package, naming it."""
    import torch

    path = Path(path)
    name = rdf_name(path)
    if name is None:
        raise CheckpointError(f"{path} is not a bioimage.io model package (no rdf.yaml inside).")
    with zipfile.ZipFile(path) as archive:
        rdf = _load_yaml(archive.read(name).decode("utf-8", errors="replace"), path)
        ours = (rdf.get("config") or {}).get(CONFIG_KEY) if isinstance(rdf.get("config"), dict) else None
        if rdf.get("type") != "model" or not isinstance(ours, dict):
            what = f"a bioimage.io {rdf.get('type', 'resource')} ('{rdf.get('name', '?')}'"
            what += f", weights: {', '.join(rdf.get('weights') or {}) or 'none'})" if rdf.get("type") == "model" else ")"
            raise CheckpointError(
                f"{path} is {what}, not one exported by napari-wsss-cram: this plugin runs only its own models. "
                "Run it with bioimageio.core, QuPath or deepImageJ, or use a .pt checkpoint / a package made by "
                "'wsss-cram export-model'.")
        weights = (rdf.get("weights") or {}).get("pytorch_state_dict") or {}
        source = weights.get("source")
        if not isinstance(source, str) or source not in archive.namelist():
            raise CheckpointError(f"{path} is incomplete: its state-dict weights ('{source}') are missing. "
                                  "Export the model again.")
        try:
            state = torch.load(io.BytesIO(archive.read(source)), map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"Refusing to load {path}: its weights contain pickled Python objects, which "
                                  "could run code when loaded. Export the model again with this package.") from err
        except Exception as err:
            raise CheckpointError(f"{path}: its weights '{source}' cannot be read (corrupt or truncated?): "
                                  f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: its weights '{source}' are not a state dict. Export the model again.")
    payload = {key: ours.get(key) for key in ("format", "format_version", "package_version", "classes",
                                               "model_config", "train_config", "extra", "tensor_sha256")}
    payload["state_dict"] = state
    return payload
