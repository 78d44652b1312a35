"""Small Qt helpers shared by the docks: persisted settings, device list, messages, path rows."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import traceback
from collections.abc import Callable, Generator
from pathlib import Path

from qtpy.QtCore import QEvent, QObject, QSettings
from qtpy.QtWidgets import (
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..core.errors import WsssCramError

log = logging.getLogger(__name__)

#: Tests and portable installs point this at an .ini file instead of the user's Qt settings store.
SETTINGS_ENV = "WSSS_CRAM_SETTINGS_FILE"


def settings(group: str) -> QSettings:
    """The persisted settings of one dock (kept from one napari launch to the next)."""
    path = os.environ.get(SETTINGS_ENV)
    store = QSettings(path, QSettings.IniFormat) if path else QSettings("napari-wsss-cram", "napari-wsss-cram")
    store.beginGroup(group)
    return store


#: The devices a dock offers before torch is imported (it is imported off the GUI thread: ~3 s on first use).
BASIC_DEVICES = ["auto", "cpu"]


def available_devices() -> list[str]:
    """``auto`` plus the torch devices that exist on this machine (cpu always). Imports torch: call it in a
    worker thread (:func:`in_background`), never while a dock is being built."""
    import torch

    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices.insert(1, "cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.insert(1, "mps")
    return devices


def in_background(function: Callable, on_done: Callable, on_error: Callable, *args):
    """Run ``function(*args)`` in a worker thread; its result goes to ``on_done``, an exception to ``on_error``
    (both on the GUI thread). For short jobs that must not stall napari (imports, loading a checkpoint).

    Pass bound methods of the dock as the callbacks: Qt then drops the call when the dock is gone (a lambda
    would run on its deleted controls)."""
    from superqt.utils import create_worker  # errors go to our handler only (no traceback popup)

    worker = create_worker(function, *args, _ignore_errors=True)
    worker.returned.connect(on_done)
    worker.errored.connect(on_error)
    worker.start()
    return worker


def offer_devices(combo, devices: list[str], group: str, key: str = "device") -> None:
    """Fill ``combo`` with ``devices`` once they are known, keeping the user's choice: the one made meanwhile,
    else the one saved under ``group``/``key`` (which may name a device offered only now, e.g. cuda)."""
    current = combo.currentText()
    saved = settings(group).value(key)
    wanted = current if current != "auto" or saved is None else str(saved)
    combo.blockSignals(True)  # not a choice of the user's: no autosave of a half-filled combo
    combo.clear()
    combo.addItems(devices)
    combo.setCurrentText(wanted if wanted in devices else "auto")
    combo.blockSignals(False)


@contextlib.contextmanager
def leave_gui_a_core():
    """While inference/training runs in a worker thread, keep one core for the Qt event loop (torch's thread
    count is process-wide, so it is restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 2) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def dock_wording(text: str, fields: dict[str, str] | None = None) -> str:
    """Say a core message in a dock's words: the core speaks the CLI (``pass --resume``, ``lower --batch-size``);
    ``fields`` maps a flag (without dashes) to the dock control that sets it. Unknown flags are left as they are.
    """
    if not fields:
        return text

    def field(match: re.Match) -> str:
        name = match.group("flag")
        return f"'{fields[name]}'" if name in fields else match.group(0)

    flag = r"--(?P<flag>[a-z][a-z0-9-]*)"
    # verbs first, so "pass --resume" reads "press 'Resume'" and not "pass 'Resume'"
    text = re.sub(r"\bstart without " + flag, lambda m: "press 'Start'" if m.group("flag") in fields
                  else m.group(0), text)
    text = re.sub(r"\b(pass|use) " + flag, lambda m: (f"use {field(m)}" if m.group("flag") in fields
                                                       else m.group(0)), text)
    return re.sub(flag, field, text)


class _ThreadWarnings(logging.Handler):
    """Collects the WARNING records the package logs from one thread (a worker's), for its dock to show."""

    def __init__(self, thread: int):
        super().__init__(logging.WARNING)
        self.thread = thread
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())

    def drain(self):
        from ..core.progress import Progress

        while self.messages:
            yield Progress("warning", 0, 0, {"message": self.messages.pop(0)})


