"""Tissue classes: names, colours and the palette shared by masks, layers and exports.

Convention (WSSS4LUAD): tissue classes take indices ``0..K-1`` and background is index ``K``.
The model emits ``K + 1`` channels in the same order, so an arg-max over its output is directly a mask.
``IGNORE_INDEX`` (255) marks pixels without a reliable label.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = 255

_DEFAULT_EXTRA_COLORS = (
    (200, 30, 30), (150, 60, 200), (30, 180, 200), (230, 120, 180), (120, 80, 40), (90, 90, 90),
)


@dataclass(frozen=True)
class ClassSpec:
    """Tissue classes (plus the implicit background) with display colours."""

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...] = field(default=())
    background_name: str = "background"
    background_color: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        names = tuple(str(n).strip() for n in self.names)
        if not names:
            raise ValueError("At least one tissue class is needed.")
        if len(set(n.lower() for n in names)) != len(names) or any(not n for n in names):
            raise ValueError(f"Class names must be unique and non-empty, got {list(self.names)}.")
        if self.background_name.lower() in (n.lower() for n in names):
            raise ValueError(f"'{self.background_name}' is reserved for the background class.")
        colors = tuple(tuple(int(c) for c in col) for col in self.colors)
        if len(colors) < len(names):
            colors = colors + tuple(_DEFAULT_EXTRA_COLORS[i % len(_DEFAULT_EXTRA_COLORS)]
                                    for i in range(len(colors), len(names)))
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "colors", colors[: len(names)])
        object.__setattr__(self, "background_color", tuple(int(c) for c in self.background_color))

    @property
    def num_classes(self) -> int:
        """K, the number of tissue classes."""
        return len(self.names)

    @property
    def num_outputs(self) -> int:
        """K + 1: tissue classes plus background, the model's channel count."""
        return len(self.names) + 1

    @property
    def background_index(self) -> int:
        return len(self.names)

    @property
    def all_names(self) -> tuple[str, ...]:
        return self.names + (self.background_name,)

    @property
    def all_colors(self) -> tuple[tuple[int, int, int], ...]:
        return self.colors + (self.background_color,)

    def palette(self) -> list[int]:
        """A 768-entry PIL palette: index i gets the colour of class i, 255 (ignore) is black."""
        pal = [0] * 768
        for i, col in enumerate(self.all_colors):
            pal[3 * i: 3 * i + 3] = list(col)
        return pal

    def index_of(self, name: str) -> int:
        lowered = [n.lower() for n in self.all_names]
        try:
            return lowered.index(name.strip().lower())
        except ValueError:
            raise KeyError(f"Unknown class '{name}'; known classes: {', '.join(self.all_names)}") from None

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "colors": [list(c) for c in self.colors],
            "background_name": self.background_name,
            "background_color": list(self.background_color),
        }

    @classmethod
    def from_dict(cls, data: dict) -> ClassSpec:
        return cls(
            names=tuple(data["names"]),
            colors=tuple(tuple(c) for c in data.get("colors", ())),
            background_name=data.get("background_name", "background"),
            background_color=tuple(data.get("background_color", (255, 255, 255))),
        )


#: WSSS4LUAD: palette colours of the challenge masks (tumor dark blue, stroma green, normal orange-yellow).
WSSS4LUAD = ClassSpec(names=("tumor", "stroma", "normal"), colors=((0, 64, 128), (64, 128, 0), (243, 152, 0)))


def class_spec_from_names(names: str | list[str] | tuple[str, ...] | None) -> ClassSpec:
    """Build a ClassSpec from ``"a,b,c"`` or a list; None gives the WSSS4LUAD default.

    Known WSSS4LUAD names keep their challenge colours so masks stay compatible.
    """
    if names is None:
        return WSSS4LUAD
    if isinstance(names, str):
        names = [n for n in (p.strip() for p in names.split(",")) if n]
    known = dict(zip(WSSS4LUAD.names, WSSS4LUAD.colors, strict=True))
    used = set()
    colors = []
    extra = iter(_DEFAULT_EXTRA_COLORS * 4)
    for n in names:
        col = known.get(n.lower())
        if col is None or col in used:
            col = next(c for c in extra if c not in used)
        used.add(col)
        colors.append(col)
    return ClassSpec(names=tuple(names), colors=tuple(colors))
