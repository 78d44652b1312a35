"""Export a checkpoint as a bioimage.io model package (spec format 0.5), built with ``bioimageio.spec``.

The package holds: TorchScript of the inference path (:class:`~.network.ExportedCRAMNet`: backbone + segmentation
head, the softmax, background = "not tissue") and the same network's state dict with its architecture (importable
from this plugin); an 8-bit RGB input ``b,c,y,x`` whose preprocessing is the training normalisation; per-class
probabilities as output, with the tile size (a multiple of :data:`TILE_STEP` from :data:`TILE_MIN`), the halo and
the training µm/px (when the checkpoint records one) on the spatial axes; test tensors from a real run on a
synthetic sample patch; a cover (the patch and its overlay); a README (data, recipe, validation, background rule,
how to run it); the class names and colours; citation and licence. The checkpoint's own metadata rides in
``config.napari_wsss_cram``, so the package loads back wherever a checkpoint does (``package.py``).

``export_model`` is a generator yielding :class:`Progress` and checking a cancel token, as all long work here.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import warnings
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DependencyError, WsssCramError
from ..progress import CancelToken, Progress
from .package import CONFIG_KEY

#: the smallest tile a consumer may feed, and the step it grows by (a multiple of the output stride 8 or 16)
TILE_MIN, TILE_STEP = 128, 32
#: pixels a consumer should crop from each side of an output tile (``wsss-cram predict`` overlaps tiles by 64)
HALO = 32
#: side of the synthetic sample patch that gives the test tensors and the cover: ``wsss-cram predict`` feeds it
#: to the network as one 320-pixel tile (its context padding), a size on the package's grid (128 + 6 x 32)
SAMPLE_SIDE = 255
#: a sample patch (``core.sample.make_patch`` seed) holding the three WSSS4LUAD tissues and glass
SAMPLE_SEED = 2
CITATION = ("Pan et al. (2024), WSSS-CRAM: precise segmentation of histopathological images via class region "
            "activation mapping. Front. Microbiol. 15:1483052")
CITATION_DOI = "10.3389/fmicb.2024.1483052"
INSTALL_HINT = 'pip install "napari-wsss-cram[bioimageio]"'


@dataclass
class ExportResult:
    """What :func:`export_model` wrote."""

    path: Path
    size_bytes: int
    seconds: float
    files: list[str] = field(default_factory=list)


def require_bioimageio() -> None:
    """Raise :class:`DependencyError` naming the extra when ``bioimageio.spec`` is not installed."""
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError as err:
        raise DependencyError(f"Exporting a model package needs bioimageio.spec and bioimageio.core: "
                              f"{INSTALL_HINT}") from err


def check_export_request(out: str | os.PathLike, authors: Sequence[str], license: str | None,
                         overwrite: bool = False, checkpoint: str | os.PathLike | None = None) -> Path:
    """Refuse, before any work, what the export cannot do: no author, no licence (never guessed), an output
    that is not a ``.zip``, exists (without ``overwrite``) or is the ``checkpoint`` exported (the one output
    guard: never onto an input, ``--overwrite`` or not). Returns the output path."""
    from ..io.guard import check_output_file, ensure_writable_folder

    if not [a for a in authors if str(a).strip()]:
        raise WsssCramError("Who made this model? Pass --author 'Name' (repeat it for several authors; "
                            "'Name <email>' adds an address); the export does not guess authors.")
    if not (license or "").strip():
        raise WsssCramError("Under which licence may others use this model? Pass --license with an SPDX "
                            "identifier, e.g. CC-BY-4.0, MIT or BSD-3-Clause; the export does not guess it.")
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise WsssCramError(f"The model package '{out}' must end in .zip (a bioimage.io package is a zip).")
    check_output_file(out, [checkpoint], overwrite, "model package")
    ensure_writable_folder(out.resolve().parent, "folder of the model package")
    _check_license(license.strip())
    return out


def _check_license(license: str) -> None:
    """Refuse a licence that is not an SPDX identifier, suggesting the spelling when only the case differs."""
    try:
        from bioimageio.spec.model.v0_5 import LicenseId
        from pydantic import ValidationError
    except ImportError:  # the export itself says which extra is missing
        return
    try:
        LicenseId(license)
    except ValidationError:
        import typing

        from bioimageio.spec._internal.license_id import LicenseIdLiteral  # the spec's SPDX identifiers

        near = [lid for lid in typing.get_args(LicenseIdLiteral) if lid.lower() == license.lower()]
        raise WsssCramError(f"'{license}' is not an SPDX licence identifier"
                            + (f" (did you mean {near[0]}?)" if near else "")
                            + "; pass --license with one from https://spdx.org/licenses/, e.g. CC-BY-4.0, MIT or "
                              "BSD-3-Clause.") from None


def _author(text: str) -> dict[str, Any]:
    """'Name <email>' or 'Name' -> a bioimage.io author."""
    match = re.fullmatch(r"\s*(.*?)\s*<\s*([^>]+?)\s*>\s*", text)
    if match:
        return {"name": match.group(1) or match.group(2), "email": match.group(2)}
    return {"name": text.strip()}


def _identifier(name: str) -> str:
    """A channel name as the spec's identifiers allow (letters, digits, '_'), e.g. 'immune cells' -> 'immune_cells'."""
    ident = re.sub(r"\W+", "_", name.strip()).strip("_") or "class"
    return ident if not ident[0].isdigit() else f"c_{ident}"


