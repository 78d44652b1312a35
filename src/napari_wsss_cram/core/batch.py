"""Segmenting many images: inputs (files and folders), one process's share, per-file outputs and the run summary.

``wsss-cram predict`` (one or many ranks) and the Segment dock's batch mode both go through here.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from .errors import WsssCramError
from .io.formats import IMAGE_SUFFIXES, image_stem, image_suffix, is_image_file
from .progress import CancelToken, Progress

log = logging.getLogger(__name__)

#: The run summary written beside the outputs.
SUMMARY_NAME = "predict_summary.csv"
#: What a folder input expands to: every image suffix but ``.dcm`` (a folder of .dcm files is one DICOM slide,
#: its files are its levels, never one input per file).
FOLDER_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s != ".dcm")


def collect_inputs(items: list[str]) -> list[Path]:
    """Files as given; folders expanded to the images they hold (sorted), except that a folder of ``.dcm``
    files is one DICOM slide. Missing paths raise."""
    from .errors import ImageReadError
    from .io.images import dicom_file_of

    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir() and dicom_file_of(p) is not None:
            paths.append(p)  # a DICOM slide: its .dcm files are its levels, one input
        elif p.is_dir():
            found = sorted(f for f in p.iterdir() if is_image_file(f, FOLDER_SUFFIXES))
            if not found:
                raise ImageReadError(f"Folder '{p}' holds no images ({', '.join(FOLDER_SUFFIXES)}).")
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        else:
            raise ImageReadError(f"Input '{p}' does not exist; check the path.")
    return paths


def stem_of(path: Path) -> str:
    """File name without its image suffix (``slide.ome.tif`` -> ``slide``; a DICOM folder keeps its name)."""
    return image_stem(path) if image_suffix(path) else path.name


def shard(items: list[Any], rank: int, world: int) -> list[Any]:
    """The items rank ``rank`` of ``world`` handles (round-robin: every item exactly once)."""
    return items[rank::world]


def iter_predict_many(model: Any, info: Any, inputs: list[Path], out_dir: Path, settings: Any,
                      formats: tuple[str, ...], overwrite: bool, rank: int = 0, world: int = 1,
                      fallback: Any = None, cancel: CancelToken | None = None, reader: str = "auto",
                      channels: tuple[int, int, int] | None = None) -> Generator[Progress, None, list[dict]]:
    """Predict this rank's share of ``inputs`` and write their outputs; returns one summary row per input.

    Yields ``Progress("file", i, n, {"name"})`` before each input and after the last, the engine's own
    events (tiles) in between, and ``Progress("warning", 0, 0, {"message"[, "error"]})`` for a note or an input
    that failed; stops at ``cancel`` between tiles and files. ``fallback`` (settings, or None):
    used instead of ``settings`` for an image that does not state its µm/px (the default resolution's
    training-scale fallback; one warning is logged). A bad input does not stop the others: its row has
    ``status`` = the error message. ``reader``: which library reads slides (``core.io.formats.READERS``);
    ``channels``: the red, green and blue channels of images with more than 3 (refused without them).
    """
    from .checkpoint import default_resolution
    from .errors import WsssCramError
    from .inference import predict_source
    from .io.images import ImageSource
    from .io.writers import write_outputs

    noted = False
    rows = []
    mine = shard(inputs, rank, world)
    for index, path in enumerate(mine):
        if cancel is not None:
            cancel.raise_if_cancelled()
        yield Progress("file", index, len(mine), {"name": path.name})
        stem = stem_of(path)
        try:
            with ImageSource.open(path, reader=reader, channels=channels) as source:
                use = settings
                if fallback is not None and source.mpp is None:
                    use = fallback
                    if not noted:
                        yield Progress("warning", 0, 0, {"message": (
                            f"{path.name} does not state its µm/px, so it (and any other such input) is "
                            f"processed at {default_resolution(info, False).describe()}.")})
                        noted = True
                prediction = yield from predict_source(model, info, source, use, None, cancel=cancel)
            try:
                row = write_outputs(prediction, out_dir, stem, formats, overwrite=overwrite)
            finally:
                prediction.cleanup()
            row["status"] = "ok"
            log.info("%s: %dx%d px, %d tiles (%d background), %.1f s (model %.1f s, CRF %.1f s)", path.name,
                     row["height"], row["width"], row["tiles"], row["skipped_tiles"], row["seconds"],
                     row["model_seconds"], row["crf_seconds"])
        except WsssCramError as err:  # reported, and the next input goes on
            yield Progress("warning", 0, 0, {"message": str(err), "error": True})
            row = {"image": stem, "status": f"error: {err}"}
        row["input"] = str(path)
        row["rank"] = rank
        rows.append(row)
    yield Progress("file", len(mine), len(mine), {"name": ""})
    return rows


def check_batch_inputs(paths: list[Path], out_dir: Path, formats: tuple[str, ...], where: str = "output folder",
                       given: list[str | Path] | None = None) -> list[str]:
    """The checks of a batch before anything is written into ``out_dir`` (not even its lock): names that would
    collide, outputs that would replace an input, an output folder that is (or is inside) an input folder
    (``given``: the files and folders as the user named them), a folder that cannot be written. Returns the
    output stems."""
    from .io.guard import check_output_folder, ensure_writable_folder
    from .io.writers import check_outputs_spare_inputs

    stems = [stem_of(p) for p in paths]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise WsssCramError(f"Several inputs share the name(s) {', '.join(duplicates)}; their outputs would "
                            f"collide. Rename them or segment them into different {where}s.")
    for stem in stems:
        check_outputs_spare_inputs(out_dir, stem, formats, paths)
    # the one output guard: never an input folder, nor inside one (outputs would be read back as inputs)
    check_output_folder(out_dir, [*paths, *(given or ())], where)
    ensure_writable_folder(out_dir, where)
    return stems


def check_batch_outputs(paths: list[Path], stems: list[str], out_dir: Path, formats: tuple[str, ...],
                        overwrite: bool, where: str = "output folder") -> Path:
    """The checks inside the folder's lock, before any work: no output (nor the run summary) exists unless
    ``overwrite``, and the summary replaces no input. Returns the summary path."""
    from .io.guard import ensure_can_write
    from .io.writers import check_outputs_free

    for stem in stems:
        check_outputs_free(out_dir, stem, formats, overwrite, inputs=paths)
    summary_path = out_dir / SUMMARY_NAME
    if summary_path.resolve() in {p.resolve() for p in paths}:
        raise WsssCramError(f"The run summary '{summary_path}' would replace an input; choose another {where}.")
    ensure_can_write(summary_path, overwrite)
    return summary_path


def predict_batch(model: Any, info: Any, inputs: list[str | Path], out_dir: str | Path, settings: Any,
                  formats: tuple[str, ...], overwrite: bool = False, cancel: CancelToken | None = None,
                  fallback: Any = None, reader: str = "auto", channels: tuple[int, int, int] | None = None, *,
                  rank: int = 0, world: int = 1, gather: Callable[[list[dict]], list[dict] | None] | None = None,
                  given: list[str | Path] | None = None, where: str = "output folder",
                  load: Callable[[], tuple] | None = None) -> Generator[Progress, None, tuple[list[dict], Path]]:
    """Segment files and folders of images into ``out_dir`` with one ``predict_summary.csv``: the one flow of
    ``wsss-cram predict`` (spread over ranks under torchrun) and the Segment dock's batch mode.

    Everything is checked before any work (:func:`check_batch_inputs`, then inside the folder's lock, which rank 0
    holds, :func:`check_batch_outputs`); what an interrupted run left is removed first (a note says so).
    ``fallback``: settings for images that state no µm/px (see :func:`iter_predict_many`). ``load``: called once
    the checks passed, returns ``(model, info, settings, fallback)`` in place of the arguments (the CLI loads its
    checkpoint only then). ``gather``: this rank's rows -> all ranks' rows on rank 0 (None elsewhere); rank 0 writes
    the summary. Returns (the rows: all of them on rank 0, this rank's elsewhere; the summary path).
    """
    import contextlib

    from .io.atomic import atomic_path
    from .io.guard import folder_lock
    from .io.writers import recover_interrupted_outputs

    out_dir = Path(out_dir)
    paths = collect_inputs([str(p) for p in inputs])
    # first of all, before anything is written there (not even the lock)
    stems = check_batch_inputs(paths, out_dir, formats, where=where, given=[*inputs, *(given or ())])
    with contextlib.ExitStack() as stack:
        if rank == 0:  # one run per folder: the other ranks of this run write beside rank 0, never alone
            stack.enter_context(folder_lock(out_dir, "wsss-cram predict"))
            removed = recover_interrupted_outputs(out_dir)
            if removed:
                yield Progress("warning", 0, 0, {"message": f"removed what an interrupted run left in {out_dir}: "
                                                            f"{', '.join(removed)}"})
        # every rank checks everything, so all ranks fail alike
        summary_path = check_batch_outputs(paths, stems, out_dir, formats, overwrite, where=where)
        if load is not None:
            model, info, settings, fallback = load()
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = yield from iter_predict_many(model, info, paths, out_dir, settings, formats, overwrite, rank, world,
                                            fallback=fallback, cancel=cancel, reader=reader, channels=channels)
        all_rows = gather(rows) if gather is not None else rows
        if all_rows is not None:
            order = {str(p): i for i, p in enumerate(paths)}
            all_rows.sort(key=lambda r: order.get(r.get("input", ""), 0))
            with atomic_path(summary_path) as tmp:
                tmp.write_text(summary_csv(all_rows))
    return (rows if all_rows is None else all_rows), summary_path


def summary_csv(rows: list[dict]) -> str:
    """The run summary as CSV text (columns: union of the rows' keys, first-seen order; decimals rounded to 4
    places; ``rank`` only when several processes shared the run, it says which one did an image)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    if all(not row.get("rank") for row in rows) and "rank" in columns:
        columns.remove("rank")
    rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k in columns}
            for row in rows]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


