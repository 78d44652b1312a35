"""The output set of one prediction: PNG, OME-TIFF, GeoJSON, probability OME-TIFF and composition JSON.

``core/io/png.py``, ``ometiff.py`` and ``qupath.py`` hold the single-file formats (one module per format, no
knowledge of the engine); this module composes them into the files one input produces, with the guarantees a run needs: names
derived from the input, nothing overwritten unasked, everything written under temporary names and renamed
together at the end (a cancelled, failed or killed run leaves nothing under the final names, see
:func:`recover_interrupted_outputs`), and the summary row of the run CSV. Kept apart from the engine
(``core/inference/``), which only computes a :class:`~napari_wsss_cram.core.inference.Prediction`.

``write_outputs(prediction, out_dir, stem, formats, overwrite=False, cancel=None)``
    writes ``STEM.png``, ``STEM.ome.tif``, ``STEM.geojson``, ``STEM_probs.ome.tif``, ``STEM_composition.json`` and ``.csv``.
    The OME-TIFFs record the result's placement on the slide (OME ``PositionY/PositionX`` of its corner in µm,
    and the exact placement in a private tag), so that a field-of-view result re-opens where it was taken.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import composition as tissue_composition
from ..errors import OutputExistsError, WsssCramError
from ..progress import CancelToken
from . import atomic, guard, ometiff, png, qupath

if TYPE_CHECKING:
    from ..inference import Prediction

log = logging.getLogger(__name__)

#: All output formats, and the default set of the CLI.
FORMATS = ("png", "ome-tiff", "geojson", "probs")
DEFAULT_FORMATS = ("png", "ome-tiff", "geojson")


def output_paths(out_dir: str | os.PathLike, stem: str, formats: Iterable[str]) -> dict[str, Path]:
    """Final file of each output for one input (the composition JSON and CSV are always written)."""
    out = Path(out_dir)
    names = {"png": f"{stem}.png", "ome-tiff": f"{stem}.ome.tif", "geojson": f"{stem}.geojson",
             "probs": f"{stem}_probs.ome.tif"}
    paths = {fmt: out / names[fmt] for fmt in formats}
    paths["composition"] = out / f"{stem}_composition.json"
    paths["composition-csv"] = out / f"{stem}_composition.csv"  # the same table for a spreadsheet
    return paths


def parse_formats(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"png,ome-tiff"`` -> ("png", "ome-tiff"); unknown names raise a clear error."""
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    aliases = {"ome.tif": "ome-tiff", "ome-tif": "ome-tiff", "tiff": "ome-tiff", "tif": "ome-tiff",
               "json": "geojson", "prob": "probs"}
    items = [aliases.get(t, t) for t in items]
    unknown = [t for t in items if t not in FORMATS]
    if unknown:
        raise WsssCramError(f"Unknown output format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}.")
    return tuple(dict.fromkeys(items))


