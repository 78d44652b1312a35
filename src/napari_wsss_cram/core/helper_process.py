"""One helper process, spawned and proven before use: the CRF (``core.crf.dense_crf_isolated``) and the Segment
dock's GeoJSON import run long C++/numpy work there, so Cancel can kill it at once and the GUI's process never
holds the GIL for seconds. Qt-free."""

from __future__ import annotations

import contextlib
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
