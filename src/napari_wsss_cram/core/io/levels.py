"""One pyramid level of an image, as the reader sees it: ``read(y0, y1, x0, x1)`` gives the stored values of a
region (``(h, w, samples)``, the file's dtype), ``shape``, ``samples``, ``dtype`` and, for tiled files, ``chunk``.
In memory, a TIFF level through tifffile's zarr store, or an OpenSlide level. :class:`~.images.ImageSource`
holds a list of them and converts what they read to RGB.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ArrayLevel:
    """An in-memory level, already ``uint8 (H, W, 3)``."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape = (int(array.shape[0]), int(array.shape[1]))
        self.samples = int(array.shape[2])
        self.dtype = array.dtype

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.array[y0:y1, x0:x1]


class TiffLevel:
    """One pyramid level of a TIFF series, read lazily through tifffile's zarr store (``aszarr``, zarr 3): a
    region read decodes only the tiles (or strips) it overlaps.

    The series' axes are mapped to ``(Y, X, S)``: other axes (a Z stack, time, separate OME channels) are read
    at index 0, as the project segments one 2-D RGB image per file.
    """

    def __init__(self, series: Any, level: int, fill: float, maxworkers: int) -> None:
        import zarr

        series_level = series.levels[level]
        kf = series_level.keyframe
        if kf.imagedepth > 1:
            raise ValueError("volumetric (3-D) TIFF pages are not supported")
        # zarr reads a tile the file does not list as missing (fill value), so a damaged table of tiles would
        # silently give white pixels: check it against the file (cheap, no pixel data is read)
        page = series_level.pages[0]
        expected = int(np.prod(kf.chunked))
        offsets = np.asarray(page.dataoffsets, np.int64)
        counts = np.asarray(page.databytecounts, np.int64)
        if len(offsets) < expected or len(counts) < expected:
            raise ValueError(f"level {level} lists {min(len(offsets), len(counts))} of its {expected} tiles/strips")
        end = int((offsets[:expected] + counts[:expected]).max(initial=0))
        size = int(kf.parent.filehandle.size)
        if end > size:
            raise ValueError(f"level {level}'s pixel data ends at byte {end}, past the end of the file ({size})")
        # Missing (sparse) tiles read as ``fill`` (white): for slides they are unscanned background.
        self.store = series.aszarr(level=level, fillvalue=fill, maxworkers=maxworkers)
        self.array = zarr.open(self.store, mode="r")
        axes = series_level.axes
        if self.array.ndim != len(axes) or "Y" not in axes or "X" not in axes:
            raise ValueError(f"unsupported TIFF layout (axes {axes!r}, shape {self.array.shape})")
        self.axes = axes
        shape = dict(zip(axes, self.array.shape, strict=True))
        chunks = dict(zip(axes, self.array.chunks, strict=True))
        self.shape = (int(shape["Y"]), int(shape["X"]))
        self.samples = int(shape.get("S", 1))
        self.dtype = np.dtype(self.array.dtype)
        self.chunk = (int(chunks["Y"]), int(chunks["X"]))
        kept = [a for a in axes if a in "YXS"]
        # where Y, X (and S) end up after indexing, to put them in (h, w, samples) order
        self._order = [kept.index(a) for a in "YXS" if a in kept]

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        index = tuple(slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X" else slice(None) if a == "S"
                      else 0 for a in self.axes)
        block = np.asarray(self.array[index]).transpose(self._order)
        return block if block.ndim == 3 else block[:, :, None]

    def close(self) -> None:
        self.store.close()


class OpenSlideLevel:
    """One level of a slide read through OpenSlide (vendor formats, or SVS when chosen). OpenSlide is
    thread-safe, returns premultiplied RGBA and leaves unscanned areas transparent: those become white."""

    def __init__(self, slide: Any, level: int) -> None:
        self.slide = slide
        self.level = level
        w, h = slide.level_dimensions[level]
        self.shape = (int(h), int(w))
        self.samples = 3
        self.dtype = np.dtype(np.uint8)
        self.downsample = float(slide.level_downsamples[level])
        props = slide.properties
        tile = (props.get(f"openslide.level[{level}].tile-height"), props.get(f"openslide.level[{level}].tile-width"))
        self.chunk = (int(tile[0]), int(tile[1])) if all(tile) else (512, 512)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        # OpenSlide takes the location in level-0 pixels; exact for the integer downsamples slides use
        location = (int(round(x0 * self.downsample)), int(round(y0 * self.downsample)))
        rgba = np.asarray(self.slide.read_region(location, self.level, (x1 - x0, y1 - y0)))
        alpha = rgba[..., 3:4].astype(np.uint16)
        if bool((alpha == 255).all()):
            return np.ascontiguousarray(rgba[..., :3])
        # openslide-python un-premultiplies; blend what is not opaque onto white (background)
        rgb = rgba[..., :3].astype(np.uint16)
        return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


LevelReader = ArrayLevel | TiffLevel | OpenSlideLevel