def sample_patch(side: int = SAMPLE_SIDE) -> np.ndarray:
    """The synthetic H&E patch the test tensors and the cover are made from, uint8 (side, side, 3)."""
    from ..sample import make_patch

    rgb, _ = make_patch(SAMPLE_SEED, side, classes_present=(0, 1, 2))
    return rgb


def engine_padding(side: int) -> tuple[int, int]:
    """Pixels ``wsss-cram predict`` (default tile and overlap, scale 1) adds before and after a ``side``-pixel
    image that fits one tile, replicating its edge pixels: the context the network sees around it."""
    from ..inference import PredictSettings
    from ..tiling import tile_starts

    settings = PredictSettings()
    # the engine covers work pixels [0, side + 1): the last output pixel's centre plus one for interpolation
    starts, size = tile_starts(0, side + 1, settings.tile, settings.overlap)
    return -starts[0], size - side + starts[0]


def export_model(checkpoint: str | os.PathLike, out: str | os.PathLike, authors: Sequence[str], license: str,
                 name: str | None = None, description: str | None = None, overwrite: bool = False,
                 cancel: CancelToken | None = None) -> Generator[Progress, None, ExportResult]:
    """Write the checkpoint (a ``.pt`` or a package of ours) as a bioimage.io model package at ``out`` (.zip).

    Yields ``Progress("export", done, total, {"step": ...})``; returns an :class:`ExportResult`. The package is
    written next to ``out`` and renamed into place: a failure or a cancel leaves no partial file.
    """
    import torch

    from ..checkpoint import load_checkpoint, read_checkpoint_payload
    from ..io.atomic import atomic_path

    t0 = time.perf_counter()
    require_bioimageio()
    out = check_export_request(out, authors, license, overwrite, checkpoint)
    steps = ("load", "trace", "test tensors", "description", "package")

    def step(i: int) -> Progress:
        if cancel is not None:
            cancel.raise_if_cancelled()
        return Progress("export", i, len(steps), {"step": steps[min(i, len(steps) - 1)]})

    yield step(0)
    model, info = load_checkpoint(checkpoint, map_location="cpu")
    # the state-dict weights are the checkpoint's own tensors (the demo model keeps float16): same bytes, same
    # checksum; loading them into the float32 network is what load_checkpoint does too
    state = read_checkpoint_payload(checkpoint)["state_dict"]
    from .network import ExportedCRAMNet  # after the checkpoint: its import errors read better

    net = ExportedCRAMNet.from_model(model)
    from ..model.cram import to_input_tensor

    # the test input is the sample patch as `wsss-cram predict` gives it to the network (with its edge-replicated
    # context), so that the test output is exactly what predict outputs for the patch, less the padding
    rgb = sample_patch()
    before, after = engine_padding(len(rgb))
    padded = np.pad(rgb, ((before, after), (before, after), (0, 0)), mode="edge")
    x = to_input_tensor(padded, net.config)
    with tempfile.TemporaryDirectory(prefix="wsss-cram-export-") as tmp_name:
        tmp = Path(tmp_name)
        yield step(1)
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # the tracer warns that the class count becomes a constant: it is one, fixed by the checkpoint
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # torch 2.13 marks torch.jit deprecated; TorchScript is still what the zoo, QuPath and DJL read
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated")
            scripted = torch.jit.trace(net, x, check_trace=False, strict=False)
            probs = scripted(x)
            # the trace must give what the network gives, on this and on another tile size
            if not torch.allclose(probs, net(x), atol=1e-5):
                raise WsssCramError("The traced TorchScript does not reproduce the model; please report this.")
            other = to_input_tensor(sample_patch(TILE_MIN + TILE_STEP), net.config)
            if not torch.allclose(scripted(other), net(other), atol=1e-5):
                raise WsssCramError("The traced TorchScript does not generalise to other tile sizes; please "
                                    "report this.")
            torch.jit.save(scripted, tmp / "weights_torchscript.pt")
        torch.save({k: v.contiguous() for k, v in state.items()}, tmp / "weights_state_dict.pt")
        yield step(2)
        np.save(tmp / "test_input.npy", np.ascontiguousarray(padded.transpose(2, 0, 1)[None]))
        np.save(tmp / "test_output.npy", probs.numpy().astype(np.float32))
        inner = probs[0, :, before:before + len(rgb), before:before + len(rgb)].numpy()
        from .readme import write_cover, write_readme

        write_cover(tmp / "cover.png", rgb, inner, info.classes)
        write_readme(tmp / "README.md", info, name or default_name(info))
        yield step(3)
        descr = build_model_description(tmp, info, state, authors, license, name, description)
        yield step(4)
        from bioimageio.spec import save_bioimageio_package

        with atomic_path(out) as tmp_zip:
            _quiet_bioimageio()
            try:
                save_bioimageio_package(descr, output_path=tmp_zip)
            except Exception as err:
                raise WsssCramError(f"bioimageio.spec refused the package for {out}: "
                                    f"{str(err).splitlines()[0]}") from err
            if cancel is not None:
                cancel.raise_if_cancelled()
    import zipfile

    with zipfile.ZipFile(out) as archive:
        files = sorted(archive.namelist())
    yield Progress("export", len(steps), len(steps), {"step": "done"})
    return ExportResult(out, out.stat().st_size, time.perf_counter() - t0, files)


