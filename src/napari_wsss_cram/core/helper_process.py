"""One helper process, spawned and proven before use: the CRF (``core.crf.dense_crf_isolated``) and the Segment
dock's GeoJSON import run long C++/numpy work there, so Cancel can kill it at once and the GUI's process never
holds the GIL for seconds. Qt-free."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ProcessPoolExecutor


def ignore_interrupts() -> None:
    """Worker-process initializer: Ctrl-C goes to the main process, which stops the pool; a worker that got it
    too would print its own KeyboardInterrupt traceback over the main process's clean message."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _ping() -> bool:
    return True


def start_helper_pool(timeout: float) -> ProcessPoolExecutor:
    """A one-process pool (spawned: no copy of the GUI's threads), proven by answering a no-op within ``timeout``
    seconds; raises (after stopping it) when it cannot start, e.g. when the main script is not an importable
    file."""
    import multiprocessing

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=ignore_interrupts)
    try:
        pool.submit(_ping).result(timeout=timeout)
    except BaseException:
        kill_pool(pool)
        raise
    return pool


def kill_pool(pool: ProcessPoolExecutor) -> None:
    """Stop a helper pool at once, killing its process (work in it may otherwise run on for long)."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            proc.kill()
    with contextlib.suppress(Exception):
        pool.shutdown(wait=False, cancel_futures=True)


class HelperSlot:
    """The one helper pool kept for a purpose (``pool``: started on first use under ``lock``, then kept; dropped
    and killed when a job in it is cancelled or it breaks, so the next use starts a fresh one)."""

    def __init__(self) -> None:
        self.pool: ProcessPoolExecutor | None = None
        self.lock = threading.Lock()

    def drop(self, pool: ProcessPoolExecutor) -> None:
        """Forget ``pool`` if it is still the kept one, and kill it."""
        with self.lock:
            if self.pool is pool:
                self.pool = None
        kill_pool(pool)
