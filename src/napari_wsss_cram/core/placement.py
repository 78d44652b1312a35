"""Where a result's pixels sit on the slide: the one object for output geometry.

A result (labels, probabilities, an exported mask) is a grid of pixels that covers part of a slide at some
pyramid level. :class:`Placement` says which part: output pixel ``(i, j)`` covers the level-0 box whose top-left
*corner* is ``origin + (i, j) * downsample`` (level-0 pixels, corners at integers). Everything else is derived
from it, in one place, instead of being converted by hand at each use:

* napari's ``scale``/``translate`` (pixel *centres*: the centre of pixel 0 is at ``origin + (downsample - 1) / 2``),
  also composed with the source image layer's own scale/translate (:meth:`layer_transform`);
* GeoJSON coordinates (QuPath's level-0 pixel corners) of label-pixel corners and back
  (:meth:`corner_to_level0`, :meth:`level0_to_corner`), for ``labels_to_geojson`` and ``geojson_to_labels``;
* micrometres: µm per output pixel and the OME ``PositionY/PositionX`` of the result's corner (:meth:`position_um`).

The engine creates one per prediction (:meth:`of_region`); the napari dock rescales it when it segmented a
pyramid level handed over as a plain array (:meth:`in_units_of`) and stores it in the result layer's metadata
(:meth:`to_metadata` / :meth:`from_metadata`) so that exports find it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Placement:
    """Output pixels on level-0 pixels: ``downsample`` level-0 px per output px, top-left corner at ``origin``.

    ``origin`` is (y, x) in level-0 pixel-corner coordinates; ``level`` the pyramid level the output was made at
    (informative); ``mpp0`` the level-0 pixel size in µm (None when the image does not state it).
    """

    downsample: float = 1.0
    origin: tuple[float, float] = (0.0, 0.0)
    level: int = 0
    mpp0: float | None = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def of_region(cls, y: float, x: float, downsample: float, level: int = 0,
                  mpp0: float | None = None) -> Placement:
        """The placement of a region whose top-left pixel is (y, x) in pixels of a level of ``downsample``."""
        d = float(downsample)
        return cls(downsample=d, origin=(float(y) * d, float(x) * d), level=int(level), mpp0=mpp0)

    @classmethod
    def from_napari(cls, scale: Any, translate: Any, level: int = 0, mpp0: float | None = None) -> Placement:
        """Inverse of :attr:`scale`/:attr:`translate` (isotropic scale: the first axis is used)."""
        d = float(np.atleast_1d(np.asarray(scale, dtype=float))[-1])
        t = np.broadcast_to(np.atleast_1d(np.asarray(translate, dtype=float))[-2:], (2,))
        off = (d - 1.0) / 2.0
        return cls(downsample=d, origin=(float(t[0]) - off, float(t[1]) - off), level=level, mpp0=mpp0)

    def in_units_of(self, factor: float) -> Placement:
        """This placement, measured in pixels ``factor`` times larger: for a result computed on an image whose
        "level 0" is itself a pyramid level of downsample ``factor`` (the dock hands the engine one level)."""
        f = float(factor)
        return Placement(downsample=self.downsample * f, origin=(self.origin[0] * f, self.origin[1] * f),
                         level=self.level, mpp0=None if self.mpp0 is None else self.mpp0 / f)

    # ------------------------------------------------------------------ napari
    @property
    def scale(self) -> tuple[float, float]:
        """napari layer ``scale`` in level-0 pixels."""
        return (self.downsample, self.downsample)

    @property
    def translate(self) -> tuple[float, float]:
        """napari layer ``translate`` in level-0 pixels (napari places pixel *centres* at ``translate + i*scale``)."""
        off = (self.downsample - 1.0) / 2.0
        return (self.origin[0] + off, self.origin[1] + off)

    def layer_transform(self, source_scale: Any = 1.0, source_translate: Any = 0.0,
                        ) -> tuple[np.ndarray, np.ndarray]:
        """World ``scale``/``translate`` of a result layer drawn over an image layer whose level 0 has
        ``source_scale``/``source_translate`` (the last two axes are used)."""
        s = np.broadcast_to(np.atleast_1d(np.asarray(source_scale, dtype=float))[-2:], (2,))
        t = np.broadcast_to(np.atleast_1d(np.asarray(source_translate, dtype=float))[-2:], (2,))
        return s * np.asarray(self.scale), t + s * np.asarray(self.translate)

    # ------------------------------------------------------------------ pixels and corners
    def to_level0(self, rows: Any, cols: Any) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 pixel-centre coordinates of output pixel centres ``(rows, cols)``."""
        t = self.translate
        return (np.asarray(rows, float) * self.downsample + t[0], np.asarray(cols, float) * self.downsample + t[1])

    def corner_to_level0(self, rows: Any, cols: Any) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 corner coordinates (GeoJSON's) of output corner coordinates (corners at integers)."""
        return (np.asarray(rows, float) * self.downsample + self.origin[0],
                np.asarray(cols, float) * self.downsample + self.origin[1])

    def level0_to_corner(self, ys: Any, xs: Any) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of :meth:`corner_to_level0`."""
        return ((np.asarray(ys, float) - self.origin[0]) / self.downsample,
                (np.asarray(xs, float) - self.origin[1]) / self.downsample)

    # ------------------------------------------------------------------ micrometres
    @property
    def mpp(self) -> float | None:
        """µm per output pixel (None when the level-0 pixel size is unknown)."""
        return None if self.mpp0 is None else self.mpp0 * self.downsample

    def position_um(self) -> tuple[float, float] | None:
        """(y, x) of the result's top-left corner in µm from the slide's corner (OME ``PositionY/PositionX``)."""
        if self.mpp0 is None:
            return None
        return (self.origin[0] * self.mpp0, self.origin[1] * self.mpp0)

    @classmethod
    def from_position_um(cls, position: tuple[float, float], mpp: float, level_mpp0: float | None = None,
                         ) -> Placement:
        """The placement of an image of ``mpp`` µm/px whose corner lies at ``position`` (y, x) µm; in pixels of
        ``level_mpp0`` µm/px (default: the image's own pixels, so the origin is in those)."""
        base = float(level_mpp0 or mpp)
        return cls(downsample=float(mpp) / base, origin=(position[0] / base, position[1] / base), mpp0=base)

    # ------------------------------------------------------------------ layer metadata
    def to_metadata(self) -> dict[str, Any]:
        """Plain values for a napari layer's ``metadata["placement"]``."""
        return {"downsample": self.downsample, "origin": [float(v) for v in self.origin], "level": self.level,
                "mpp0": self.mpp0}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any] | None) -> Placement:
        """Inverse of :meth:`to_metadata`; an absent entry is the identity placement."""
        if not meta:
            return cls()
        origin = meta.get("origin", (0.0, 0.0))
        return cls(downsample=float(meta.get("downsample", 1.0)), origin=(float(origin[0]), float(origin[1])),
                   level=int(meta.get("level", 0)), mpp0=meta.get("mpp0"))