def _quiet_bioimageio() -> None:
    """bioimageio logs each step through loguru at INFO; keep its warnings and errors only."""
    try:
        import sys

        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="WARNING")
    except Exception:  # pragma: no cover - logging is cosmetic
        pass


def default_name(info: Any) -> str:
    """E.g. 'WSSS-CRAM resnet18 tumor-stroma-normal' (the spec wants a short name)."""
    return f"WSSS-CRAM {info.model_config.backbone} {'-'.join(info.classes.names)}"[:64]


def build_model_description(folder: Path, info: Any, state: dict, authors: Sequence[str], license: str,
                            name: str | None = None, description: str | None = None) -> Any:
    """The ``ModelDescr`` (spec 0.5) of the files in ``folder`` (written by :func:`export_model`)."""
    import torch
    from bioimageio.spec.model import v0_5 as spec
    from pydantic import ValidationError

    from ..checkpoint import FORMAT_NAME, FORMAT_VERSION, default_resolution, tensors_sha256

    config, classes = info.model_config, info.classes
    mpp = getattr(config, "mpp", None)
    space = {"scale": float(mpp), "unit": "micrometer"} if mpp else {}
    resolution = default_resolution(info)
    torch_version = spec.Version(torch.__version__.split("+")[0])
    channel_names = [_identifier(n) for n in classes.all_names]
    if len(set(channel_names)) != len(channel_names):
        channel_names = [f"{ident}_{i}" for i, ident in enumerate(channel_names)]
    input_id, output_id = spec.TensorId("rgb"), spec.TensorId("probabilities")
    mean255 = [float(v) * 255.0 for v in config.mean]
    std255 = [float(v) * 255.0 for v in config.std]
    input_axes = [spec.BatchAxis(), spec.ChannelAxis(channel_names=["red", "green", "blue"])] + [
        spec.SpaceInputAxis(id=spec.AxisId(a), size=spec.ParameterizedSize(min=TILE_MIN, step=TILE_STEP), **space)
        for a in ("y", "x")]
    output_axes = [spec.BatchAxis(), spec.ChannelAxis(channel_names=channel_names)] + [
        spec.SpaceOutputAxisWithHalo(id=spec.AxisId(a), size=spec.SizeReference(tensor_id=input_id,
                                                                                  axis_id=spec.AxisId(a)),
                                     halo=HALO, **space)
        for a in ("y", "x")]
    where = (f"{mpp:g} µm/px" if mpp else "the images' own pixel size (no µm/px recorded)" if resolution.scale == 1
             else f"the image rescaled by {resolution.scale:g} (training scale; no µm/px recorded)")
    ours = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "package_version": info.package_version,
        "classes": classes.to_dict(), "model_config": config.to_dict(),
        "train_config": info.train_config or {}, "extra": info.extra or {},
        "tensor_sha256": tensors_sha256(state),
        "background": "not tissue: gray level (BT.601) > 200 after a 5x5 majority vote; on tissue the "
                      "tissue classes' probabilities renormalised among themselves",
        "halo": HALO, "resolution": where,
    }
    miou = (info.extra or {}).get("val_mIoU", (info.extra or {}).get("best_mIoU"))
    text = description or (
        f"Weakly-supervised tissue segmentation of H&E images (WSSS-CRAM, {config.backbone} + DeepLab v3 head): "
        f"per-pixel probabilities of {', '.join(classes.names)} and background (= not tissue), at {where}."
        + (f" Validation mIoU {miou:.2f}." if isinstance(miou, int | float) and miou >= 0 else ""))
    try:
        return spec.ModelDescr(
            name=name or default_name(info),
            description=text[:1024],
            authors=[spec.Author(**_author(a)) for a in authors if str(a).strip()],
            cite=[spec.CiteEntry(text=CITATION, doi=spec.Doi(CITATION_DOI))],
            license=spec.LicenseId(license.strip()),
            tags=["histopathology", "h&e", "semantic-segmentation", "weakly-supervised", "2d", "pytorch",
                  "napari-wsss-cram", *[n.lower() for n in classes.names]],
            documentation=spec.FileDescr(source=folder / "README.md"),
            covers=[spec.FileDescr(source=folder / "cover.png")],
            inputs=[spec.InputTensorDescr(
                id=input_id, axes=input_axes,
                description="8-bit RGB H&E image (0..255)",
                # consumers that pad by the halo replicate the edge pixels, as `wsss-cram predict` does
                pad=spec.EdgePadding(mode="edge"),  # set explicitly: a default is not written out
                test_tensor=spec.FileDescr(source=folder / "test_input.npy"),
                data=spec.IntervalOrRatioDataDescr(type="uint8"),
                preprocessing=[
                    spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32")),
                    spec.FixedZeroMeanUnitVarianceDescr(kwargs=spec.FixedZeroMeanUnitVarianceAlongAxisKwargs(
                        mean=mean255, std=std255, axis=spec.AxisId("channel"))),
                    # explicit: without it the spec appends a cast back to the input's uint8
                    spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32"))])],
            outputs=[spec.OutputTensorDescr(
                id=output_id, axes=output_axes,
                description="probability per tissue class; last channel background = not tissue",
                test_tensor=spec.FileDescr(source=folder / "test_output.npy"),
                data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)))],
            weights=spec.WeightsDescr(
                pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
                    source=folder / "weights_state_dict.pt",
                    architecture=spec.ArchitectureFromLibraryDescr(
                        callable=spec.Identifier("ExportedCRAMNet"),
                        import_from="napari_wsss_cram.core.zoo.network",
                        kwargs={"classes": classes.to_dict(), "model_config": config.to_dict()}),
                    pytorch_version=torch_version,
                    comment="needs the napari-wsss-cram package (pip install napari-wsss-cram)"),
                torchscript=spec.TorchscriptWeightsDescr(
                    source=folder / "weights_torchscript.pt", pytorch_version=torch_version,
                    parent="pytorch_state_dict", comment="torch.jit.trace of the same network")),
            config=spec.Config(**{CONFIG_KEY: ours}),
        )
    except ValidationError as err:
        first = err.errors()[0]
        where_ = ".".join(str(p) for p in first.get("loc", ()))
        hint = " Use an SPDX licence identifier (e.g. CC-BY-4.0, MIT)." if "license" in where_ else ""
        raise WsssCramError(f"The model description is not valid bioimage.io: {where_}: {first.get('msg')}."
                            + hint) from err


