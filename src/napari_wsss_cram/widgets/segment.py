"""Segment dock: image layer + model + settings -> thread_worker(core.inference) -> result layers; export."""

from __future__ import annotations

import time
from pathlib import Path

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from . import _common as common
from . import layers as result_layers
from ._common import spin
from ._dock import WorkerDock
from ._export_model import ModelExporter
from ._panels import AdvancedPanel, ExportPanel
from ._segment_parts import (
    BUNDLED,
    CHECKPOINT,
    MPP,
    SCALE,
    ActivationRow,
    BatchPanel,
    ModelPicker,
    ResolutionRow,
    note_plain_image,
    states_no_mpp,
)

__all__ = ["BUNDLED", "CHECKPOINT", "MPP", "SCALE", "SegmentWidget", "progress_text"]

#: Longest side of labels the dock computes by default (they are painted in memory).
MAX_PAINTABLE_SIDE = 8192
#: The CLI flags core messages name -> the control of this dock that sets the same thing.
FIELDS = {"mpp": "Resolution in µm/px", "scale": "Resolution as a scale", "tile": "Tile size",
          "overlap": "Tile overlap", "output-level": "Output level", "level": "Output level", "device": "Device",
          "crf": "Refine labels with a dense CRF", "overwrite": "Replace existing outputs",
          "out": "Batch output folder"}


def progress_text(done: int, total: int, seconds: float) -> str:
    """``tile 12 / 40 · about 1 min 5 s left`` (the ETA from the pace so far, once a tile is done)."""
    text = f"tile {done} / {total}"
    if 0 < done < total:
        left = int(round(seconds / done * (total - done)))
        text += f" · about {left // 60} min {left % 60} s left" if left >= 60 else f" · about {left} s left"
    return text