def check_outputs_free(out_dir: str | os.PathLike, stem: str, formats: Iterable[str], overwrite: bool,
                       inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Raise OutputExistsError before any work when an output exists and overwrite is off, and always when an
    output would replace one of ``inputs`` (outputs are named after their inputs: ``--out`` = the input folder
    would turn the H&E images into label masks, ``--overwrite`` or not)."""
    check_outputs_spare_inputs(out_dir, stem, formats, inputs)
    for path in output_paths(out_dir, stem, formats).values():
        guard.ensure_can_write(path, overwrite)


def check_outputs_spare_inputs(out_dir: str | os.PathLike, stem: str, formats: Iterable[str],
                               inputs: Iterable[str | os.PathLike]) -> None:
    """Raise OutputExistsError when an output of ``stem`` would replace one of ``inputs``."""
    protected = {Path(p).resolve() for p in inputs}
    for path in output_paths(out_dir, stem, formats).values():
        if path.resolve() in protected:
            raise OutputExistsError(f"The output '{path}' would replace the input image of the same name. "
                                    "Inputs are never overwritten: choose another output folder.")


def write_outputs(prediction: Prediction, out_dir: str | os.PathLike, stem: str,
                  formats: Iterable[str] = DEFAULT_FORMATS, overwrite: bool = False,
                  cancel: CancelToken | None = None) -> dict[str, Any]:
    """Write the outputs of one input (see module docstring); returns its summary row."""
    formats = parse_formats(formats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    finals = output_paths(out_dir, stem, formats)
    for path in finals.values():
        guard.ensure_can_write(path, overwrite)
    classes = prediction.classes
    tag = uuid.uuid4().hex[:8]
    temps = {key: atomic.temp_path(path, tag) for key, path in finals.items()}
    timings: dict[str, float] = {}
    skipped: list[str] = []
    labels = prediction.labels
    height, width = prediction.shape
    placement = prediction.placement
    try:
        if "ome-tiff" in formats:
            t0 = time.perf_counter()
            ometiff.write_pyramidal_ome_tiff(temps["ome-tiff"], labels, mpp=prediction.mpp, labels=True,
                                            progress=_cancel_hook(cancel), placement=placement)
            timings["ome-tiff"] = time.perf_counter() - t0
        if "probs" in formats:
            if prediction.probs is None:
                raise WsssCramError("Probability maps were not kept (with_probs=False); cannot write "
                                    f"{finals['probs'].name}.")
            probs = prediction.probs
            t0 = time.perf_counter()
            ometiff.write_pyramidal_ome_tiff(
                temps["probs"], lambda y, x, h, w: np.moveaxis(np.asarray(probs[:, y:y + h, x:x + w]), 0, -1),
                mpp=prediction.mpp, shape=(height, width, probs.shape[0]), labels=False,
                channel_names=list(classes.all_names), progress=_cancel_hook(cancel), placement=placement)
            timings["probs"] = time.perf_counter() - t0
        if cancel is not None:
            cancel.raise_if_cancelled()
        if "png" in formats:
            if prediction.streamed:
                # The PNG writer needs the whole map in memory; a streamed slide has its OME-TIFF instead.
                skipped.append("png")
                del temps["png"], finals["png"]
                log.warning("%s: %dx%d pixels is too large for a PNG mask; skipped it (the .ome.tif holds "
                            "the labels).", stem, height, width)
            else:
                t0 = time.perf_counter()
                png.write_index_png(temps["png"], np.asarray(labels), classes)
                timings["png"] = time.perf_counter() - t0
        if "geojson" in formats:
            t0 = time.perf_counter()
            small, factor = _geojson_labels(labels)
            qupath.write_geojson(temps["geojson"], small, classes,
                                 placement=dataclasses.replace(placement, downsample=placement.downsample * factor))
            timings["geojson"] = time.perf_counter() - t0
        counts = np.zeros(256, np.int64)
        counts[: classes.num_outputs] = [prediction.class_pixels[n] for n in classes.all_names]
        comp = tissue_composition.composition(None, classes, mpp=prediction.mpp, counts=counts)
        comp.update({"image": stem, "shape": [height, width], "level": prediction.level,
                     "prediction": {k: v for k, v in prediction.info.items()
                                    if isinstance(v, (int, float, str, bool, type(None)))}})
        if skipped:
            comp["skipped_outputs"] = skipped
        temps["composition"].write_text(json.dumps(comp, indent=2))
        temps["composition-csv"].write_text(tissue_composition.composition_csv(comp), encoding="utf-8")
        if cancel is not None:
            cancel.raise_if_cancelled()
        for final in finals.values():
            if final.exists() and not overwrite:
                raise OutputExistsError(f"{final} appeared while predicting; not overwriting it "
                                        "(use --overwrite).")
        # A marker names the set while it is renamed into place: a run killed between two renames leaves it,
        # and the next run into this folder (see recover_interrupted_outputs) removes the incomplete set.
        marker = _renaming_marker(out_dir, stem)
        marker.write_text("\n".join(p.name for p in finals.values()), encoding="utf-8")
        for key, final in finals.items():
            os.replace(temps[key], final)
        marker.unlink()
    except OSError as err:  # a full disk, a folder made read-only mid-run: said plainly, nothing half-written kept
        import errno as errno_codes

        reason = "the disk is full" if err.errno == errno_codes.ENOSPC else (err.strerror or str(err))
        raise WsssCramError(f"Cannot write the outputs of {stem} into {out_dir}: {reason}. Nothing of {stem} was "
                            "left half-written; free space or choose another output folder, then run again.") \
            from None
    finally:
        for tmp in temps.values():
            if tmp.exists():
                tmp.unlink()
    return summary_row(prediction, stem, comp, finals, timings)


def _renaming_marker(out_dir: Path, stem: str) -> Path:
    return Path(out_dir) / f".{stem}.renaming"


def recover_interrupted_outputs(out_dir: str | os.PathLike) -> list[str]:
    """Clean what killed runs left in ``out_dir``: hidden ``.partial`` temporaries, and the outputs of a set
    whose renaming into place was cut short (they are an incomplete set; the input is simply predicted again).
    Call it only while holding the folder's lock (``io.guard.folder_lock``): then no other run is writing.
    Returns what was removed (file names), for a note to the user."""
    out_dir = Path(out_dir)
    removed: list[str] = []
    if not out_dir.is_dir():
        return removed
    for marker in sorted(out_dir.glob(".*.renaming")):
        # exactly: one name per line (names may hold spaces), and only the outputs of the marker's own stem,
        # so that a damaged or foreign marker can never delete another input's finished result
        stem = marker.name[1:-len(".renaming")]
        own = {p.name for p in output_paths(out_dir, stem, FORMATS).values()}
        for name in marker.read_text(encoding="utf-8").split("\n"):
            target = out_dir / name
            if name in own and target.parent == out_dir and target.is_file():
                target.unlink()
                removed.append(name)
        marker.unlink()
    for temp in sorted(out_dir.glob(".*.partial*")):
        if temp.is_file():
            temp.unlink()
            removed.append(temp.name)
    return removed


def _cancel_hook(cancel: CancelToken | None):
    """A writer progress callback that stops a long OME-TIFF write when cancelled."""
    if cancel is None:
        return None
    return lambda done, total: cancel.raise_if_cancelled()


#: Label maps above this many pixels are vectorised from a nearest-neighbour downsample (bounded memory).
GEOJSON_MAX_PIXELS = 16_000_000


def _geojson_labels(labels: Any) -> tuple[np.ndarray, int]:
    """The label map to vectorise and its downsample factor (1 when small enough)."""
    h, w = labels.shape
    factor = 1
    while (h // factor) * (w // factor) > GEOJSON_MAX_PIXELS:
        factor *= 2
    if factor == 1:
        return np.asarray(labels), 1
    rows = []
    strip = factor * max(1, 256 // factor)  # about 256 full-resolution rows at a time
    for y in range(0, h - h % factor, strip):
        block = np.asarray(labels[y: min(y + strip, h - h % factor)])
        # copy: a view would keep the whole strip alive until the end
        rows.append(block[factor // 2::factor, factor // 2: w - w % factor: factor].copy())
    return np.concatenate(rows, axis=0), factor


def summary_row(prediction: Prediction, stem: str, comp: dict, finals: dict[str, Path],
                timings: dict[str, float]) -> dict[str, Any]:
    """One line of the run summary CSV."""
    info = prediction.info
    row: dict[str, Any] = {
        "image": stem, "height": prediction.shape[0], "width": prediction.shape[1],
        "mpp": prediction.mpp, "tiles": info.get("tiles"), "skipped_tiles": info.get("skipped_tiles"),
        "seconds": round(float(info.get("seconds", 0.0)), 3),
        "model_seconds": round(float(info.get("model_seconds", 0.0)), 3),
        "crf_seconds": round(float(info.get("crf_seconds", 0.0)), 3),
        "write_seconds": round(sum(timings.values()), 3),
        "megapixels_per_second": round(float(info.get("megapixels_per_second", 0.0)), 4),
        "device": info.get("device"),
    }
    for name, value in prediction.class_pixels.items():
        row[f"pixels_{name}"] = value
    if "tsr_stroma_fraction" in comp:  # the dock's TSR, named by what it is (empty: no tumor, undefined)
        fraction = comp["tsr_stroma_fraction"]
        row[tissue_composition.TSR_COLUMN] = None if fraction is None else round(100 * fraction, 2)
        row["tsr_category"] = comp["tsr_category"]
    row["outputs"] = ";".join(p.name for p in finals.values())
    row["skipped_outputs"] = ";".join(comp.get("skipped_outputs", []))
    return row
