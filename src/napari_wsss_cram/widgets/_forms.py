"""Settings forms generated with magicgui from the typed settings (``PredictSettings``, ``CRFParams``...).

Each field declared with ``core.fields.setting(..., dock=True)`` becomes a widget: its type picks the widget
(bool -> check box, int/float -> spin box, a field with ``choices`` -> combo box), its default is the dataclass's,
its bounds come from ``core.validate.RANGES`` (or the field's ``low``/``high``), its step, suffix, label and
tooltip from the field's metadata. Adding such a field to a dataclass adds it to the dock; no Qt code is written
for it. The form hands its values back as keyword arguments of the dataclass (:meth:`SettingsForm.values`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from magicgui.widgets import Container, create_widget

from ..core.fields import dock_fields, field_default
from ..core.validate import MODEL_RANGES, RANGES, TRAIN_RANGES


def _plain_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``: the widget edits the value; None is not offered in a form."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _bounds(name: str, meta: Any) -> tuple[float | None, float | None]:
    """A number field's bounds: the field's ``low``/``high``, else the range ``core.validate`` checks it against."""
    low = high = None
    for table in (RANGES, TRAIN_RANGES, MODEL_RANGES):
        if name in table:
            low, high, _ = table[name]
            break
    return (meta.get("low") if meta.get("low") is not None else low,
            meta.get("high") if meta.get("high") is not None else high)


def _shown(widget: Any, meta: Any, value: Any) -> Any:
    """The value a widget shows for ``value``: an optional number's None is its lowest value (``none_label``)."""
    return widget.min if value is None and meta.get("none_label") else value


def field_widget(cls: type, name: str, value: Any = dataclasses.MISSING) -> Any:
    """The magicgui widget of field ``name`` of dataclass ``cls`` (at ``value``, default: the field's default)."""
    spec = {f.name: f for f in dataclasses.fields(cls)}[name]
    meta = spec.metadata
    annotation = _plain_type(typing.get_type_hints(cls)[name])
    value = field_default(cls, name) if value is dataclasses.MISSING else value
    options: dict[str, Any] = {}
    widget_type = None
    if meta.get("choices"):
        widget_type, options["choices"] = "ComboBox", tuple(meta["choices"])
    elif annotation in (int, float):
        low, high = _bounds(name, meta)
        options["min"] = low if low is not None else (0 if annotation is int else 0.0)
        options["max"] = high if high is not None else 10 ** 6
        if meta.get("step") is not None:
            options["step"] = meta["step"]
    widget = create_widget(value=options.get("min") if value is None else value, annotation=annotation,
                           name=name, widget_type=widget_type, label=meta.get("label") or name.replace("_", " "),
                           options=options)
    widget.value = _shown(widget, meta, value)
    widget.tooltip = meta.get("help") or None
    native = widget.native
    if meta.get("decimals") is not None and hasattr(native, "setDecimals"):
        native.setDecimals(meta["decimals"])
        native.setValue(_shown(widget, meta, value))  # set again: fewer decimals had rounded it
    if meta.get("suffix") and hasattr(native, "setSuffix"):
        native.setSuffix(meta["suffix"])
    if meta.get("none_label") and hasattr(native, "setSpecialValueText"):
        native.setSpecialValueText(meta["none_label"])
    return widget


class SettingsForm(Container):
    """A magicgui form over some fields of a settings dataclass (default: those marked ``dock=True``)."""

    def __init__(self, cls: type, names: typing.Iterable[str] | None = None, **kwargs: Any) -> None:
        self.settings_class = cls
        names = list(names) if names is not None else dock_fields(cls)
        super().__init__(widgets=[field_widget(cls, name) for name in names], labels=True, **kwargs)
        self.native.layout().setContentsMargins(0, 0, 0, 0)

    @property
    def names(self) -> list[str]:
        return [w.name for w in self]

    def native_of(self, name: str) -> Any:
        """The Qt widget of field ``name`` (the dock keeps it under its old attribute, settings persist by it)."""
        return self[name].native

    def _meta(self, name: str) -> Any:
        return {f.name: f for f in dataclasses.fields(self.settings_class)}[name].metadata

    def values(self) -> dict[str, Any]:
        """The form's values as keyword arguments of the settings class (an optional number at its lowest value,
        shown as its ``none_label``, is None)."""
        return {w.name: None if self._meta(w.name).get("none_label") and w.value == w.min else w.value
                for w in self}

    def set_values(self, settings: Any) -> None:
        """Show the fields of ``settings`` (an instance of the settings class, e.g. a preset's)."""
        for w in self:
            w.value = _shown(w, self._meta(w.name), getattr(settings, w.name))

    def reset(self) -> None:
        """Every field back to the dataclass default."""
        for w in self:
            w.value = _shown(w, self._meta(w.name), field_default(self.settings_class, w.name))
