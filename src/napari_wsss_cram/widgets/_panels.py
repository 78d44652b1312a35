"""Panels of the Segment dock: "Advanced" settings (CRF, overlap, alpha/beta) and "Correct and export"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)
from superqt import QCollapsible

from ..core.classes import WSSS4LUAD, ClassSpec
from ..core.errors import WsssCramError
from ..core.placement import Placement
from . import _common as common
from . import layers as result_layers


class AdvancedPanel(QCollapsible):
    """Output rules, tiles, CRF refinement and its parameters, and the alpha/beta pseudo-label view: three magicgui
    forms generated from the settings dataclasses (``PredictSettings``, ``CRFParams``, ``ModelConfig``'s
    alpha/beta), so their defaults, bounds and help have one owner each."""

    def __init__(self):
        from ..core.crf import CRFParams
        from ..core.inference import PredictSettings
        from ..core.model.config import ModelConfig
        from ._forms import SettingsForm

        super().__init__("Advanced")
        body = QWidget()
        form = QFormLayout(body)
        self.predict_form = SettingsForm(PredictSettings)
        self.crf_form = SettingsForm(CRFParams)
        self.pseudo_form = SettingsForm(ModelConfig, ("alpha", "beta"))
        # the dock's names of the generated widgets (its settings persist by them; tests drive them)
        self.tile_spin = self.predict_form.native_of("tile")
        self.overlap_spin = self.predict_form.native_of("overlap")
        self.crf_check = self.predict_form.native_of("crf")
        self.gate_check = self.predict_form.native_of("gate_classes")
        self.background_combo = self.predict_form.native_of("background")
        self.crf_spins = {name: self.crf_form.native_of(name) for name in self.crf_form.names
                          if name != "iterations"}
        self.crf_iterations = self.crf_form.native_of("iterations")
        self.alpha_spin = self.pseudo_form.native_of("alpha")
        self.beta_spin = self.pseudo_form.native_of("beta")
        self.pseudo_check = QCheckBox("Show reliable pseudo-labels (alpha/beta)")
        self.pseudo_check.setToolTip("Add a hidden layer with the reliable pseudo-labels training would use")
        for item in (self.predict_form, self.crf_form, self.pseudo_form):
            form.addRow(item.native)
        form.addRow(self.pseudo_check)
        self.crf_check.toggled.connect(self.crf_form.native.setEnabled)
        self.crf_form.native.setEnabled(self.crf_check.isChecked())
        self.addWidget(body)


WHOLE_LAYER = "Whole labels layer"


class ClassPalette(QWidget):
    """One button per class (its colour and name, keys 1..K) and one for the background: the legend of the
    labels layer, and the way to pick what to paint."""

    def __init__(self, pick):
        super().__init__()
        self._pick = pick
        self.buttons: list[QPushButton] = []
        self._layout = QGridLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._layout.setSpacing(4)

    def set_classes(self, classes: ClassSpec | None) -> None:
        """Rebuild the buttons for ``classes`` (None: no labels layer, no buttons)."""
        for button in self.buttons:
            self._layout.removeWidget(button)
            button.deleteLater()
        self.buttons = []
        if classes is None:
            return
        entries = [(k, name, classes.colors[k], str(k + 1) if k < 9 else "")
                   for k, name in enumerate(classes.names)]
        entries.append((classes.background_index, "background (erase)", None, "0"))
        for index, name, rgb, key in entries:
            button = QPushButton(name)
            swatch = QPixmap(14, 14)  # the class colour as an icon: dark class colours stay legible as text would not
            swatch.fill(QColor(*rgb) if rgb is not None else QColor(0, 0, 0, 0))
            button.setIcon(QIcon(swatch))
            button.setToolTip(f"Paint '{name}' on the labels layer" + (f" (key {key})" if key else "")
                              if rgb is not None else "Erase to background, i.e. no tissue (key 0)")
            button.clicked.connect(lambda _=False, i=index: self._pick(i))
            self._layout.addWidget(button, len(self.buttons) // 2, len(self.buttons) % 2)
            self.buttons.append(button)


class ExportPanel(QGroupBox):
    """Export a (corrected) Labels layer through the core writers and show its tissue composition."""

    def __init__(self, viewer, message_label, default_classes=lambda: None):
        super().__init__("Correct and export")
        self.viewer, self.message, self._default_classes = viewer, message_label, default_classes
        self._watched: set[int] = set()
        form = QFormLayout(self)
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("The Labels layer to paint, measure and export (your corrections included)")
        self.palette = ClassPalette(self.pick_class)  # placed by the dock, above its scrolling part
        self.region_combo = QComboBox()
        self.region_combo.setToolTip("Measure the whole labels layer, or only inside the shapes of a Shapes layer "
                                     "(draw a region with napari's shape tools)")
        self.export_dir = common.PathRow("output folder")
        self.export_dir.setToolTip("Folder for the exported files; existing files are replaced only if you agree")
        self.format_checks = {fmt: QCheckBox(text) for fmt, text in
                              [("png", "PNG"), ("ome-tiff", "OME-TIFF"), ("geojson", "QuPath GeoJSON")]}
        formats = QHBoxLayout()
        for check in self.format_checks.values():
            check.setChecked(True)
            formats.addWidget(check)
        tips = {"png": "Palette PNG: class indices with the class colours (WSSS4LUAD convention)",
                "ome-tiff": "Pyramidal OME-TIFF with the pixel size; opens as labels in napari",
                "geojson": "QuPath GeoJSON: one classified polygon per region, in full-resolution pixels"}
        for fmt, check in self.format_checks.items():
            check.setToolTip(tips[fmt])
        # PNG cannot carry a position: said before the export, for the results that have one
        self.position_note = QLabel("PNG keeps no position or pixel size: only the OME-TIFF and the GeoJSON "
                                    "re-open where these labels lie on the image.")
        self.position_note.setWordWrap(True)
        self.position_note.setStyleSheet("color: #f39800;")
        self.position_note.setVisible(False)
        self.format_checks["png"].toggled.connect(lambda _: self.show_position_note())
        self.qupath_button = QPushButton("Import QuPath annotations…")
        self.qupath_button.setToolTip("Open a QuPath GeoJSON export (classified annotations, level-0 pixels) as a "
                                      "Labels layer on the chosen image, to correct and export back")
        self.qupath_map = QLineEdit()
        self.qupath_map.setPlaceholderText("e.g. Tumour=tumor, Immune cells=skip")
        self.qupath_map.setToolTip("QuPath class names that are not the model's (matched ignoring case): "
                                   "'QuPath name=model class', or =skip to leave them out; comma-separated")
        self.export_button = QPushButton("Export labels")
        self.export_button.setToolTip("Write the labels (with your corrections) and <name>_composition.json")
        self.composition_table = QTableWidget(0, 3)
        self.composition_table.setHorizontalHeaderLabels(["pixels", "mm²", "% tissue"])
        self.composition_table.setMinimumHeight(150)
        self.composition_table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.ratio_label = QLabel()
        self.ratio_label.setWordWrap(True)
        self.copy_button = QPushButton("Copy table")
        self.copy_button.setToolTip("Copy the composition as CSV, to paste into a spreadsheet")
        self.copy_button.clicked.connect(lambda: self.copy_composition())
        form.addRow(self.qupath_button)
        form.addRow("QuPath names", self.qupath_map)
        form.addRow("Labels", self.labels_combo)
        form.addRow("Folder", self.export_dir)
        form.addRow(formats)
        form.addRow(self.position_note)
        form.addRow(self.export_button)
        form.addRow("Measure in", self.region_combo)
        form.addRow(self.composition_table)
        form.addRow(self.ratio_label)
        form.addRow(self.copy_button)
        self._timer = QTimer(self, singleShot=True, interval=300)  # recompute once painting pauses
        self._timer.timeout.connect(self.update_composition)
        self.labels_combo.currentIndexChanged.connect(self.watch)
        self.region_combo.currentIndexChanged.connect(self.watch)
        self.export_button.clicked.connect(lambda: self.export_in_background())

    def labels_layer(self):
        name = self.labels_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def pick_class(self, index: int) -> None:
        """Make the chosen labels layer the active one and paint class ``index`` on it."""
        layer = self.labels_layer()
        if layer is None:
            return
        self.viewer.layers.selection.active = layer
        result_layers.pick_class(layer, index)

    def region_layer(self):
        """The Shapes layer the composition is measured in, or None (the whole labels layer)."""
        name = self.region_combo.currentText()
        return self.viewer.layers[name] if self.region_combo.currentIndex() > 0 and name in self.viewer.layers \
            else None

    def _refresh_regions(self) -> None:
        from napari.layers import Shapes

        current = self.region_combo.currentText()
        names = [WHOLE_LAYER] + [ly.name for ly in self.viewer.layers if isinstance(ly, Shapes)]
        self.region_combo.blockSignals(True)
        self.region_combo.clear()
        self.region_combo.addItems(names)
        self.region_combo.setCurrentText(current if current in names else WHOLE_LAYER)
        self.region_combo.blockSignals(False)

    def show_position_note(self) -> bool:
        """Show the PNG note when the chosen labels lie somewhere other than the image's origin at its pixel size
        (a field of view, a coarser level): a PNG of them would re-open at the origin in pixels."""
        layer = self.labels_layer()
        meta = {} if layer is None else layer.metadata.get(result_layers.METADATA_KEY, {})
        placed = Placement.from_metadata(meta.get("placement"))
        moved = placed.downsample != 1.0 or any(placed.origin) or bool(placed.mpp0)
        shown = bool(layer is not None and moved and self.format_checks["png"].isChecked())
        self.position_note.setVisible(shown)
        return shown

    def watch(self, *_args) -> None:
        """Recompute the composition after each edit of the chosen Labels layer or region (and show its classes)."""
        self.show_position_note()
        self._refresh_regions()
        region = self.region_layer()
        if region is not None and id(region) not in self._watched:
            region.events.data.connect(lambda *_: self._timer.start())  # a shape drawn, moved or deleted
            self._watched.add(id(region))
        layer = self.labels_layer()
        self.palette.set_classes(None if layer is None else self.classes_of(layer))
        if layer is not None and id(layer) not in self._watched:
            # paint: brush and fill; data: a new array; set_data: undo/redo (Ctrl+Z), which emit neither of the
            # others but refresh the layer
            for event in (layer.events.paint, layer.events.data, layer.events.set_data):
                event.connect(lambda *_: self._timer.start())
            self._watched.add(id(layer))
        self._timer.start()

    def classes_of(self, layer) -> ClassSpec:
        return result_layers.classes_of_layer(layer) or self._default_classes() or WSSS4LUAD

    def update_composition(self) -> dict | None:
        """Refresh the composition table from the chosen Labels layer; return the core's composition dict."""
        from ..core.composition import composition, describe_tsr

        layer = self.labels_layer()
        self.composition_table.setRowCount(0)
        self.ratio_label.setText("")
        if layer is None:
            return None
        data = np.asarray(layer.data[0] if layer.multiscale else layer.data)
        region = self.region_layer()
        if region is not None:  # only the pixels inside the drawn shapes
            data = data[result_layers.region_mask(region, layer)]
        table = composition(data, self.classes_of(layer), mpp=result_layers.mpp_of_layer(layer))
        table["region"] = None if region is None else region.name
        rows = table["classes"]
        self.composition_table.setRowCount(len(rows))
        self.composition_table.setVerticalHeaderLabels(list(rows))
        for r, values in enumerate(rows.values()):
            area, fraction = values.get("area_mm2"), values.get("tissue_fraction")
            cells = [f"{values['pixels']:,}", "—" if area is None else f"{area:.4f}",
                     "—" if fraction is None else f"{100 * fraction:.1f}"]
            for c, text in enumerate(cells):
                self.composition_table.setItem(r, c, QTableWidgetItem(text))
        # one definition everywhere (core.composition.tumor_stroma_ratio): the batch CSV says the same number
        self.ratio_label.setText(describe_tsr(table))
        return table

    def copy_composition(self) -> str:
        """Copy the composition table to the clipboard as CSV (pastes into a spreadsheet); return the text."""
        from qtpy.QtWidgets import QApplication

        from ..core.composition import composition_csv

        table = self.update_composition()
        if table is None:
            common.show_message(self.message, "There is no Labels layer to measure.", error=True)
            return ""
        text = composition_csv(table)
        QApplication.clipboard().setText(text)
        common.show_message(self.message, "Composition copied (CSV): paste it into a spreadsheet.")
        return text

    def export_paths(self, layer, folder: Path) -> list[Path]:
        """The files an export of ``layer`` into ``folder`` writes: one per checked format + the composition."""
        from .._writer import FORMAT_SUFFIXES

        meta = layer.metadata.get(result_layers.METADATA_KEY, {})
        # a result layer is named after its image ("<image>_labels"), not after its role-first layer name
        name = f"{meta['source']}_labels" if meta.get("role") == "labels" and meta.get("source") else layer.name
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        paths = [folder / f"{stem}{FORMAT_SUFFIXES[fmt]}" for fmt, check in self.format_checks.items()
                 if check.isChecked()]
        return [*paths, folder / f"{stem}_composition.csv", folder / f"{stem}_composition.json"]

    def confirm_overwrite(self, existing: list[Path]) -> bool:
        """Ask before replacing files (tests replace this method)."""
        from qtpy.QtWidgets import QMessageBox

        names = "\n".join(p.name for p in existing[:6]) + ("\n…" if len(existing) > 6 else "")
        answer = QMessageBox.question(self, "Replace files?", f"These files exist in {existing[0].parent}:\n{names}"
                                      "\n\nReplace them?", QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
        return answer == QMessageBox.Yes

    def _prepare_export(self, folder: str | Path | None):
        """Check and gather what an export needs (on the GUI thread: it reads the layer and may ask); returns
        the arguments of ``_writer.export_files``, or None when there is nothing to do (the reason is shown)."""
        from ..core.io.guard import check_spares_inputs

        layer = self.labels_layer()
        if layer is None:
            raise WsssCramError("There is no Labels layer to export: run a segmentation first.")
        folder_text = str(folder) if folder else self.export_dir.text()
        if not folder_text:
            raise WsssCramError("Choose an output folder (Folder, Browse…) to export the labels into.")
        folder = Path(folder_text).expanduser()
        paths = self.export_paths(layer, folder)
        # the one output guard: never onto (or into the folder of) an image open in the viewer
        inputs = [getattr(lyr.source, "path", None) for lyr in self.viewer.layers]
        check_spares_inputs(paths, inputs)
        existing = [p for p in paths if p.exists()]
        if existing and not self.confirm_overwrite(existing):
            common.show_message(self.message, "Export cancelled: no file was replaced.")
            return None
        folder.mkdir(parents=True, exist_ok=True)
        meta = layer.metadata.get(result_layers.METADATA_KEY, {})
        # a copy: the user may paint on while a worker writes
        data = np.array(layer.data[0] if layer.multiscale else layer.data)
        return dict(paths=paths, labels=data, classes=self.classes_of(layer), table=self.update_composition(),
                    mpp=meta.get("mpp"), placement=Placement.from_metadata(meta.get("placement")))

    def export(self, folder: str | Path | None = None) -> list[str]:
        """Write the chosen labels layer in the checked formats plus ``<image>_labels_composition.csv``/``.json``
        and wait for it (the Export button runs the same in a worker thread: :meth:`export_in_background`).

        A folder must be chosen (never napari's working directory); existing files are replaced only after
        :meth:`confirm_overwrite` says yes.
        """
        from .._writer import export_files
        from ..core.progress import drive

        try:
            job = self._prepare_export(folder)
            if job is None:
                return []
            written = drive(export_files(**job))
        except Exception as err:  # shown in the dock, never raised into the event loop
            common.show_message(self.message, common.notify_error(err), error=True)
            return []
        common.show_message(self.message, f"Exported {len(written)} files to {Path(written[0]).parent}.")
        return written

    def export_in_background(self) -> None:
        """The Export button: the same checks, then the writing in a worker thread (napari stays responsive)."""
        from superqt.utils import create_worker

        from .._writer import export_files

        try:
            job = self._prepare_export(None)
        except Exception as err:  # shown in the dock, never raised into the event loop
            common.show_message(self.message, common.notify_error(err), error=True)
            return
        if job is None:
            return
        self.export_button.setEnabled(False)
        common.show_message(self.message, f"Exporting to {job['paths'][0].parent}…")
        worker = create_worker(export_files, **job, _ignore_errors=True)
        worker.yielded.connect(lambda event: common.show_message(
            self.message, f"Exporting… {event.done} / {event.total} files"))
        worker.returned.connect(lambda written: common.show_message(
            self.message, f"Exported {len(written)} files to {Path(written[0]).parent}."))
        worker.errored.connect(lambda err: common.show_message(self.message, common.notify_error(err), error=True))
        worker.finished.connect(lambda: self.export_button.setEnabled(True))
        self._export_worker = worker  # referenced until it ends
        worker.start()
