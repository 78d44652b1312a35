"""The base of the docks: one worker lifecycle (start, progress, warnings, cancel, close = cancel), errors in the
dock's own words, persisted settings, and a body that scrolls. The docks add their controls and their job."""

from __future__ import annotations

from collections.abc import Callable, Generator

from qtpy.QtWidgets import QVBoxLayout, QWidget

from ..core.progress import Cancelled, CancelToken
from . import _common as common


class WorkerDock(QWidget):
    """A napari dock that runs one long core job at a time in a worker thread.

    Subclasses set :attr:`SETTINGS` (their QSettings group) and :attr:`FIELDS` (CLI flag -> control, for error
    messages), fill :meth:`body`, return their persisted controls from :meth:`persisted`, call :meth:`start_job`,
    and override the ``on_*`` hooks. Removing the dock (napari's close button) or closing it cancels the job.
    """

    SETTINGS = ""
    FIELDS: dict[str, str] = {}

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.worker = None
        #: How the last job ended: "done", "failed" or "cancelled" ("" while none has ended).
        self.outcome = ""
        self._cancel: CancelToken | None = None
        self._closed = False
        self._followed: list[Callable] = []
        self.message = common.message_label()
        self._body = common.scroll_body(self)
        common.call_when_removed(self, self.shutdown)

    # ----- building -------------------------------------------------------------------------------------------
    def body(self) -> QVBoxLayout:
        """The layout of the dock's (scrolling) contents."""
        return self._body

    def header(self) -> QVBoxLayout:
        """The layout of a strip above the scrolling contents, always in view (for the dock's main buttons)."""
        self.header_widget.setVisible(True)
        return self.header_layout

    def persisted(self) -> dict:
        """``{key: control}`` saved between napari launches."""
        return {}

    def restore_settings(self) -> None:
        """Restore the persisted controls and save them (debounced) whenever one changes."""
        common.restore_settings(self.SETTINGS, self.persisted())
        common.autosave_settings(self.SETTINGS, self.persisted(), self)

    def save_settings(self) -> None:
        common.save_settings(self.SETTINGS, self.persisted())

    def follow_layers(self, callback: Callable) -> None:
        """Call ``callback`` whenever a layer is added or removed (until the dock goes away)."""
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(callback)
        self._followed.append(callback)

    # ----- messages -------------------------------------------------------------------------------------------
    def say(self, text: str, warning: bool = False) -> None:
        """Show ``text`` in the dock's message line."""
        common.show_message(self.message, text, warning=warning)

    def show_error(self, error: BaseException | str) -> str:
        """Show an error in the dock and as a notification, in the dock's words; never raises."""
        text = common.notify_error(error, self.FIELDS)
        common.show_message(self.message, text, error=True)
        return text

    # ----- the job --------------------------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancel is not None and self._cancel.cancelled

    def start_job(self, make_job: Callable[[CancelToken], Generator]) -> None:
        """Run ``make_job(cancel_token)`` (a generator of Progress events returning a result) in a worker thread.

        Its events go to :meth:`on_progress`, the warnings the core logs meanwhile to :meth:`on_warning`, its
        result to :meth:`on_done`, an error to :meth:`on_error`; :meth:`on_finished` runs last in every case.
        """
        from superqt.utils import create_worker  # errors go to our handler only (no traceback popup)

        self._cancel = CancelToken()
        self.outcome = ""
        self.worker = create_worker(common.forward_warnings, make_job(self._cancel), _ignore_errors=True)
        self.worker.yielded.connect(self._on_event)
        self.worker.returned.connect(self._on_returned)
        self.worker.errored.connect(self._on_errored)
        self.worker.finished.connect(self._on_finished)
        self.worker.start()

    def cancel(self) -> None:
        """Ask the job to stop at its next check (the core checks between batches / steps)."""
        if self._cancel is not None and self.worker is not None:
            self._cancel.cancel()

    def _on_event(self, event) -> None:
        if self._closed:
            return
        if event.phase == "warning":
            self.on_warning(common.dock_wording(event.info["message"], self.FIELDS))
        else:
            self.on_progress(event)

    def _on_returned(self, result) -> None:
        self.outcome = "done"
        if not self._closed and not self.cancelled:
            self.on_done(result)

    def _on_errored(self, error) -> None:
        self.outcome = "failed"
        if not isinstance(error, Cancelled) and not self._closed:  # a cancel is reported by on_finished
            self.on_error(error)

    def _on_finished(self) -> None:
        self.worker = None
        if self.cancelled:
            self.outcome = "cancelled"
        self.on_finished(self.cancelled)

    def end_progress(self, bar) -> None:
        """Leave ``bar`` saying how the job ended: full and "Done", "Failed" where it stopped, or "Cancelled"."""
        if self.outcome == "done":
            bar.setMaximum(max(bar.maximum(), 1))
            bar.setValue(bar.maximum())
            bar.setFormat("Done")
        elif self.outcome == "cancelled":
            bar.setValue(0)
            bar.setFormat("Cancelled")
        else:
            bar.setFormat("Failed")

    def on_progress(self, event) -> None:
        """A Progress event of the job."""

    def on_warning(self, text: str) -> None:
        """A warning the core logged during the job (already in the dock's words)."""
        from napari.utils.notifications import show_warning

        show_warning(text)
        self.say(f"Warning: {text}", warning=True)

    def on_done(self, result) -> None:
        """The job's result (not called after a cancel)."""

    def on_error(self, error: BaseException) -> None:
        self.show_error(error)

    def on_finished(self, cancelled: bool) -> None:
        """The worker ended (done, failed or cancelled)."""

    # ----- going away -----------------------------------------------------------------------------------------
    def on_shutdown(self) -> None:
        """Extra clean-up when the dock goes away."""

    def shutdown(self) -> None:
        """The dock is going away: save its settings, cancel its job, stop following the viewer's layers."""
        if self._closed:
            return
        self._closed = True
        self.save_settings()
        self.cancel()
        self.on_shutdown()
        for callback in self._followed:
            for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
                event.disconnect(callback)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        self.shutdown()
        super().closeEvent(event)