@dataclass
class PackageCheck:
    """The outcome of the zoo's own test (``bioimageio test``) of a package."""

    passed: bool
    status: str
    lines: list[str]
    seconds: float

    def summary(self) -> str:
        """One line per check of the zoo's test, e.g. ``passed  Reproduce test outputs ... (torchscript)``."""
        return "\n".join(self.lines)


def check_package(path: str | os.PathLike, weight_format: str | None = None) -> PackageCheck:
    """Run bioimage.io's own test on ``path`` (``bioimageio.core.test_model``: format validation, the test
    tensors reproduced by every weights format, inference at several tile sizes and batch sizes)."""
    t0 = time.perf_counter()
    try:
        from bioimageio.core import test_model
    except ImportError as err:
        raise DependencyError(f"Checking a model package needs bioimageio.core: {INSTALL_HINT}") from err
    _quiet_bioimageio()
    summary = test_model(Path(path), weight_format=weight_format, devices=["cpu"])
    lines = []
    for detail in summary.details:
        errors = [e.msg.splitlines()[0] for e in (detail.errors or [])]
        lines.append(f"{detail.status:<7} {detail.name}" + (f": {errors[0]}" if errors else ""))
    return PackageCheck(summary.status == "passed", str(summary.status), lines, time.perf_counter() - t0)
