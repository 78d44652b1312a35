"""Train dock: patch folder + preset + settings -> thread_worker(core.train) -> progress, live plot, checkpoint."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
)

from ..core.errors import WsssCramError
from ..core.model.config import BACKBONES, ModelConfig
from ..core.train_config import TrainConfig
from . import _common as common
from ._dock import WorkerDock
from ._export_model import ModelExporter
from ._forms import SettingsForm
from ._train_job import (
    PRESETS,
    WEIGHTS,
    add_corrected_example,
    describe_weights,
    preset_config,
    scan_folder,
    train_job,
    weights_label,
)
from .layers import role_of
from .plot import TrainingPlot

#: The CLI flags core messages name -> the control of this dock that sets the same thing.
FIELDS = {"resume": "Resume", "out": "Output", "batch-size": "Batch", "crop": "Crop", "lr": "Learning rate",
          "backbone": "Backbone", "steps": "Steps", "epochs": "Epochs", "minutes": "Time budget",
          "data": "Patches", "val": "Validation", "device": "Device", "preset": "Preset", "weights": "Weights"}


#: Validations a run with a validation set makes along the way (not only one point at its end).
VALIDATIONS_PER_RUN = 5


def _numbered(number: int, function, *args) -> tuple:
    """``(number, function(*args))``: which request a worker's answer belongs to."""
    return number, function(*args)


def steady_total(shown: int, estimate: int, done: int) -> int:
    """The step total to show: a time budget's estimate wobbles by a few steps (40, 38, 40); keep the one shown
    unless the estimate moves by more than 10% or the steps pass it."""
    if shown <= 0 or done > shown or abs(estimate - shown) > 0.1 * shown:
        return max(int(estimate), int(done))
    return shown


