"""The Segment dock's own widgets: the model picker, the resolution row, the activation-map row and the batch
panel.

Hand-built Qt, not magicgui forms: the picker loads a model in a worker thread and shows its card, the resolution
row converts between a scale and a µm/px through the image's and the model's pixel sizes, the activation-map row
picks which class's map a layer shows, and the batch panel is two folders and a button; none is a plain dataclass
field. The dock wires them (``widgets/segment.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QWidget,
)

from ..core.errors import WsssCramError
from . import _common as common
from ._common import spin

BUNDLED = "Bundled demo model (synthetic data)"
CHECKPOINT = "Checkpoint file…"
SCALE, MPP = "scale", "µm/px"
#: Unit suffix of the resolution value, per resolution mode.
RESOLUTION_SUFFIX = {SCALE: " ×", MPP: " µm/px"}


def _numbered_load(load, number: int, path) -> tuple:
    """``(number, load(path))``, or ``(number, the exception)``: which choice of model a result answers."""
    try:
        return number, load(path)
    except Exception as err:  # shown in the dock, never raised into the event loop
        return number, err


def _form(widget: QWidget) -> QFormLayout:
    form = QFormLayout(widget)
    form.setContentsMargins(0, 0, 0, 0)
    return form


class ModelPicker(QWidget):
    """The model: the bundled demo model or a checkpoint file (or exported package), loaded in a worker thread
    (napari never freezes on the torch import); its classes and its card (what it was trained on, its scores).

    ``closed()`` says the dock is gone; ``loading()``, ``failed(err, explicit)`` and ``loaded(devices)`` let the dock
    update itself. ``model``/``info`` are None until a load succeeds; ``problem`` says why not.
    """

    def __init__(self, closed: Callable[[], bool], loading: Callable[[], None],
                 failed: Callable[[BaseException, bool], None], loaded: Callable[[Any], None]) -> None:
        super().__init__()
        self._closed, self._on_loading, self._on_failed, self._on_loaded = closed, loading, failed, loaded
        self.model = self.info = self.problem = None
        self._loading = 0  # the number of the load in flight (0: none); a newer choice supersedes it
        self.path: str | None = None  # the checkpoint file loaded or loading (None: the bundled model)
        self._worker = None
        self.combo = QComboBox()
        self.combo.addItems([BUNDLED, CHECKPOINT])
        self.combo.setToolTip("The bundled demo model was trained on synthetic patches only; choose a checkpoint "
                              "trained on real tissue for real slides")
        self.checkpoint_row = common.PathRow("model checkpoint (.pt) or exported package (.zip)", folder=False,
                                             file_filter="*.pt *.pth *.zip")
        self.checkpoint_row.setToolTip("A WSSS-CRAM checkpoint (.pt) written by training, or a model package (.zip) "
                                       "exported from one")
        self.classes_label = QLabel()
        self.card = QLabel()
        self.card.setWordWrap(True)
        self.card.setStyleSheet("color: #a0a4ab; font-size: 11px;")
        self.export_button = QPushButton("Export model…")
        self.export_button.setToolTip("Write the loaded model as a bioimage.io model package (.zip) for QuPath and "
                                      "the model zoo")
        form = _form(self)
        for label, widget in [("Model", self.combo), ("", self.checkpoint_row), ("Classes", self.classes_label),
                              ("", self.card), ("", self.export_button)]:
            form.addRow(label, widget)

    def connect(self) -> None:
        """Load on a new choice (after the dock restored its settings)."""
        self.combo.currentIndexChanged.connect(lambda *_: self.load())
        self.checkpoint_row.edit.editingFinished.connect(self._checkpoint_edited)

    def forget_missing_checkpoint(self) -> str | None:
        """A remembered checkpoint file that is gone (moved, a deleted run): start from the bundled model instead
        of an error. Returns the missing path, or None."""
        path = self.checkpoint_row.text().strip()
        if self.combo.currentText() != CHECKPOINT or not path or Path(path).is_file():
            return None
        self.combo.blockSignals(True)
        self.combo.setCurrentText(BUNDLED)
        self.combo.blockSignals(False)
        return path

    @property
    def loading(self) -> bool:
        return bool(self._loading)

    def choose_checkpoint(self, path: str | Path) -> bool:
        """Select and load a checkpoint file now; True when it loaded."""
        self.combo.blockSignals(True)
        self.combo.setCurrentText(CHECKPOINT)
        self.combo.blockSignals(False)
        self.checkpoint_row.setText(str(path))
        return self.load(wait=True)

    def _checkpoint_edited(self) -> None:
        """Load only when the field names another file (a reload would reset the resolution set meanwhile)."""
        if self.checkpoint_row.text() != self.path:
            self.load()

    def load(self, wait: bool = False) -> bool:
        """Load the chosen model, in a worker thread or now (``wait``); True when loaded by the time it returns."""
        from ..core.resources import demo_model_path
        from ._segment_job import load_model

        use_file = self.combo.currentText() == CHECKPOINT
        self.checkpoint_row.setVisible(use_file)
        self.model = self.info = self.problem = None
        self._loading += 1
        number = self._loading
        path = self.checkpoint_row.text() if use_file else demo_model_path()
        self.path = str(path) if use_file else None
        if not path:
            return self._failed(number, WsssCramError("Choose a checkpoint file (.pt) to segment with."))
        if not use_file and not Path(path).is_file():
            return self._failed(number, WsssCramError(
                f"The bundled demo model {path} is missing: train it with `wsss-cram train sample_data/patches "
                "--config sample` or choose a checkpoint file."))
        if wait:
            return self._result(_numbered_load(load_model, number, path))
        self.classes_label.setText("")
        self.card.setText(f"loading model {Path(path).name}…")
        self._on_loading()
        self._worker = common.in_background(_numbered_load, self._result, lambda err: self._failed(number, err),
                                            load_model, number, path)
        return False

    def _result(self, result: tuple) -> bool:
        number, loaded = result
        if isinstance(loaded, BaseException):
            return self._failed(number, loaded)
        return self._loaded(number, loaded)

    def _failed(self, number: int, err: BaseException) -> bool:
        if number != self._loading or self._closed():  # a newer choice is loading, or the dock is gone
            return False
        self._loading = 0
        self.classes_label.setText("")
        self.card.setText("")
        self.problem = err
        self._on_failed(err, self.combo.currentText() == CHECKPOINT and bool(self.checkpoint_row.text()))
        return False

    def _loaded(self, number: int, loaded: tuple) -> bool:
        if number != self._loading or self._closed():
            return False
        from ..core.checkpoint import model_card

        self._loading = 0
        self.model, self.info, devices = loaded
        card = model_card(self.info)
        # what it was trained on, how well it scored and its warnings; the tooltip holds it all
        shown = [(f'<span style="color:#f39800">{text}</span>' if kind == "warning" else text)
                 for kind, text in card if kind in ("data", "validation", "warning", "note")]
        self.card.setText(" · ".join(shown))
        self.card.setToolTip("\n".join(text for _, text in card))
        self.classes_label.setText(" ".join(
            f'<span style="color: rgb{tuple(color)}">■</span> {name}'
            for name, color in zip(self.info.classes.names, self.info.classes.colors, strict=True)))
        self._on_loaded(devices)
        return True


class ResolutionRow(QWidget):
    """How the image is resampled for the model: a scale factor or a target µm/px. Picking a model sets its
    default (``core.checkpoint.default_resolution``); switching the unit converts the value (2.5x is not 2.5 µm/px).

    ``context()`` -> (CheckpointInfo or None, the image's µm/px or None); ``refuse(text)`` shows why a switch is not
    possible.
    """

    def __init__(self, context: Callable[[], tuple[Any, float | None]], refuse: Callable[[str], None]) -> None:
        super().__init__()
        self._context, self._refuse = context, refuse
        self.combo = QComboBox()
        self.combo.addItems([SCALE, MPP])
        self.combo.setItemData(0, "Resample the image by this factor before the model sees it", Qt.ToolTipRole)
        self.combo.setItemData(1, "Resample the image to this pixel size (needs an image that states its µm/px)",
                               Qt.ToolTipRole)
        self.combo.setToolTip("How the image is resampled for the model; a loaded model sets the resolution it was "
                              "trained at")
        self.value = spin(QDoubleSpinBox, 0.05, 20.0, 1.0, 0.1, 3)
        self.value.setSuffix(RESOLUTION_SUFFIX[SCALE])
        self.value.setToolTip("scale: the image is resampled by this factor before the model sees it (×); µm/px: "
                              "it is resampled to this pixel size. Picking a model sets the resolution it was "
                              "trained at")
        self.mode = SCALE
        self.chosen = False  # True once the user sets it (then image changes keep it)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.combo)
        row.addWidget(self.value)
        self.combo.currentTextChanged.connect(self._mode_changed)
        self.value.valueChanged.connect(self._edited)

    def resolution(self):
        """The user's :class:`~napari_wsss_cram.core.checkpoint.Resolution`, or None: the model's default."""
        from ..core.checkpoint import Resolution

        if not self.chosen:
            return None
        value = self.value.value()
        return Resolution(mpp=value) if self.mode == MPP else Resolution(scale=value)

    def set_default(self, info: Any, image_has_mpp: bool) -> None:
        """Show the model's default resolution for an image that states (or not) its µm/px."""
        from ..core.checkpoint import default_resolution  # imports torch: only once a model is loaded

        resolution = default_resolution(info, image_has_mpp=image_has_mpp)
        self.show(MPP if resolution.mpp is not None else SCALE,
                  resolution.mpp if resolution.mpp is not None else resolution.scale)
        self.combo.setToolTip(f"Default for this model: {resolution.describe()}")

    def show(self, mode: str, value: float) -> None:  # type: ignore[override]
        """Show ``value`` in ``mode`` (not a choice of the user's)."""
        self.mode = mode
        self.combo.blockSignals(True)
        self.combo.setCurrentText(mode)
        self.combo.blockSignals(False)
        self.value.setSuffix(RESOLUTION_SUFFIX[mode])
        self.value.blockSignals(True)
        self.value.setValue(value)
        self.value.blockSignals(False)

    def _edited(self, *_args) -> None:
        self.chosen = True

    def _mode_changed(self, mode: str) -> None:
        """Convert the value through the image's µm/px, else the model's default in that unit."""
        from ..core.checkpoint import Resolution, default_resolution

        old, value = self.mode, self.value.value()
        if mode == old:
            return
        info, image_mpp = self._context()
        current = Resolution(mpp=value) if old == MPP else Resolution(scale=value)
        new = current.to_mpp(image_mpp) if mode == MPP else current.to_scale(image_mpp)
        if new is None and info is not None:
            default = default_resolution(info, image_has_mpp=mode == MPP)
            new = default.mpp if mode == MPP else default.scale
        if new is None:  # µm/px asked for, but neither the image nor the model states one
            self.show(old, value)
            self._refuse("Neither this image nor the model states a pixel size (µm/px): choose the resolution as "
                         "a scale.")
            return
        self.chosen = True
        self.show(mode, round(new, 3))


class BatchPanel(QGroupBox):
    """A folder of images segmented into an output folder with one summary CSV (as ``wsss-cram predict``)."""

    def __init__(self) -> None:
        super().__init__("Batch: a folder of images")
        form = QFormLayout(self)
        self.inputs = common.PathRow("folder of images (PNG, JPEG, TIFF, SVS)")
        self.inputs.setToolTip("Every image in this folder is segmented with the settings of the Segment tab")
        self.output = common.PathRow("output folder (labels, GeoJSON, composition, summary CSV)")
        self.output.setToolTip("Per image: the checked export formats + composition; for the run: "
                               "predict_summary.csv (as `wsss-cram predict` writes)")
        self.overwrite = QCheckBox("Replace existing outputs")
        self.overwrite.setToolTip("Without it, a run that would replace a file stops before any work")
        self.button = QPushButton("Segment folder")
        self.button.setToolTip("Segment every image of the folder in the background; Cancel stops it")
        form.addRow("Images", self.inputs)
        form.addRow("Output", self.output)
        form.addRow(self.overwrite)
        form.addRow(self.button)


def note_plain_image(layer) -> None:
    """A PNG/JPEG opened by napari's own reader (the plugin leaves plain images to it) states no µm/px: say so in
    its metadata as the plugin's reader does, so the pixel size can be entered and the resolution is a scale."""
    from ..core.io.formats import image_suffix

    meta = getattr(layer, "metadata", None)
    path = getattr(getattr(layer, "source", None), "path", None)
    if isinstance(meta, dict) and "mpp" not in meta and path and \
            image_suffix(path) in (".png", ".jpg", ".jpeg", ".bmp"):
        meta["mpp"] = None


def states_no_mpp(layer) -> bool:
    """True when the layer is known to lack a µm/px (its reader said so: ``metadata["mpp"]`` is None)."""
    meta = getattr(layer, "metadata", None)
    return isinstance(meta, dict) and "mpp" in meta and not meta["mpp"]


class ActivationRow(QWidget):
    """The class whose activation map is shown, and its opacity, in the chosen image's activation layer."""

    def __init__(self, viewer: Any, image_layer: Callable[[], Any]) -> None:
        super().__init__()
        self.viewer, self._image_layer = viewer, image_layer
        self.combo = QComboBox()
        self.combo.setToolTip("The class whose activation map (where the model sees it) is shown")
        self.opacity = QSlider(Qt.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(50)
        self.opacity.setToolTip("Opacity of the activation map")
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.combo, 2)
        row.addWidget(QLabel("opacity"))
        row.addWidget(self.opacity, 1)
        self.combo.currentTextChanged.connect(lambda _: self.show_map())
        self.opacity.valueChanged.connect(lambda _: self.show_map())

    def layer(self) -> Any:
        """The activation layer of the chosen image (the newest), or None."""
        from . import layers as result_layers

        image = self._image_layer()
        found = [] if image is None else result_layers.result_layers_of(self.viewer, image.name, "activation")
        return found[-1] if found else None

    def show_map(self) -> None:
        """Show the chosen class's map, at the chosen opacity, in the image's activation layer."""
        from . import layers as result_layers

        layer = self.layer()
        if layer is None:
            return
        name = self.combo.currentText()
        if name in layer.metadata[result_layers.METADATA_KEY].get("classes", []):
            result_layers.show_activation(layer, name)
        layer.opacity = self.opacity.value() / 100