def forward_warnings(job: Generator) -> Generator:
    """Run a worker ``job`` and also yield ``Progress("warning", 0, 0, {"message": ...})`` for each warning the
    package logs while it runs, so the dock shows it (otherwise it reaches only the terminal). Only records of
    the worker's own thread are taken: the handler is process-wide, the GUI thread logs too."""
    handler = _ThreadWarnings(threading.get_ident())  # runs on the first next(), i.e. in the worker thread
    logger = logging.getLogger("napari_wsss_cram")
    logger.addHandler(handler)
    try:
        while True:
            try:
                event = next(job)
            except StopIteration as stop:
                yield from handler.drain()
                return stop.value
            yield from handler.drain()
            yield event
    finally:
        logger.removeHandler(handler)
        job.close()


def user_message(error: BaseException, fields: dict[str, str] | None = None) -> str:
    """The text a user sees for an error: our own messages as-is (in the dock's words when ``fields`` maps the CLI
    flags they name to dock controls), anything else with its type (logged in full)."""
    if isinstance(error, WsssCramError):
        return dock_wording(str(error), fields)
    log.error("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    return f"{type(error).__name__}: {error}"


def notify_error(error: BaseException | str, fields: dict[str, str] | None = None) -> str:
    """Show an error as a napari notification (never raise into the event loop); return the text shown."""
    from napari.utils.notifications import show_error

    text = dock_wording(error, fields) if isinstance(error, str) else user_message(error, fields)
    show_error(text)
    return text


def notify_warning(text: str, fields: dict[str, str] | None = None) -> str:
    """Show a warning as a napari notification (in the dock's words); return the text shown."""
    from napari.utils.notifications import show_warning

    text = dock_wording(text, fields)
    show_warning(text)
    return text


class _RemovalWatch(QObject):
    """Calls back once when its widget loses its parent (napari's dock close button re-parents the dock's
    widget to None and neither closes nor deletes it, so ``closeEvent`` never runs)."""

    def __init__(self, widget: QWidget, callback: Callable[[], None]):
        super().__init__(widget)
        self._callback = callback
        self._placed = False
        widget.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt naming)
        if event.type() == QEvent.ParentChange:
            if obj.parent() is not None:
                self._placed = True
            elif self._placed:
                self._placed = False
                self._callback()
        return False


def call_when_removed(widget: QWidget, callback: Callable[[], None]) -> None:
    """Run ``callback`` when ``widget``'s dock is removed from the napari window (its close button)."""
    widget._removal_watch = _RemovalWatch(widget, callback)


class _VerticalScroll(QScrollArea):
    """Scrolls its contents vertically only: as wide as the contents need (asked each time the layout is
    computed, so napari's stylesheet and later rows count), as short as a few rows."""

    def minimumSizeHint(self):  # noqa: N802 (Qt naming)
        from qtpy.QtCore import QSize

        body = self.widget()
        width = body.minimumSizeHint().width() if body is not None else 0
        return QSize(width + self.verticalScrollBar().sizeHint().width() + 2, 200)


def scroll_body(dock: QWidget) -> QVBoxLayout:
    """Put a vertical scroll area in ``dock`` and return the layout of its contents: the dock then fits small
    screens (and a collapsed panel gives its height back) instead of growing the napari window."""
    from qtpy.QtCore import Qt

    outer = QVBoxLayout(dock)
    outer.setContentsMargins(0, 0, 0, 0)
    # a fixed strip above the scrolling part, for what must never scroll away (Run, Cancel, the palette);
    # hidden until a dock puts something there
    header = QWidget()
    header_layout = QVBoxLayout(header)
    header_layout.setContentsMargins(9, 6, 9, 0)
    header.setVisible(False)
    outer.addWidget(header)
    dock.header_widget, dock.header_layout = header, header_layout
    area = _VerticalScroll()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
    body = QWidget()
    area.setWidget(body)
    outer.addWidget(area)
    dock.scroll_area = area
    return QVBoxLayout(body)