class TrainWidget(WorkerDock):
    """Train WSSS-CRAM on image-level-labelled patches, watch it learn, and hand the model to the Segment dock."""

    SETTINGS = "train"
    FIELDS = FIELDS

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.checkpoint_path: str | None = None
        self.patch_index = None
        self._started = 0.0
        self._total = 0  # the step total shown (see steady_total)
        self._weights_asked = 0  # the number of the newest weights description asked for
        self.warnings: list[str] = []  # those of the current run, as shown
        # the recipe's stage now running, and where its steps start on the curves
        self._recipe_index: int | None = None
        self._step_offset = self._last_step = 0

        data_box = QGroupBox("Data")
        data_form = QFormLayout(data_box)
        self.data_row = common.PathRow("image-level-labelled patches (WSSS4LUAD names, CSV or class folders)")
        self.val_row = common.PathRow("optional: pixel-labelled validation set (img/ + mask/)")
        self.scan_button = QPushButton("Scan")
        self.scan_label = QLabel()
        self.scan_label.setWordWrap(True)
        data_form.addRow("Patches", self.data_row)
        data_form.addRow("Validation", self.val_row)
        data_form.addRow(self.scan_button)
        data_form.addRow(self.scan_label)

        settings_box = QGroupBox("Settings")
        form = QFormLayout(settings_box)
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(list(PRESETS))
        self.preset_combo.setCurrentText("cpu-small")
        self.backbone_combo = QComboBox()
        self.backbone_combo.addItems(list(BACKBONES))
        self.weights_combo = QComboBox()
        self.weights_combo.addItems(list(WEIGHTS))
        self.weights_row = common.PathRow("backbone weights file (.pth, torchvision keys)", folder=False,
                                          file_filter="PyTorch weights (*.pth *.pt)")
        self.weights_label = QLabel()
        self.weights_label.setWordWrap(True)
        # the run's length, batch, crop and learning rate: a magicgui form generated from TrainConfig's fields
        # (core/train_config.py, dock=True); the rest stays Qt: the preset and the device list are not fields, the
        # backbone lives in the model table, and the weights choice pairs a combo with a file row
        self.schedule_form = SettingsForm(TrainConfig)
        self.epochs_spin, self.steps_spin, self.minutes_spin, self.batch_spin, self.lr_spin, self.crop_spin = (
            self.schedule_form.native_of(name) for name in ("epochs", "steps", "minutes", "batch_size", "lr", "crop"))
        self.device_combo = QComboBox()
        self.device_combo.addItems(common.BASIC_DEVICES)  # GPUs are added once torch is imported (off the GUI)
        self.out_row = common.PathRow("run folder (checkpoints, metrics.csv)")
        self.mix_check = QCheckBox("Mix in patches cut from corrected labels")
        for widget, tip in [
                (self.preset_combo, "Starting values for every field: the paper's GPU setting, a small CPU run, "
                                    "or the synthetic sample"),
                (self.backbone_combo, "ResNet depth: resnet18 trains fastest, resnet50 is the paper's"),
                (self.weights_combo, "Where the backbone starts: ImageNet (much better; downloaded once into "
                                     "torch's hub cache when chosen), random, or a local weights file"),
                (self.weights_row, "A .pth file of torchvision ResNet weights for the chosen backbone"),
                (self.device_combo, "Where training runs: auto picks a GPU when there is one"),
                (self.out_row, "Run folder: checkpoints (last.pt, best.pt), metrics.csv, config.toml"),
                (self.mix_check, "Also train on patches cut from the corrected labels added below")]:
            widget.setToolTip(tip)
        for label, widget in [("Preset", self.preset_combo), ("Backbone", self.backbone_combo),
                              ("Weights", self.weights_combo), ("", self.weights_row), ("", self.weights_label)]:
            form.addRow(label, widget)
        form.addRow(self.schedule_form.native)
        for label, widget in [("Device", self.device_combo), ("Output", self.out_row), ("", self.mix_check)]:
            form.addRow(label, widget)

        self.start_button = QPushButton("Start")
        self.cancel_button = QPushButton("Cancel")
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue the run in the Output folder from its last checkpoint")
        self.resume_button.setEnabled(False)  # until the Output folder holds a run to resume
        self.cancel_button.setEnabled(False)
        buttons = QHBoxLayout()
        for button in (self.start_button, self.cancel_button, self.resume_button):
            buttons.addWidget(button)
        self.progress_bar = QProgressBar()
        self.eta_label = QLabel()
        self.eta_label.setWordWrap(True)  # a long stage title must not widen the dock past a 1366-px screen
        self.plot = TrainingPlot(self)
        self.use_button = QPushButton("Use this model")
        self.use_button.setToolTip("Segment with this run's checkpoint (best, else last) in the Segment dock")
        self.use_button.setEnabled(False)
        self.export_button = QPushButton("Export model…")
        self.export_button.setToolTip("Write this run's checkpoint as a bioimage.io model package (.zip) for QuPath "
                                      "and the model zoo")
        self.export_button.setEnabled(False)
        self.exporter = ModelExporter(self)

        corrections_box = QGroupBox("Retrain from corrections")
        corr_form = QFormLayout(corrections_box)
        self.image_combo = QComboBox()
        self.labels_combo = QComboBox()
        self.corrections_row = common.PathRow("folder for corrected examples (img/ + mask/ + patches/)")
        self.add_button = QPushButton("Add corrected labels to training data")
        self.image_combo.setToolTip("The H&E image you corrected")
        self.labels_combo.setToolTip("Its corrected Labels layer (same size as the image)")
        self.corrections_row.setToolTip("Corrected examples are saved here as img/ + mask/, and patches cut "
                                        "from them into patches/")
        self.data_row.setToolTip("Patches with image-level labels: WSSS4LUAD names '<id>-[t, s, n].png', a CSV "
                                 "'path,<classes>', or one sub-folder per class")
        self.val_row.setToolTip("Optional img/ + mask/ folder of pixel-labelled images: validation mIoU per epoch")
        corr_form.addRow("Image", self.image_combo)
        corr_form.addRow("Labels", self.labels_combo)
        corr_form.addRow("Folder", self.corrections_row)
        corr_form.addRow(self.add_button)

        layout = self.body()
        model_buttons = QHBoxLayout()
        model_buttons.addWidget(self.use_button)
        model_buttons.addWidget(self.export_button)
        for item in (data_box, settings_box, buttons, self.progress_bar, self.eta_label, self.plot,
                     model_buttons, self.message, corrections_box):
            (layout.addLayout if isinstance(item, QHBoxLayout) else layout.addWidget)(item)
        layout.addStretch()

        self.apply_preset()
        self.restore_settings()
        self.preset_combo.currentTextChanged.connect(self.apply_preset)
        for signal in (self.weights_combo.currentTextChanged, self.backbone_combo.currentTextChanged,
                       self.weights_row.edit.textChanged):
            signal.connect(self._show_weights)
        self._show_weights()
        self.scan_button.clicked.connect(self.scan)
        self.start_button.clicked.connect(lambda: self.start(resume=False))
        self.resume_button.clicked.connect(lambda: self.start(resume=True))
        self.cancel_button.clicked.connect(self.cancel)
        self.use_button.clicked.connect(self.use_model)
        self.export_button.clicked.connect(lambda: self.exporter.ask(self.checkpoint_path))
        self.add_button.clicked.connect(self.add_corrections)
        self.out_row.edit.textChanged.connect(self._out_changed)
        self.follow_layers(self._refresh_layer_choices)
        self._refresh_layer_choices()
        self._update_run_buttons()
        self._devices_worker = common.in_background(common.available_devices, self._offer_devices, self.show_error)

    def _offer_devices(self, devices: list[str]) -> None:
        """The devices this machine has, found off the GUI thread (the first torch import takes seconds)."""
        if not self._closed:
            common.offer_devices(self.device_combo, devices, self.SETTINGS)

    # ----- settings ---------------------------------------------------------------------------------------
    def apply_preset(self, *_args) -> None:
        """Fill the fields from the chosen preset (presets/<preset>.toml)."""
        try:
            config = preset_config(self.preset_combo.currentText())
        except Exception as err:  # shown in the dock, never raised into the event loop
            self.show_error(err)
            return
        self.backbone_combo.setCurrentText(str(config.model.get("backbone", ModelConfig.backbone)))
        self.weights_combo.setCurrentText(weights_label(config.weights))
        if weights_label(config.weights) == "file…":
            self.weights_row.setText(str(config.weights))
        self.schedule_form.set_values(config)

    def config(self, resume: bool = False):
        """The TrainConfig of the preset with the dock's fields applied; raises WsssCramError on bad input."""
        data, out = self.data_row.text(), self.out_row.text()
        if not data or not Path(data).is_dir() and not Path(data).is_file():
            raise WsssCramError(f"Patch folder '{data}' does not exist: choose a folder of labelled patches.")
        if not out:
            raise WsssCramError("Choose an output folder for the run (checkpoints and metrics).")
        val = self.val_row.text() or None
        if val and not Path(val).is_dir():
            raise WsssCramError(f"Validation folder '{val}' does not exist (leave it empty to skip validation).")
        mix = self.corrections_row.text() if self.mix_check.isChecked() else None
        form = self.schedule_form.values()
        config = preset_config(
            self.preset_combo.currentText(), data=data, out=out, val=val, backbone=self.backbone_combo.currentText(),
            device=self.device_combo.currentText(), resume=resume, corrections=mix, weights=self.weights(),
            **form)
        # the form's None ("by epochs / time", "no time limit") overrides the preset's value too
        config = dataclasses.replace(config, steps=form["steps"], minutes=form["minutes"])
        if config.val:  # validate along the way, not only once at the end
            planned = config.steps
            if not planned and self.patch_index is not None and not config.minutes:
                planned = config.epochs * max(1, len(self.patch_index) // max(1, config.batch_size))
            if planned and (not config.val_every_steps or config.val_every_steps * 2 > planned):
                config = dataclasses.replace(config, val_every_steps=max(1, planned // VALIDATIONS_PER_RUN))
        return config

    def weights(self) -> str:
        """The TrainConfig.weights of the Weights field (auto, imagenet, none or a file path)."""
        value = WEIGHTS[self.weights_combo.currentText()]
        if value != "file":
            return value
        path = self.weights_row.text()
        if not path or not Path(path).is_file():
            raise WsssCramError(f"Weights file '{path}' does not exist: choose a .pth file of torchvision "
                                "ResNet weights, or another Weights choice.")
        return path

    def _show_weights(self, *_args) -> None:
        """Say which weights a run will start from (looks at files only). Finding torch's hub cache imports
        torch (seconds, the first time): then it is looked up in a worker thread, so opening the dock never
        freezes napari."""
        value = WEIGHTS[self.weights_combo.currentText()]
        self.weights_row.setVisible(value == "file")
        weights = (self.weights_row.text() or None) if value == "file" else value
        self._weights_asked += 1
        if weights is None:
            self.weights_label.setText("Starts from: choose a weights file.")
            return
        backbone = self.backbone_combo.currentText()
        if "torch" in sys.modules:  # cheap now
            self._weights_found((self._weights_asked, describe_weights(backbone, weights)))
            return
        self.weights_label.setText("Starts from… (looking for the weights)")
        self._weights_worker = common.in_background(_numbered, self._weights_found, self.show_error,
                                                    self._weights_asked, describe_weights, backbone, weights)

    def _weights_found(self, result: tuple[int, str]) -> None:
        number, text = result
        if number == self._weights_asked and not self._closed:  # not a choice changed meanwhile
            self.weights_label.setText(f"Starts from {text}.")

    def _refresh_layer_choices(self, event=None) -> None:
        from napari.layers import Image, Labels

        for combo, kind in ((self.image_combo, Image), (self.labels_combo, Labels)):
            current = combo.currentText()
            combo.clear()
            combo.addItems([ly.name for ly in self.viewer.layers if isinstance(ly, kind)
                            and role_of(ly) != "activation"])
            if current:
                combo.setCurrentText(current)

    def run_checkpoint(self) -> str | None:
        """The usable checkpoint in the Output folder (the recipe's final model, else the best or last one of the
        latest stage), also after a cancelled run."""
        from ..core.errors import CheckpointError
        from ..core.run_files import resolve_checkpoint_path

        out = self.out_row.text()
        if not out or not Path(out).is_dir():
            return None
        try:
            path = resolve_checkpoint_path(out)
        except CheckpointError:
            return None
        return str(path) if path.is_file() else None

    def _out_changed(self, *_args) -> None:
        if self.worker is None:  # another run folder: its own checkpoint, if any
            self.checkpoint_path = None
        self._update_run_buttons()

    def _update_run_buttons(self) -> None:
        """Resume only when the Output folder holds a resumable run; "Use this model" when a checkpoint exists."""
        from ..core.run_files import is_resumable

        running = self.worker is not None
        out = self.out_row.text()
        self.resume_button.setEnabled(not running and bool(out) and is_resumable(out))
        if not running and self.checkpoint_path is None:
            self.checkpoint_path = self.run_checkpoint()
        self.use_button.setEnabled(not running and self.checkpoint_path is not None)
        self.export_button.setEnabled(self.use_button.isEnabled())

    # ----- actions ----------------------------------------------------------------------------------------
    def scan(self) -> bool:
        """Scan the patch folder: counts per class and combination, warnings for small classes."""
        try:
            self.patch_index, text = scan_folder(self.data_row.text(), self.val_row.text() or None)
        except Exception as err:  # shown in the dock, never raised into the event loop
            self.scan_label.setText("")
            self.show_error(err)
            return False
        self.scan_label.setText(text)
        common.show_message(self.message, f"{len(self.patch_index)} patches found.")
        return True

    def start(self, resume: bool = False) -> None:
        """Start (or with ``resume``, continue) training in a worker thread."""
        if self.worker is not None:
            return
        try:
            config = self.config(resume=resume)
        except Exception as err:  # shown in the dock, never raised into the event loop
            self.show_error(err)
            return
        self.save_settings()
        self.warnings = []
        if not resume:  # a resumed run continues the curves it had
            self.plot.clear()
        self._recipe_index, self._step_offset, self._last_step = None, 0, 0
        self.checkpoint_path = None
        self.use_button.setEnabled(False)
        self.export_button.setEnabled(False)
        for button, enabled in ((self.start_button, False), (self.resume_button, False), (self.cancel_button, True)):
            button.setEnabled(enabled)
        self._started = time.monotonic()
        self._total = 0
        self.say("Training… (Cancel keeps a usable last checkpoint)")
        self.start_job(lambda cancel: train_job(config, cancel))

    def cancel(self) -> None:
        """Stop after the current step (a usable last checkpoint is written)."""
        if self.worker is not None:
            super().cancel()
            self.say("Cancelling after this step…")

    def on_warning(self, text: str) -> None:
        self.warnings.append(text)
        super().on_warning(text)

    def on_progress(self, event) -> None:
        info = event.info or {}
        recipe = info.get("recipe")
        stage = "" if recipe is None else f"stage {recipe['index'] + 1}/{recipe['stages']} ({recipe['title']}): "
        if recipe is not None and recipe["index"] != self._recipe_index:
            # the curves go on across the recipe's stages: each stage's steps follow the previous one's
            self._recipe_index, self._step_offset = recipe["index"], self._step_offset + self._last_step
            self._last_step = self._total = 0  # each stage has its own step total
        if event.phase == "train":
            self._last_step = event.done
            self._total = steady_total(self._total, event.total, event.done)
            self.progress_bar.setMaximum(max(self._total, 1))
            self.progress_bar.setValue(event.done)
            losses = {k: v for k, v in (info.get("losses") or {}).items() if isinstance(v, int | float)}
            self.plot.add_losses(self._step_offset + event.done, losses)
            eta = info.get("eta")
            self.eta_label.setText(f"{stage}step {event.done}/{self._total}, epoch {info.get('epoch', 0) + 1}"
                                   + ("" if eta is None else f", ETA {int(eta) // 60} min {int(eta) % 60} s"))
        elif event.phase == "pseudo-labels":
            self.progress_bar.setMaximum(max(event.total, 1))
            self.progress_bar.setValue(event.done)
            self.eta_label.setText(f"{stage}pseudo-labels {event.done}/{event.total}")
        elif event.phase == "val" and info.get("mIoU") is not None:
            self.plot.add_miou(self._step_offset + event.done, float(info["mIoU"]))
        elif event.phase == "data":
            self.eta_label.setText(str(info.get("summary", "")).splitlines()[0])
            if info.get("weights"):
                self.say(f"Training from {info['weights']}… (Cancel keeps a usable last checkpoint)")

    def on_done(self, checkpoint) -> None:
        self.checkpoint_path = str(checkpoint) if checkpoint else None
        self.use_button.setEnabled(self.checkpoint_path is not None)
        self.export_button.setEnabled(self.use_button.isEnabled())
        self.say(f"Checkpoint: {self.checkpoint_path}  ({time.monotonic() - self._started:.0f} s)")

    def on_finished(self, cancelled: bool) -> None:
        self.plot.flush()
        self.end_progress(self.progress_bar)
        if cancelled:
            self.checkpoint_path = self.run_checkpoint()  # a cancelled run leaves a usable last checkpoint
            self.say("Training cancelled: Resume continues from the last checkpoint"
                     + ("" if self.checkpoint_path is None else "; 'Use this model' segments with it") + ".")
        self.start_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self._update_run_buttons()

    def on_shutdown(self) -> None:
        self.exporter.cancel()

    def use_model(self) -> bool:
        """Load the trained checkpoint into the Segment dock (opening it if needed)."""
        if not self.checkpoint_path:
            return False
        try:
            dock, segment = self.viewer.window.add_plugin_dock_widget("napari-wsss-cram", "Segment")
        except Exception as err:  # e.g. a viewer without the plugin registered
            self.show_error(err)
            return False
        dock.raise_()  # bring the Segment dock to the front when it is tabbed behind another one
        loaded = segment.set_checkpoint(self.checkpoint_path)
        if loaded:
            common.show_message(self.message, f"The Segment dock now uses {Path(self.checkpoint_path).name} "
                                              f"from {Path(self.checkpoint_path).parent}.")
        else:
            common.show_message(self.message, segment.message.text(), error=True)  # already notified
        return loaded

    def add_corrections(self) -> list[str]:
        """Save the chosen image + corrected Labels as a pixel-labelled example and cut patches from it."""
        image, labels = self.image_combo.currentText(), self.labels_combo.currentText()
        try:
            if image not in self.viewer.layers or labels not in self.viewer.layers:
                raise WsssCramError("Choose the image and its corrected Labels layer first.")
            if not self.corrections_row.text():
                raise WsssCramError("Choose a folder for the corrected examples.")
            written = add_corrected_example(self.viewer.layers[image], self.viewer.layers[labels],
                                            self.corrections_row.text())
        except Exception as err:  # shown in the dock, never raised into the event loop
            self.show_error(err)
            return []
        self.mix_check.setChecked(True)
        common.show_message(self.message, f"Saved {Path(written[0]).name} and its mask; {len(written) - 2} patches "
                                          "cut. The next run mixes them in.")
        return written

    # ----- persistence ------------------------------------------------------------------------------------
    def persisted(self) -> dict:
        return {"data": self.data_row, "val": self.val_row, "out": self.out_row, "preset": self.preset_combo,
                "backbone": self.backbone_combo, "weights": self.weights_combo, "weights_file": self.weights_row,
                "epochs": self.epochs_spin, "steps": self.steps_spin,
                "minutes": self.minutes_spin,
                "batch": self.batch_spin, "crop": self.crop_spin, "lr": self.lr_spin,
                "device": self.device_combo, "corrections": self.corrections_row, "mix": self.mix_check}