class SegmentWidget(WorkerDock):
    """Segment H&E tissue with a WSSS-CRAM checkpoint and correct/export the resulting labels."""

    SETTINGS = "segment"
    FIELDS = FIELDS

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self._model_problem: str | None = None
        self._pbar = self._adding = self._run_layer = None
        self._warnings: list[str] = []
        self._started = 0.0
        self.last_result: dict | None = None
        self._qupath_source = self._qupath_worker = None  # the image a QuPath import goes onto, its reader
        self._startup_note: str | None = None  # said instead of "Ready." until the user picks a model
        self._validation_text = ""  # the message line as _validate last left it ("Loading the model…", "Ready.")
        self._batch = False  # the running job is a batch (files) rather than one image
        self._file = (0, 0, "")  # batch: (index, count, name) of the image being segmented
        form = QFormLayout()
        self.image_combo = QComboBox()
        self.pixel_size = spin(QDoubleSpinBox, 0.0, 50.0, 0.0, 0.05, 4)
        self.pixel_size.setSuffix(" µm/px")
        self.pixel_size.setSpecialValueText("not stated")
        self.pixel_size.setToolTip("Pixel size of the image. Files that state it fill it in; for a PNG/JPEG enter it "
                                   "(WSSS4LUAD: about 0.25 µm/px) to get areas in mm²")
        self.picker = ModelPicker(lambda: self._closed, self._validate, self._model_failed, self._model_loaded)
        self.model_combo, self.checkpoint_row = self.picker.combo, self.picker.checkpoint_row
        self.classes_label, self.model_card = self.picker.classes_label, self.picker.card
        self.export_model_button = self.picker.export_button
        self.exporter = ModelExporter(self)
        self.device_combo = QComboBox()
        self.device_combo.addItems(common.BASIC_DEVICES)  # GPUs are added once torch is imported (off the GUI)
        self.resolution = ResolutionRow(lambda: (self.info, self.image_mpp()),
                                        lambda text: common.show_message(self.message, text, error=True))
        self.resolution_combo, self.resolution_value = self.resolution.combo, self.resolution.value
        self.level_spin = spin(QSpinBox, 0, 0, 0)
        self.level_spin.setToolTip("Pyramid level of the labels (slides: a coarser level keeps them paintable)")
        self.region_combo = QComboBox()
        self.region_combo.addItems(["Whole image", "Current field of view"])
        for widget, tip in [
                (self.image_combo, "The RGB H&E image layer to segment"),
                (self.device_combo, "Where the model runs: auto picks a GPU when there is one"),
                (self.region_combo, "Whole image, or only what the canvas shows now (for slides)")]:
            widget.setToolTip(tip)
        form.addRow("Image", self.image_combo)
        form.addRow("Pixel size", self.pixel_size)
        form.addRow(self.picker)
        form.addRow("Device", self.device_combo)
        form.addRow("Resolution", self.resolution)
        form.addRow("Output level", self.level_spin)
        form.addRow("Region", self.region_combo)

        self.advanced = advanced = AdvancedPanel()
        for name in ("crf_check", "crf_spins", "crf_iterations", "tile_spin", "overlap_spin", "alpha_spin",
                     "beta_spin", "pseudo_check", "background_combo", "gate_check"):
            setattr(self, name, getattr(advanced, name))

        self.run_button = QPushButton("Run")
        self.run_button.setToolTip("Segment the image: activation map and labels layers are added when it ends")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop the run (within about a second); no layer is added")
        self.cancel_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.progress_bar = QProgressBar()
        self.activation_row = ActivationRow(self.viewer, self.image_layer)
        self.activation_combo, self.opacity_slider = self.activation_row.combo, self.activation_row.opacity
        view_form = QFormLayout()
        view_form.addRow("Activation map", self.activation_row)

        batch_box = self.batch_panel = BatchPanel()
        self.batch_in, self.batch_out = batch_box.inputs, batch_box.output
        self.batch_overwrite, self.batch_button = batch_box.overwrite, batch_box.button

        self.export_panel = ExportPanel(self.viewer, self.message,
                                        lambda: self.info.classes if self.info is not None else None)
        self.labels_combo = self.export_panel.labels_combo

        # Run, Cancel, progress, the message and the class palette stay in view above the scrolling part (at
        # 1366x768 with both docks open they were below the fold); the rest is in tabs
        header = self.header()
        header.addLayout(buttons)
        header.addWidget(self.progress_bar)
        header.addWidget(self.message)
        paint_row = QHBoxLayout()
        paint_row.addWidget(QLabel("Paint"))
        paint_row.addWidget(self.export_panel.palette, 1)
        header.addLayout(paint_row)
        settings_page = QWidget()
        settings_layout = QVBoxLayout(settings_page)
        for item in (form, advanced, view_form):
            (settings_layout.addLayout if isinstance(item, QFormLayout) else settings_layout.addWidget)(item)
        settings_layout.addStretch()
        self.tabs = common.FittingTabs()
        self.tabs.addTab(settings_page, "Segment")
        self.tabs.addTab(self.export_panel, "Correct && export")
        self.tabs.addTab(batch_box, "Batch")
        for index, tip in enumerate(["How to segment: image, model, resolution, refinement",
                                     "Paint corrections, measure the composition, export or import QuPath files",
                                     "Segment a whole folder of images into an output folder"]):
            self.tabs.setTabToolTip(index, tip)
        self.tabs.tabBar().setToolTip("Segment settings, corrections and export, or a folder of images")
        self.body().addWidget(self.tabs)

        self.restore_settings()
        self.overlap_spin.setMaximum(self.tile_spin.value() // 2)
        self._connect()
        self._refresh_layer_choices()
        # the resolution is not restored: it always starts from the model's default (the one resolution rule)
        stale = self.picker.forget_missing_checkpoint()
        if stale:
            self._startup_note = (f"The checkpoint used last time, {stale}, no longer exists: using the bundled "
                                  "demo model. Choose 'Checkpoint file…' to pick another.")
        self.picker.load()

    # ----- wiring -----------------------------------------------------------------------------------------
    def _connect(self) -> None:
        self.follow_layers(self._refresh_layer_choices)
        self.image_combo.currentIndexChanged.connect(self._image_changed)
        self.pixel_size.valueChanged.connect(self._pixel_size_edited)
        self.tile_spin.valueChanged.connect(lambda tile: self.overlap_spin.setMaximum(tile // 2))
        self.picker.connect()
        self.model_combo.currentIndexChanged.connect(self._model_chosen)
        self.checkpoint_row.edit.textChanged.connect(lambda _: self._validate())
        self.run_button.clicked.connect(self.run)
        self.batch_button.clicked.connect(lambda: self.run_batch())
        self.export_model_button.clicked.connect(
            lambda: self.exporter.ask(self.info.path if self.info is not None else None))
        self.export_panel.qupath_button.clicked.connect(lambda: self.import_qupath())
        self.cancel_button.clicked.connect(self.cancel)

    def _refresh_layer_choices(self, event=None) -> None:
        from napari.layers import Image, Labels

        image_before = self.image_combo.currentText()
        for combo, kind in ((self.image_combo, Image), (self.labels_combo, Labels)):
            current = combo.currentText()
            names = [layer.name for layer in self.viewer.layers if isinstance(layer, kind)
                     and result_layers.role_of(layer) != "activation"]
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            combo.blockSignals(False)
        self.export_panel.watch()
        if self.image_combo.currentText() != image_before:  # e.g. the first image opened
            self._image_changed()
        else:
            self._validate()

    def _image_changed(self, *_args) -> None:
        note_plain_image(self.image_layer())
        self._show_pixel_size()
        # a default chosen before this image was known may not suit it (a model's µm/px on a PNG without one)
        if not self.resolution.chosen:
            self.set_default_resolution()
        self._validate()

    def _show_pixel_size(self) -> None:
        """Show the chosen image's µm/px: read-only when its file states it (then napari's scale bar is on,
        in µm), editable when not."""
        layer = self.image_layer()
        meta = layer.metadata if layer is not None and isinstance(layer.metadata, dict) else {}
        mpp = meta.get("mpp") or 0.0
        self.pixel_size.blockSignals(True)
        self.pixel_size.setValue(float(mpp))
        self.pixel_size.blockSignals(False)
        from_file = bool(mpp) and not meta.get("mpp_from_dock")
        self.pixel_size.setEnabled(layer is not None and not from_file)
        if from_file and tuple(getattr(layer, "units", ())[-1:]) and str(layer.units[-1]) in ("µm", "micrometer"):
            self.viewer.scale_bar.visible = True
            self.viewer.scale_bar.unit = "µm"

    def _pixel_size_edited(self, value: float) -> None:
        """The user states the image's µm/px (a PNG/JPEG): results then get areas in mm²."""
        layer = self.image_layer()
        if layer is None:
            return
        layer.metadata["mpp"] = float(value) or None
        layer.metadata["mpp_from_dock"] = True
        # the results already on this image get the pixel size too: areas in mm² at once, not after a re-run
        result_layers.set_results_mpp(self.viewer, layer.name, float(value) or None)
        self.export_panel.update_composition()
        if not self.resolution.chosen:  # the model's µm/px default may now apply
            self.set_default_resolution()
        self._validate()

    def image_layer(self):
        name = self.image_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    # ----- model ------------------------------------------------------------------------------------------
    @property
    def model(self):
        return self.picker.model

    @property
    def info(self):
        return self.picker.info

    def set_checkpoint(self, path: str | Path) -> bool:
        """Select and load a checkpoint file now (used by the Train dock's "Use this model", which has torch
        imported already); True when it loaded."""
        self._startup_note = None  # a model chosen
        return self.picker.choose_checkpoint(path)

    @property
    def loading_model(self) -> bool:
        """True while the chosen model loads in a worker thread (Run is disabled until it is ready)."""
        return self.picker.loading

    def _model_chosen(self, *_args) -> None:
        self._startup_note = None  # the user chose a model: the note about the last one is moot

    def _model_failed(self, err: BaseException, explicit: bool) -> None:
        self._model_problem = common.user_message(err, FIELDS)
        if explicit:  # an explicit choice: say what is wrong now
            self._validate(error=common.notify_error(err, FIELDS))
        else:
            self._validate()

    def _model_loaded(self, devices) -> None:
        # the model arriving is news only over the dock's own "Loading the model…" (or another line of
        # _validate): an import or a run that finished while it loaded keeps its message
        said_since = self.message.text() != self._validation_text
        self._model_problem = None
        common.offer_devices(self.device_combo, devices, self.SETTINGS)
        self.activation_combo.blockSignals(True)
        self.activation_combo.clear()
        self.activation_combo.addItems(list(self.info.classes.names))
        self.activation_combo.blockSignals(False)
        self.resolution.chosen = False  # a (re)chosen model starts at its default resolution
        self.set_default_resolution()
        self._validate(quiet=said_since)

    def set_default_resolution(self) -> None:
        """Set the resolution row from the model's default (``core.checkpoint.default_resolution``); an image
        layer known to lack a µm/px gets the training scale."""
        if self.info is None:  # no model yet (it loads in the background): nothing to default to
            return
        self.resolution.set_default(self.info, image_has_mpp=not states_no_mpp(self.image_layer()))

    def image_mpp(self) -> float | None:
        """µm/px of the chosen image layer's level 0, when its file states it."""
        meta = getattr(self.image_layer(), "metadata", None)
        mpp = meta.get("mpp") if isinstance(meta, dict) else None
        return float(mpp) if mpp else None

    # ----- validation -------------------------------------------------------------------------------------
    def _validate(self, *_args, error: str | None = None, quiet: bool = False) -> bool:
        """Enable Run only when an RGB image and a model are chosen; say what is missing otherwise."""
        layer = self.image_layer()
        problem = error
        if problem is None and layer is None:
            problem = "Open an RGB H&E image (File > Open, or File > Open Sample > WSSS-CRAM)."
        elif problem is None and not layer.rgb:
            problem = f"Layer '{layer.name}' is not an RGB image: WSSS-CRAM needs a colour H&E image."
        if layer is not None:
            self._fit_output_level(layer)
        loading = problem is None and self.model is None and self.loading_model
        if problem is None and self.model is None:
            problem = "Loading the model…" if loading else (self._model_problem or "Choose a model checkpoint.")
        if (problem is None and self.resolution.mode == MPP and self.image_mpp() is None
                and isinstance(layer.metadata, dict) and "mpp" in layer.metadata):
            problem = (f"'{layer.name}' does not state its pixel size (µm/px): choose the resolution as a "
                       "scale (the model's training scale is the default).")
        running = self.busy
        self.run_button.setEnabled(problem is None and not running)
        if not running and not quiet:
            if problem is None and self._startup_note:
                common.show_message(self.message, self._startup_note, warning=True)
            else:
                common.show_message(self.message, problem or "Ready.", error=problem is not None and not loading)
            self._validation_text = self.message.text()
        return problem is None

    def _fit_output_level(self, layer) -> None:
        """Offer the layer's pyramid levels; on a big slide start at a level that stays paintable (<= 8k px)."""
        shapes = [tuple(s[:2]) for s in layer.level_shapes] if layer.multiscale else [layer.data.shape[:2]]
        self.level_spin.setMaximum(len(shapes) - 1)
        if self.level_spin.value() == 0 and max(shapes[0]) > MAX_PAINTABLE_SIDE:
            self.level_spin.setValue(next((i for i, s in enumerate(shapes) if max(s) <= MAX_PAINTABLE_SIDE),
                                          len(shapes) - 1))

    def predict_settings(self):
        """The PredictSettings of a Run on the chosen image (see :meth:`build_settings`)."""
        return self.build_settings()[0]

    def build_settings(self, batch: bool = False):
        """(PredictSettings, fallback) through the one builder (``core.inference.build_predict_settings``, as
        ``wsss-cram predict``): the forms' values, the device, and the resolution row when the user set it (else
        the model's default for this image; for a batch, for images that state their µm/px, with ``fallback``
        for those that do not)."""
        from ..core.crf import CRFParams
        from ..core.inference import build_predict_settings

        return build_predict_settings(
            self.info, self.resolution.resolution(), image_has_mpp=batch or not states_no_mpp(self.image_layer()), gui=True,
            **self.advanced.predict_form.values(), crf_params=CRFParams(**self.advanced.crf_form.values()),
            output_level=self.level_spin.value(), device=self.device_combo.currentText(), with_cam=not batch)

    def region(self, layer) -> tuple[int, int, int, int] | None:
        """(y, x, h, w) of the current field of view in pixels of the output level, or None (whole image)."""
        if self.region_combo.currentText() == "Whole image":
            return None
        return result_layers.field_of_view(layer, self.level_spin.value(), self.viewer)

    # ----- running ----------------------------------------------------------------------------------------
    def run(self) -> None:
        """Start segmentation in a worker thread (results are added only when it finishes)."""
        from napari.utils import progress

        from ._segment_job import segment_job

        if self.busy or not self._validate():
            return
        layer = self.image_layer()
        try:
            region, settings = self.region(layer), self.predict_settings()
        except Exception as err:  # shown in the dock, never raised into the event loop
            self.show_error(err)
            return
        self.save_settings()
        pseudo = (self.alpha_spin.value(), self.beta_spin.value()) if self.pseudo_check.isChecked() else None
        self._warnings = []
        self._run_layer = layer
        self._pbar = progress(total=0, desc=f"WSSS-CRAM: {layer.name}")
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.say(f"Segmenting '{layer.name}'…")
        self._started = time.monotonic()
        self.progress_bar.setFormat("starting…")
        self.start_job(lambda cancel: segment_job(layer, self.model, self.info, settings, region, pseudo, cancel))

    def run_batch(self, inputs: list[str] | None = None, out_dir: str | None = None) -> bool:
        """Segment a folder (or a list) of images into an output folder with one summary CSV, in a worker
        thread through the core's batch (``core.batch.predict_batch``, as ``wsss-cram predict``); progress per
        file, Cancel stops it between tiles. Returns True when it started."""
        from ._segment_job import batch_job

        if self.busy:
            return False
        inputs = inputs or ([self.batch_in.text()] if self.batch_in.text() else [])
        out_dir = out_dir or self.batch_out.text()
        formats = tuple(fmt for fmt, check in self.export_panel.format_checks.items() if check.isChecked())
        if self.model is None:
            self.show_error(self._model_problem or "Wait for the model to load, or choose a checkpoint.")
            return False
        if not inputs or not out_dir:
            self.show_error("Choose a folder of images and an output folder for the batch.")
            return False
        try:
            settings, fallback = self.build_settings(batch=True)
        except Exception as err:  # shown in the dock, never raised into the event loop
            self.show_error(err)
            return False
        self.save_settings()
        self._warnings, self._batch = [], True
        self.run_button.setEnabled(False)
        self.batch_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.say(f"Segmenting the images of {inputs[0]}…" if len(inputs) == 1 else
                 f"Segmenting {len(inputs)} inputs…")
        self._started = time.monotonic()
        self.progress_bar.setFormat("starting…")
        overwrite = self.batch_overwrite.isChecked()
        self.start_job(lambda cancel: batch_job(self.model, self.info, inputs, out_dir, settings, formats or
                                                ("png",), overwrite, cancel, fallback=fallback))
        return True

    def cancel(self) -> None:
        """Stop the run within about a second; no layer is added."""
        super().cancel()
        if self._qupath_worker is not None and self._qupath_worker.running:
            self._qupath_worker.cancel()
            self.say("Import cancelled: no layer was added.")
        if self.worker is not None:
            self.worker.quit()
            self.say("Cancelling…")

    def on_warning(self, text: str) -> None:
        self._warnings.append(text)
        common.notify_warning(text)
        self.say(f"Segmenting… warning: {text}", warning=True)

    def on_progress(self, event) -> None:
        if event.phase == "file":  # batch: one step per image
            self._file = (event.done, event.total, event.info.get("name", ""))
            self.progress_bar.setMaximum(max(event.total, 1))
            self.progress_bar.setValue(event.done)
            self.progress_bar.setFormat(f"image {min(event.done + 1, event.total)} / {event.total}")
            if event.info.get("name"):
                self.say(f"Segmenting {event.info['name']} ({event.done + 1} / {event.total})…")
            return
        if self._batch:  # tiles of the current image: the bar counts images, the text says both
            done, total, _ = self._file
            self.progress_bar.setFormat(f"image {done + 1} / {total} · "
                                        + progress_text(event.done, event.total, 0.0))
            return
        self.progress_bar.setMaximum(max(event.total, 1))
        self.progress_bar.setValue(event.done)
        self.progress_bar.setFormat(progress_text(event.done, event.total, time.monotonic() - self._started))
        pbar = self._pbar
        if pbar is not None:
            pbar.total = max(event.total, 1)
            pbar.n = event.done
            pbar.refresh()

    @property
    def busy(self) -> bool:
        """True while a run computes or its result layers are still being added."""
        return self.worker is not None or self._adding is not None

    def on_done(self, result) -> None:
        """Add the result layers, one per event-loop turn (a batch: say where its outputs went)."""
        if self._batch:
            rows, summary = result
            failed = [r for r in rows if r.get("status") != "ok"]
            self.say(f"Done: {len(rows) - len(failed)} of {len(rows)} images segmented into {summary.parent} "
                     f"(summary: {summary.name})." + (f"  Failed: {', '.join(r['image'] for r in failed)}."
                                                      if failed else ""), warning=bool(failed))
            return
        layer, classes = self._run_layer, self.info.classes

        def steps():
            shown = yield from result_layers.iter_result_layers(
                self.viewer, layer, result["labels"], result["activations"], classes, result["scale"],
                result["translate"], result["mpp"], labels_fingerprint=result.get("fingerprint"))
            if result.get("pseudo") is not None:
                yield result_layers.add_pseudo_label_layer(self.viewer, layer, result["pseudo"], classes,
                                                           result["scale"], result["translate"])
            return shown

        self._adding = steps()
        self._add_next_layer()

    def _add_next_layer(self) -> None:
        """Add one result layer per event-loop turn, so the GUI never freezes for all of them at once."""
        if self._adding is None:  # the dock was closed meanwhile
            return
        try:
            next(self._adding)
        except StopIteration as done:
            self._adding = None
            self.last_result = shown = done.value
            self.labels_combo.setCurrentText(shown["labels"].name)
            self.tabs.setCurrentWidget(self.export_panel)  # next: correct, measure, export
            self.show_activation()
            self._validate(quiet=True)
            warned = "" if not self._warnings else "  Warning: " + " ".join(self._warnings)
            common.show_message(self.message, f"Done: '{shown['labels'].name}'. Paint corrections, then export."
                                + warned, warning=bool(warned))
            return
        except Exception as err:  # shown, never raised into the event loop
            self._adding = None
            self.show_error(err)
            self._validate(quiet=True)
            return
        QTimer.singleShot(0, self._add_next_layer)

    def on_finished(self, cancelled: bool) -> None:
        was_batch, self._batch = self._batch, False
        self.batch_button.setEnabled(True)
        if self._pbar is not None:
            self._pbar.close()
        self._pbar = None
        self.cancel_button.setEnabled(False)
        self.end_progress(self.progress_bar)  # "Done" and full, not back to 0 %
        if cancelled:
            self.say("Cancelled: the images done so far are in the output folder (no summary CSV)." if was_batch
                     else "Cancelled: no layer was added.")
        self._validate(quiet=True)

    def activation_layer(self):
        """The activation layer of the chosen image (the newest), or None."""
        return self.activation_row.layer()

    def show_activation(self) -> None:
        """Show the chosen class's map, at the chosen opacity, in the image's activation layer."""
        self.activation_row.show_map()

    def update_composition(self) -> dict | None:
        return self.export_panel.update_composition()

    def import_qupath(self, path: str | Path | None = None):
        """Open QuPath annotations (a GeoJSON export) as a Labels layer on the chosen image, in the model's
        classes (QuPath names matched ignoring case, others through "QuPath names"); read and rasterised in a
        worker thread. Returns the worker (None when nothing starts: the reason is shown)."""
        from qtpy.QtWidgets import QFileDialog

        from ..core.io.qupath import parse_class_map

        layer = self.image_layer()
        if layer is None:
            self.show_error("Open the image the annotations belong to first (same slide, full resolution).")
            return None
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "QuPath annotations", "", "GeoJSON (*.geojson *.json)")
            if not path:
                return None
        try:
            class_map = parse_class_map(self.export_panel.qupath_map.text())
        except Exception as err:  # shown in the dock, never raised into the event loop
            self.show_error(err)
            return None
        classes = self.info.classes if self.info is not None else self.export_panel.classes_of(layer)
        self.say(f"Importing {Path(path).name}…")
        self._qupath_source = layer
        from ._qupath_job import QuPathImportRun, progress_words  # off the GUI thread, Cancel stops it

        self._qupath_worker = QuPathImportRun(str(path), [layer], classes, class_map, self._qupath_imported,
                                              self.show_error, fixed=True,
                                              on_progress=lambda event: self.say(progress_words(event)))
        self.cancel_button.setEnabled(True)
        self._qupath_worker.worker.finished.connect(lambda: self.cancel_button.setEnabled(self.worker is not None))
        return self._qupath_worker.worker

    def _qupath_imported(self, result) -> None:
        _, layer_data, imported = result
        layer = result_layers.add_qupath_layer(self.viewer, layer_data, self._qupath_source)
        self.labels_combo.setCurrentText(layer.name)
        self.tabs.setCurrentWidget(self.export_panel)
        self.say(f"{imported.summary()}: '{layer.name}'. Paint corrections, then export.")

    def export(self, folder: str | Path | None = None) -> list[str]:
        """Export the chosen (corrected) labels layer; see :class:`ExportPanel`."""
        return self.export_panel.export(folder)

    # ----- persistence ------------------------------------------------------------------------------------
    def persisted(self) -> dict:
        # not the resolution: it comes from the model (core.checkpoint.default_resolution) each time one is picked
        return {"model": self.model_combo, "device": self.device_combo,
                "region": self.region_combo, "tile": self.tile_spin,
                "overlap": self.overlap_spin, "alpha": self.alpha_spin, "beta": self.beta_spin,
                "crf": self.crf_check, "pseudo": self.pseudo_check, "checkpoint": self.checkpoint_row,
                "background": self.background_combo, "gate_classes": self.gate_check,
                "export_dir": self.export_panel.export_dir, "level": self.level_spin,
                "crf_iterations": self.crf_iterations, "batch_in": self.batch_in, "batch_out": self.batch_out,
                **self.crf_spins}

    def on_shutdown(self) -> None:
        self.exporter.cancel()
        self._adding = None  # add no more result layers
