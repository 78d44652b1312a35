"""Settings fields that describe themselves: default, help text, label, step and choices in one place.

The typed settings (``PredictSettings``, ``CRFParams``, ``ModelConfig``...) declare their fields with
:func:`setting`; the docks build their forms from that (``widgets/_forms.py``, magicgui: field type -> widget,
bounds from ``core.validate.RANGES`` or ``min``/``max``), so a field added with ``dock=True`` shows up in the dock
with no Qt code, and the CLI help and the dock's tooltip say the same. Qt-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

_MISSING: Any = dataclasses.MISSING


def setting(default: Any = _MISSING, help: str = "", *, label: str | None = None, step: float | None = None,
            suffix: str | None = None, choices: tuple | None = None, low: float | None = None,
            high: float | None = None, dock: bool = False, factory: Callable[[], Any] | None = None,
            decimals: int | None = None, none_label: str | None = None) -> Any:
    """A ``dataclasses.field`` with its description in ``metadata``: ``help`` (CLI help and dock tooltip),
    ``label`` (dock label; default: the name), ``step``/``suffix``/``decimals`` (spin boxes), ``choices`` (a combo
    box), ``low``/``high`` (bounds when ``core.validate`` has none), ``none_label`` (an optional number: the
    spin box's lowest value reads this and means None), ``dock`` (shown in the dock's form)."""
    metadata = {"help": help, "label": label, "step": step, "suffix": suffix, "choices": choices, "low": low,
                "high": high, "dock": dock, "decimals": decimals, "none_label": none_label}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (calling its factory)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def dock_fields(cls: type) -> list[str]:
    """The names of ``cls``'s fields marked ``dock=True``, in declaration order."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("dock")]


def help_of(cls: type, name: str) -> str:
    """The help text of field ``name`` of ``cls`` (empty when it has none)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return str(f.metadata.get("help") or "")


def parameter_defaults(func: Callable[..., Any]) -> dict[str, Any]:
    """The keyword defaults of ``func`` (a core entry point such as ``patchify``): its signature owns them, and a
    command's flags default to None ("the function's") and quote them in their help."""
    import inspect

    return {name: p.default for name, p in inspect.signature(func).parameters.items()
            if p.default is not inspect.Parameter.empty}


def given(**values: Any) -> dict[str, Any]:
    """The keyword arguments a user gave (not None), for a call that leaves the rest to the function's defaults."""
    return {name: value for name, value in values.items() if value is not None}
