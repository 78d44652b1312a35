"""QuPath GeoJSON import off the GUI thread: the reader's drop and the Segment dock's *Import QuPath annotations…*.

Why a helper process: the core rasterises each ring with ``skimage.draw.polygon`` and reads the file with
``json.loads``; both hold the GIL for their whole call (a slide-region export, 6 MB and 7,800 rings, took 16 s on
a quiet machine and 38 s on a busy one, with the GUI frozen even from a worker thread: a thread alone does not
free the event loop). A worker thread waits on a spawned helper (waiting releases the GIL), reports progress
and stops it on Cancel. Small files (cheap to read and to fill) stay in the worker thread, without the helper's
start-up (~1-2 s).

Nothing here imports Qt at module level: the helper process imports this module.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from ..core.helper_process import HelperSlot, start_helper_pool
from ..core.progress import CancelToken, Progress

log = logging.getLogger(__name__)

#: Files up to this size are read in the worker thread (json.loads holds the GIL: ~50 ms for 256 KB).
SMALL_FILE_BYTES = 256 * 1024
#: A ring whose box (in label pixels) times its vertex count exceeds this costs skimage ~50 ms of held GIL.
RING_COST_LIMIT = 4_000_000
#: Longest side of imported labels (the paintable level; tests lower it).
MAX_SIDE = 8192
#: Seconds the helper may take to start (spawn + imports) before the import runs in the worker thread.
HELPER_START_TIMEOUT = 60.0

_HELPER = HelperSlot()  # the process that reads and rasterises large GeoJSON files


def choose_image(bounds: tuple[float, float, float, float], candidates: Sequence[tuple[int, int]]) -> int | None:
    """Index of the image (level-0 (height, width), in preference order) that holds every annotation, else the
    one they overlap most (they are clipped to it); None when they overlap none."""
    y0, x0, y1, x1 = bounds
    for index, (h, w) in enumerate(candidates):
        if y1 <= h and x1 <= w:
            return index

    def overlap(shape) -> float:
        h, w = shape
        return max(0.0, min(y1, h) - max(y0, 0.0)) * max(0.0, min(x1, w) - max(x0, 0.0))

    if not candidates:
        return None
    best = max(range(len(candidates)), key=lambda i: overlap(candidates[i]))  # the first of equals
    return best if overlap(candidates[best]) > 0 else None


def rasterise(path: str, candidates: Sequence[tuple[int, int]], classes, class_map=None,
              max_side: int = MAX_SIDE, fixed: bool = False) -> tuple[int | None, Any, int]:
    """Read ``path`` once, pick its image among ``candidates`` (level-0 shapes; ``fixed``: the first one, the
    annotations clipped to it), rasterise -> (index of the image or None, QuPathImport, downsample). Runs in the
    helper process or a worker thread."""
    import json

    from ..core.errors import WsssCramError
    from ..core.io import qupath

    try:  # read once: the bounds and the rasterisation both need the features
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        data = path  # the core reads it again and says what is wrong, naming the file
    if not isinstance(data, str):
        where = f"GeoJSON '{path}'"
        features, _ = qupath.load_features(data)
        data = {"type": "FeatureCollection", "features": features}
    else:
        where = None
    if fixed and candidates:
        index = 0
    else:
        index = choose_image(qupath.features_bounds(data), candidates)
    shape = candidates[index] if index is not None else qupath.features_extent(data)
    try:
        imported, d = qupath.qupath_to_level_labels(data, shape, classes, max_side=max_side, class_map=class_map)
    except WsssCramError as err:  # the core names "GeoJSON" for parsed data: name the file
        if where is None:
            raise
        raise WsssCramError(str(err).replace("GeoJSON:", f"{where}:", 1)) from None
    return index, imported, d


def needs_helper(path: str, shapes: Sequence[tuple[int, int]], max_side: int = MAX_SIDE) -> bool:
    """True when reading or filling ``path`` would hold the GIL for long (a big file, or a ring that costs
    skimage more than RING_COST_LIMIT box pixels x vertices on the largest candidate's labels)."""
    import json

    import numpy as np

    try:
        if os.path.getsize(path) > SMALL_FILE_BYTES:
            return True
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False  # the core's error message, at once
    from ..core.io import qupath

    try:
        features, _ = qupath.load_features(data)
    except Exception:  # noqa: BLE001 - said by the import itself
        return False
    d = min((qupath.downsample_for(s, max_side) for s in shapes), default=1)
    for feat in features:
        geom = feat.get("geometry") if isinstance(feat, dict) else None
        for poly in (qupath._polygons(geom) or []) if isinstance(geom, dict) else []:
            for ring in poly or []:
                try:
                    xy = np.asarray(ring, float)
                except (TypeError, ValueError):
                    continue
                if xy.ndim != 2 or xy.shape[1] < 2 or not len(xy) or not np.isfinite(xy[:, :2]).all():
                    continue
                span = (xy[:, :2].max(axis=0) - xy[:, :2].min(axis=0)) / d + 1
                if float(span[0] * span[1]) * len(xy) > RING_COST_LIMIT:
                    return True
    return False


def _helper():
    """The helper process pool (spawned once, then kept), or None when it cannot start (then: in the thread)."""
    with _HELPER.lock:
        if _HELPER.pool is None:
            try:
                _HELPER.pool = start_helper_pool(HELPER_START_TIMEOUT)
            except Exception as err:  # noqa: BLE001 - any failure to start: read in the worker thread
                log.info("The GeoJSON helper process could not start (%s): reading in a thread.", err)
                return None
        return _HELPER.pool


def import_job(path: str, candidates: Sequence[tuple[int, int]], classes, class_map, cancel: CancelToken,
               max_side: int | None = None, fixed: bool = False) -> Generator[Progress, None, tuple]:
    """Read and rasterise QuPath annotations off the GUI thread -> (image index or None, QuPathImport, d).

    Yields ``Progress("qupath", seconds, 0, {"stage": ...})`` about ten times a second (the file gives no
    count to progress by: the bar is a busy one with the time so far); ``cancel`` stops it within 0.1 s."""
    from concurrent.futures import TimeoutError as FutureTimeout
    from concurrent.futures.process import BrokenProcessPool

    max_side = MAX_SIDE if max_side is None else max_side
    name = Path(path).name
    started = time.monotonic()
    yield Progress("qupath", 0, 0, {"file": name, "stage": "reading"})
    shapes = list(candidates) if candidates else []
    pool = _helper() if needs_helper(path, shapes, max_side) else None
    cancel.raise_if_cancelled()
    if pool is None:
        return rasterise(path, candidates, classes, class_map, max_side, fixed)
    try:
        future = pool.submit(rasterise, path, candidates, classes, class_map, max_side, fixed)
        while True:
            try:
                return future.result(timeout=0.1)
            except FutureTimeout:
                if cancel.cancelled:
                    _HELPER.drop(pool)
                    cancel.raise_if_cancelled()
                yield Progress("qupath", int(time.monotonic() - started), 0, {"file": name, "stage": "filling"})
    except BrokenProcessPool as err:  # the helper died (e.g. out of memory): say so, try here
        _HELPER.drop(pool)
        log.warning("The GeoJSON helper process stopped (%s); reading %s here instead.", err, name)
        return rasterise(path, candidates, classes, class_map, max_side, fixed)


def progress_words(event: Progress) -> str:
    """``Importing annotations.geojson… 12 s`` for a progress bar or message."""
    seconds = f" {event.done} s" if event.done else ""
    return f"Importing {event.info.get('file', 'annotations')}…{seconds}"


class QuPathImportRun:
    """One import running in a napari worker: a busy progress bar in napari, ``cancel()``, and the result (the
    image it went on, the layer data, the QuPathImport) handed to ``on_done`` on the GUI thread."""

    def __init__(self, path: str, images: list, classes, class_map, on_done, on_error, *, fixed: bool = False,
                 on_progress=None, on_finished=None, cancel_button: bool = False) -> None:
        from napari.utils import progress
        from superqt.utils import create_worker

        from ._common import forward_warnings
        from .layers import level0_shape_of, qupath_layer_from_import

        self.path, self.cancel_token = str(path), CancelToken()
        candidates = [level0_shape_of(ly) for ly in images]  # read here, on the GUI thread
        own_name = Path(path).stem

        def job():
            index, imported, d = yield from import_job(self.path, candidates, classes, class_map,
                                                       self.cancel_token, fixed=fixed)
            image = images[index] if index is not None else None
            # the fingerprint hashes the whole labels: here, off the GUI thread
            data = qupath_layer_from_import(imported, d, image, classes, name=None if image is not None else own_name)
            return image, data, imported

        self._pbar = progress(total=0, desc=f"WSSS-CRAM: importing {Path(path).name}")
        self._on_progress, self._on_finished = on_progress, on_finished
        self.notification = None
        if cancel_button:  # a dropped file has no dock to cancel from: a button in napari's notification
            self.notification = _notify_with_cancel(f"Importing {Path(path).name} in the background…", self.cancel)
        self._returned = False
        self.worker = create_worker(forward_warnings, job(), _ignore_errors=True)
        self.worker.yielded.connect(self._progress)
        self.worker.returned.connect(self._mark_returned)  # connected first: runs before on_done
        self.worker.returned.connect(on_done)
        self.worker.errored.connect(lambda err: None if self.cancelled else on_error(err))
        self.worker.finished.connect(self._finished)
        self.worker.start()

    @property
    def cancelled(self) -> bool:
        return self.cancel_token.cancelled

    @property
    def running(self) -> bool:
        return self.worker is not None

    def cancel(self, *_args) -> None:
        """Stop the import within about 0.1 s; no layer is added."""
        self.cancel_token.cancel()

    def _mark_returned(self, _result) -> None:
        self._returned = True

    def _progress(self, event) -> None:
        if event.phase == "warning":
            from napari.utils.notifications import show_warning

            show_warning(event.info["message"])
            return
        if self._returned:  # a progress event handled after the result: it would overwrite "Imported ..."
            return
        if self._on_progress is not None:
            self._on_progress(event)
        # last: napari's bar processes events while it repaints, so the result (queued behind this event) can be
        # handled inside this call; anything said after it would overwrite the dock's "Imported ..." message
        if self._pbar is not None:
            self._pbar.set_description(f"WSSS-CRAM: {progress_words(event)}")

    def _finished(self) -> None:
        self.worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self._on_finished is not None:
            # called from here, not from a second slot on `finished`: under load such a slot, connected to the
            # same signal, was sometimes never called (a dropped import stayed "running" for ever)
            self._on_finished(self)


def _notify_with_cancel(text: str, cancel) -> Any:
    """An info notification in napari with a Cancel button (returned, or None outside napari's GUI)."""
    try:
        from napari.utils.notifications import Notification, NotificationSeverity, notification_manager
    except ImportError:  # pragma: no cover - napari is there when a reader runs
        return None
    note = Notification(text, NotificationSeverity.INFO, actions=[("Cancel", cancel)])
    notification_manager.dispatch(note)
    return note
