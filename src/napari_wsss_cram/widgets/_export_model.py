"""*Export model…* for the Train and Segment docks: a small form (package file, authors, licence, name), then
``core.zoo.export.export_model`` in a worker thread, reported in the dock's message line. The docks only add a
button that calls :meth:`ModelExporter.ask`."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import QObject
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QWidget,
)

from ..core.progress import CancelToken

#: offered in the licence box (any SPDX identifier may be typed); none is chosen for the user
LICENSES = ("", "CC-BY-4.0", "CC0-1.0", "MIT", "BSD-3-Clause", "Apache-2.0", "CC-BY-NC-4.0")
#: what the docks' error messages call the form's fields
FIELDS = {"author": "Authors", "license": "Licence", "out": "Package", "overwrite": "Replace an existing package"}


class ExportModelDialog(QDialog):
    """Where to write the package and the facts the export must not guess (authors, licence)."""

    def __init__(self, checkpoint: str | Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Export model (bioimage.io package)")
        checkpoint = Path(checkpoint)
        self.out_edit = QLineEdit(str(checkpoint.with_name(f"{checkpoint.stem}_bioimageio.zip")))
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(browse)
        self.authors_edit = QLineEdit()
        self.authors_edit.setPlaceholderText("Name <email>; Other Name")
        self.authors_edit.setToolTip("Who made the model; several separated by ';' (required)")
        self.license_combo = QComboBox()
        self.license_combo.setEditable(True)
        self.license_combo.addItems(list(LICENSES))
        self.license_combo.setToolTip("An SPDX licence identifier (required), e.g. CC-BY-4.0 or MIT")
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("default: WSSS-CRAM <backbone> <classes>")
        self.overwrite_check = QCheckBox("Replace an existing package")
        form = QFormLayout(self)
        form.addRow("Checkpoint", QLineEdit(str(checkpoint), readOnly=True))
        form.addRow("Package", out_row)
        form.addRow("Authors", self.authors_edit)
        form.addRow("Licence", self.license_combo)
        form.addRow("Name", self.name_edit)
        form.addRow(self.overwrite_check)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def _browse(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Model package", self.out_edit.text(), "Zip (*.zip)")
        if path:
            self.out_edit.setText(path)

    def values(self) -> dict:
        """The export's keyword arguments as the user gave them."""
        return {"out": self.out_edit.text().strip(),
                "authors": [a.strip() for a in self.authors_edit.text().split(";") if a.strip()],
                "license": self.license_combo.currentText().strip(),
                "name": self.name_edit.text().strip() or None,
                "overwrite": self.overwrite_check.isChecked()}


class ModelExporter(QObject):
    """Runs one export at a time for ``dock`` (a WorkerDock), independent of the dock's own job."""

    def __init__(self, dock) -> None:
        super().__init__(dock)
        self.dock = dock
        self.worker = None
        self.result = None
        self._cancel: CancelToken | None = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    def ask(self, checkpoint: str | Path | None) -> bool:
        """Show the form for ``checkpoint`` and start the export when it is accepted."""
        if not checkpoint:
            self.dock.show_error("No model to export yet: train one, or choose a checkpoint.")
            return False
        dialog = ExportModelDialog(checkpoint, self.dock)
        if dialog.exec_() != QDialog.Accepted:
            return False
        return self.start(checkpoint, **dialog.values())

    def start(self, checkpoint: str | Path, out: str, authors: list[str], license: str, name: str | None = None,
              overwrite: bool = False) -> bool:
        """Check the request at once (a missing author or licence, an existing file), then export in a worker."""
        from superqt.utils import create_worker

        from ..core.zoo.export import check_export_request, export_model, require_bioimageio

        if self.running:
            self.dock.show_error("A model export is already running; wait for it to finish.")
            return False
        try:
            require_bioimageio()
            check_export_request(out, authors, license, overwrite, checkpoint)
        except Exception as err:  # shown in the dock, never raised into the event loop
            self._show_error(err)
            return False
        self._cancel = CancelToken()
        self.result = None
        self.worker = create_worker(export_model, str(checkpoint), out, authors, license, name=name,
                                    overwrite=overwrite, cancel=self._cancel, _ignore_errors=True)
        self.worker.yielded.connect(self._on_progress)
        self.worker.returned.connect(self._on_done)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self.dock.say(f"Exporting the model to {out}…")
        self.worker.start()
        return True

    def cancel(self) -> None:
        """Stop the export at its next step (nothing is left behind)."""
        if self._cancel is not None:
            self._cancel.cancel()

    def _on_progress(self, event) -> None:
        self.dock.say(f"Exporting the model: {event.info.get('step', '')} ({event.done}/{event.total})")

    def _on_done(self, result) -> None:
        self.result = result
        self.dock.say(f"Exported {result.path} ({result.size_bytes / 1e6:.0f} MB, {result.seconds:.0f} s): a "
                      "bioimage.io package for QuPath and the model zoo; it also loads here as a checkpoint.")

    def _on_error(self, error) -> None:
        from ..core.progress import Cancelled

        if not isinstance(error, Cancelled):
            self._show_error(error)

    def _show_error(self, error: BaseException) -> None:
        """In the dock's message line and as a notification, with the CLI's flags named as the form's fields."""
        from . import _common as common

        common.show_message(self.dock.message, common.notify_error(error, FIELDS), error=True)

    def _on_finished(self) -> None:
        self.worker = None
