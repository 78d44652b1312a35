"""Progress events and cancellation shared by training, inference and the CLI/widgets.

Long work is written as a generator that yields :class:`Progress` and *returns* its result
(the stardist-napari pattern): napari's ``thread_worker`` forwards yields to the GUI and the
return value to ``returned``; the CLI drives the same generator with :func:`drive`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class Cancelled(Exception):
    """Raised inside long work when its :class:`CancelToken` was cancelled."""


@dataclass
class Progress:
    """One progress report: ``done`` of ``total`` units of ``phase`` (what the work is doing now: ``"train"``,
    ``"val"``, ``"predict"``, ``"file"``...); ``info`` holds extras (losses, eta...). "Stage" is kept for the
    training stages (stage 1, stage 2)."""

    phase: str
    done: int
    total: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, self.done / self.total)


class CancelToken:
    """Thread-safe cancel flag, checked by the worker at every step/tile."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("Cancelled by the user.")


ProgressCallback = Callable[[Progress], None]


def drive(gen: Generator[Progress, None, T], callback: ProgressCallback | None = None) -> T:
    """Run a progress generator to completion, passing each event to ``callback``; return its result."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(event)