class FittingTabs(QTabWidget):
    """Tabs as tall as the page shown (a QTabWidget is as tall as its tallest page, which in a scrolling dock
    leaves a short page with a long empty scroll below it)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.currentChanged.connect(self._fit)

    def _fit(self, index: int) -> None:
        from qtpy.QtWidgets import QSizePolicy

        for i in range(self.count()):
            policy = QSizePolicy.Preferred if i == index else QSizePolicy.Ignored
            self.widget(i).setSizePolicy(QSizePolicy.Preferred, policy)
        self.updateGeometry()

    def addTab(self, page: QWidget, label: str) -> int:  # noqa: N802 (Qt naming)
        index = super().addTab(page, label)
        self._fit(self.currentIndex())
        return index


class PathRow(QWidget):
    """A line edit with a Browse button, for a file or a folder."""

    def __init__(self, placeholder: str = "", folder: bool = True, file_filter: str = "", parent=None):
        super().__init__(parent)
        self._folder, self._filter = folder, file_filter
        self.edit = QLineEdit()
        self.edit.setPlaceholderText(placeholder)
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.edit)
        layout.addWidget(browse)

    def _browse(self) -> None:
        start = self.edit.text() or str(Path.home())
        if self._folder:
            chosen = QFileDialog.getExistingDirectory(self, "Choose a folder", start)
        else:
            chosen, _ = QFileDialog.getOpenFileName(self, "Choose a file", start, self._filter)
        if chosen:
            self.edit.setText(chosen)

    def text(self) -> str:
        return self.edit.text().strip()

    def setText(self, text: str) -> None:  # noqa: N802 (Qt naming)
        self.edit.setText(text)


def spin(cls, lo, hi, value=None, step=1, decimals=None):
    """A QSpinBox/QDoubleSpinBox with range, step, value (when given) and decimals (when given)."""
    box = cls()
    box.setRange(lo, hi)
    box.setSingleStep(step)
    if decimals is not None:
        box.setDecimals(decimals)
    if value is not None:
        box.setValue(value)
    return box


def message_label() -> QLabel:
    label = QLabel()
    label.setWordWrap(True)
    return label


def show_message(label: QLabel, text: str, error: bool = False, warning: bool = False) -> None:
    """Show ``text`` in a dock's message line (red for an error, orange for a warning)."""
    label.setText(text)
    label.setStyleSheet("color: #ff6e6e;" if error else "color: #f39800;" if warning else "")


def widget_value(widget):
    """The persisted value of a simple input widget."""
    from qtpy.QtWidgets import QAbstractButton, QComboBox

    if isinstance(widget, QComboBox):
        return widget.currentText()
    if isinstance(widget, QAbstractButton):
        return bool(widget.isChecked())
    if isinstance(widget, PathRow):
        return widget.text()
    return widget.value()


def set_widget_value(widget, value) -> None:
    """Restore a persisted value, ignoring values that no longer fit (a device that went away...)."""
    from qtpy.QtWidgets import QAbstractButton, QComboBox, QDoubleSpinBox, QSpinBox

    try:
        if isinstance(widget, QComboBox):
            if widget.findText(str(value)) >= 0:
                widget.setCurrentText(str(value))
        elif isinstance(widget, QAbstractButton):
            widget.setChecked(str(value).lower() in ("true", "1"))
        elif isinstance(widget, PathRow):
            widget.setText(str(value))
        elif isinstance(widget, QSpinBox):
            widget.setValue(int(float(value)))
        elif isinstance(widget, QDoubleSpinBox):
            widget.setValue(float(value))
        elif hasattr(widget, "setValue"):  # magicgui's integer box (superqt's QLargeIntSpinBox): keep its type
            widget.setValue(type(widget.value())(float(value)))
    except (TypeError, ValueError):
        log.warning("Ignoring an unreadable saved setting %r", value)


def save_settings(group: str, widgets: dict) -> None:
    """Persist the values of ``{key: widget}`` under ``group``."""
    store = settings(group)
    for key, widget in widgets.items():
        store.setValue(key, widget_value(widget))
    store.sync()


def restore_settings(group: str, widgets: dict) -> None:
    """Restore the values saved by :func:`save_settings` (missing keys keep the widget defaults)."""
    store = settings(group)
    for key, widget in widgets.items():
        if store.contains(key):
            set_widget_value(widget, store.value(key))


def autosave_settings(group: str, widgets: dict, parent) -> None:
    """Save ``widgets`` (debounced) whenever one changes, so settings survive however napari is closed."""
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QAbstractButton, QComboBox

    timer = QTimer(parent, singleShot=True, interval=500)
    timer.timeout.connect(lambda: save_settings(group, widgets))
    for widget in widgets.values():
        if isinstance(widget, QComboBox):
            widget.currentTextChanged.connect(lambda *_: timer.start())
        elif isinstance(widget, QAbstractButton):
            widget.toggled.connect(lambda *_: timer.start())
        elif isinstance(widget, PathRow):
            widget.edit.textChanged.connect(lambda *_: timer.start())
        else:
            widget.valueChanged.connect(lambda *_: timer.start())
