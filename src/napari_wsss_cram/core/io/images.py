"""THE image reader of the project: PNG/JPEG (Pillow), TIFF/OME-TIFF/SVS (tifffile) and, with the optional
``openslide`` extra, vendor slides (MRXS, NDPI, SCN, BIF, DICOM... through OpenSlide), one interface.

``ImageSource.open(path)`` never loads a whole TIFF: pyramid levels come from ``series[0].levels`` and are
read lazily, decoding only the tiles (or strips) a region overlaps, and napari gets lazy (dask) multiscale
data built on the same region reads. PNG/JPEG are decoded whole at open (they are patch-sized formats;
a truncated file is thus caught at once).

Pixel conversions are explicit and identical for every path that reads pixels:
RGB is kept; alpha (RGBA, gray+alpha, TIFF ExtraSamples) is blended onto white, so transparent is background;
more than 3 channels without alpha are refused unless the RGB channels are named; the EXIF orientation of a
JPEG/PNG is applied (as viewers show it); grayscale is converted to RGB with a warning, 16-bit is scaled to
8-bit (full range, ``v / 257``), float is read as ``0..1``. Everything returned is ``uint8 (h, w, 3)``. A TIFF
holding more than one image (series) is read as its first, with a warning; a stated µm/px below 0.05 is
ignored with a warning naming the file.

Pixel size (µm/px, ``mpp``) comes from OME ``PhysicalSizeX``, Aperio ``MPP =`` in the SVS ImageDescription,
or the TIFF resolution tags (only when in centimetres/inches and plausible for microscopy, < 50 µm/px,
so the ubiquitous "72 dpi" default is not mistaken for a pixel size).
"""

from __future__ import annotations

import os
import re
import threading
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageReadError
from .formats import OPENSLIDE_INSTALL, OPENSLIDE_SUFFIXES, READERS, SLIDE_SUFFIXES  # noqa: F401

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


#: µm per unit of the OME ``PhysicalSizeXUnit`` values we accept.
_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}
_MAX_PLAUSIBLE_MPP = 50.0
_MIN_PLAUSIBLE_MPP = 0.05  # below any optical scan (100x oil is ~0.1 µm/px); as core.validate.RANGES["mpp"]

#: Images up to this many pixels are returned as in-memory arrays by ``napari_data`` when single-level.
_SMALL_IMAGE_PIXELS = 64_000_000


class GrayscaleImageWarning(UserWarning):
    """A grayscale image was converted to RGB (H&E models expect colour)."""


def _describe(path: Path) -> str:
    return f"'{path}'"


def to_rgb_uint8(block: np.ndarray, *, source: str = "image", float_max: float = 1.0, alpha: bool = False,
                 channels: tuple[int, int, int] | None = None) -> np.ndarray:
    """Convert a (h, w), (h, w, 1..4) block of uint8/uint16/float/bool to ``uint8 (h, w, 3)``.

    Float data is read as ``0..float_max`` (1 for the usual 0..1 images; :func:`float_range_max` tells an
    ImageJ/MATLAB 0..255 export). No warning here: the grayscale warning is issued once per image by
    ``ImageSource``. ``alpha``: the last of 2 or 4 channels is opacity, and what is transparent is blended onto
    white (background: slide scanners leave unscanned areas transparent). ``channels``: the RGB channels of an
    image with more than 3 (a multiplexed or fluorescence stack is refused without them: its first three
    channels are not an H&E colour image).
    """
    a = np.asarray(block)
    if channels is not None and a.ndim == 3:
        if max(channels) >= a.shape[2]:
            raise ImageReadError(f"{source}: RGB channels {channels} asked for, but it has {a.shape[2]} channels.")
        a, alpha = a[:, :, list(channels)], False
    elif a.ndim == 3 and a.shape[2] > 3 and not (alpha and a.shape[2] == 4):
        raise ImageReadError(f"{source} has {a.shape[2]} channels and no alpha; it is not an RGB image. Name "
                             "its red, green and blue channels (predict --channels R,G,B, counted from 0) or save it as RGB.")
    if alpha and a.ndim == 3 and a.shape[2] in (2, 4):
        a = _blend_on_white(a)
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        # Full 16-bit range to 8 bits, rounded; fixed scaling keeps tiles of one image consistent.
        a = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif a.dtype.kind == "f":
        a = np.clip(np.nan_to_num(a.astype(np.float32)) * (255.0 / float_max) + 0.5, 0, 255).astype(np.uint8)
    elif a.dtype.kind in "iu" and a.dtype.itemsize <= 4:
        # 32-bit integer data (e.g. Pillow mode "I" PNGs holding 16-bit values): treat as 16-bit.
        a = ((np.clip(a, 0, 65535).astype(np.uint32) + 128) // 257).astype(np.uint8)
    else:
        raise ImageReadError(f"{source}: unsupported pixel type {a.dtype}; convert it to 8-bit RGB.")
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3:
        raise ImageReadError(f"{source}: expected a 2-D image, got shape {a.shape}.")
    channels = a.shape[2]
    if channels == 1 or channels == 2:  # gray or gray+alpha
        return np.repeat(a[:, :, :1], 3, axis=2)
    if channels >= 3:
        return np.ascontiguousarray(a[:, :, :3])
    raise ImageReadError(f"{source}: unsupported channel count {channels}.")


def _blend_on_white(a: np.ndarray) -> np.ndarray:
    """Colour (or grey) with opacity as its last channel, blended onto white, in the input's dtype."""
    top = 1.0 if a.dtype.kind == "f" else float(np.iinfo(a.dtype).max) if a.dtype.kind in "iu" else 1.0
    colour, opacity = a[:, :, :-1].astype(np.float32), a[:, :, -1:].astype(np.float32) / top
    blended = colour * opacity + top * (1.0 - opacity)
    return (blended if a.dtype.kind == "f" else np.round(blended)).astype(a.dtype)


def float_range_max(values: np.ndarray, source: str) -> float:
    """The full-scale value of a float image from a sample of its pixels: 1 (0..1 data), 255 (an 8-bit image
    saved as float, as ImageJ and MATLAB do) or 65535; raises ``ImageReadError`` when no value is finite."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        raise ImageReadError(f"{source} holds no finite pixel values (all NaN or infinite); re-export the image.")
    top = float(finite.max())
    if top <= 1.0 + 1e-3:
        return 1.0
    if top <= 255.0 + 0.5:
        return 255.0
    if top <= 65535.0 + 0.5:
        return 65535.0
    raise ImageReadError(f"{source} holds float values up to {top:g}, beyond any image range (0..1, 0..255, "
                         "0..65535); convert it to 8-bit RGB.")


class _ArrayLevel:
    """An in-memory level, already ``uint8 (H, W, 3)``."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape = (int(array.shape[0]), int(array.shape[1]))
        self.samples = int(array.shape[2])
        self.dtype = array.dtype

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.array[y0:y1, x0:x1]


class _TiffLevel:
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


class _OpenSlideLevel:
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


_Level = _ArrayLevel | _TiffLevel | _OpenSlideLevel


class ImageSource:
    """A readable image or (pyramidal) slide. Use ``ImageSource.open(path)``; close it or use ``with``.

    Coordinates of ``read_region`` are in pixels *of the requested level*. Regions that extend past the
    image are padded with white (255), which the tissue mask treats as background.
    """

    def __init__(self, path: Path | None, levels: list[_Level], mpp: float | None,
                 grayscale: bool = False, handle: Any = None, fmt: str = "array", float_max: float = 1.0) -> None:
        self._path = path
        self._levels = levels
        self._mpp = mpp
        self._handle = handle
        self.grayscale = grayscale
        self.format = fmt
        #: full-scale value of float pixel data (see :func:`float_range_max`)
        self.float_max = float(float_max)
        #: the last channel is opacity (blended onto white); the RGB channels of a >3-channel image (None: 0-2)
        self.alpha = False
        self.channels: tuple[int, int, int] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, path: str | os.PathLike, reader: str = "auto",
             channels: tuple[int, int, int] | None = None) -> ImageSource:
        """Open an image or slide; raise ``ImageReadError`` (naming the file) when it cannot be read.

        ``reader`` (one of :data:`READERS`) picks the library for slides; see the README's table. ``channels``:
        the red, green and blue channels of an image with more than 3 (refused without them).
        """
        _REJECTED.values = []
        source = cls._open(path, reader, channels)
        for value in _REJECTED.values:
            if source.mpp is None:
                warnings.warn(f"{Path(path).name} states {value:g} µm per pixel, below any microscope's "
                              f"{_MIN_PLAUSIBLE_MPP:g}; ignoring it (the image has no pixel size: pass --scale, or "
                              "--mpp with the right value).", stacklevel=2)
                break
        return source

    @classmethod
    def _open(cls, path: str | os.PathLike, reader: str, channels: tuple[int, int, int] | None) -> ImageSource:
        if reader not in READERS:
            raise ImageReadError(f"Unknown reader '{reader}'; use one of {', '.join(READERS)}.")
        p = Path(path)
        if not p.exists():
            raise ImageReadError(f"Image {_describe(p)} does not exist; check the path.")
        if p.is_dir():
            dicom = dicom_file_of(p)
            if dicom is None:
                raise ImageReadError(f"{_describe(p)} is a folder, not an image file.")
            p = dicom
        if not p.is_file():
            # a named pipe would block the reader forever (and napari's GUI with it); devices and sockets too
            raise ImageReadError(f"{_describe(p)} is not a regular file (a pipe, device or socket); save the image "
                                 "to a file and open that.")
        try:
            size = p.stat().st_size
            with open(p, "rb") as fh:
                head = fh.read(4)
        except OSError as err:
            raise ImageReadError(f"Cannot read {_describe(p)}: {err.strerror or err}.") from None
        if size == 0:
            raise ImageReadError(f"Image {_describe(p)} is an empty (0-byte) file; re-export or re-copy it.")
        vendor = p.suffix.lower() in OPENSLIDE_SUFFIXES
        if vendor and reader == "tifffile" and head not in TIFF_MAGICS:
            raise ImageReadError(f"{_describe(p)} is a vendor slide format that only OpenSlide reads; use the "
                                 "'auto' or 'openslide' reader.")
        if (vendor and reader != "tifffile") or (reader == "openslide" and head in TIFF_MAGICS):
            source = cls._open_openslide(p)
        elif head in TIFF_MAGICS:
            source = cls._open_tiff(p)
        else:
            source = cls._open_pillow(p)
        # the pixels of a >3-channel image without named RGB channels are refused when read (to_rgb_uint8);
        # opening it stays possible, for its shape and metadata (the package's own probability maps too)
        source.channels = tuple(int(c) for c in channels) if channels is not None else None
        h, w = source.shape
        if h == 0 or w == 0:
            source.close()
            raise ImageReadError(f"Image {_describe(p)} has zero size ({h}x{w} pixels).")
        if source.grayscale:
            warnings.warn(f"{p.name} is grayscale; it was converted to RGB. H&E models expect colour images.",
                          GrayscaleImageWarning, stacklevel=2)
        return source

    @classmethod
    def from_array(cls, rgb: np.ndarray, mpp: float | None = None) -> ImageSource:
        """Wrap an in-memory image (any layout ``to_rgb_uint8`` accepts) as a one-level source."""
        arr = to_rgb_uint8(rgb, source="array")
        return cls(None, [_ArrayLevel(arr)], mpp, fmt="array")

    @classmethod
    def _open_pillow(cls, path: Path) -> ImageSource:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                if img.format == "PNG":
                    check_png_pixel_data(path, img)
                img.load()
                mpp = _mpp_from_dpi(img.info.get("dpi"))
                # as image viewers show it: a phone or camera JPEG stores its pixels sideways plus a flag
                if img.getexif().get(0x0112, 1) not in (1, None):
                    from PIL import ImageOps

                    img = ImageOps.exif_transpose(img)
                mode = img.mode
                if mode in ("P", "PA"):
                    img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
                elif mode == "L" and "transparency" in img.info:
                    img = img.convert("LA")
                elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                    img = img.convert("RGB")
                elif mode == "1":
                    img = img.convert("L")
                arr = np.asarray(img)
        except UnidentifiedImageError:
            raise ImageReadError(
                f"{_describe(path)} is not a readable image (supported: PNG, JPEG, TIFF, OME-TIFF, SVS)."
            ) from None
        except Image.DecompressionBombError:
            raise ImageReadError(f"{_describe(path)} is too large for PNG/JPEG reading; convert it to a tiled "
                                 "pyramidal TIFF (e.g. with `vips tiffsave --tile --pyramid`).") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageReadError(f"Cannot decode {_describe(path)} (truncated or corrupt?): {err}.") from None
        grayscale = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 2))
        float_max = float_range_max(arr, _describe(path)) if arr.dtype.kind == "f" else 1.0
        has_alpha = "A" in img.mode  # RGBA, LA: transparent pixels are background (white)
        rgb = to_rgb_uint8(arr, source=str(path), float_max=float_max, alpha=has_alpha)
        return cls(path, [_ArrayLevel(rgb)], mpp, grayscale=grayscale, fmt="pillow")

    @classmethod
    def _open_tiff(cls, path: Path) -> ImageSource:
        import tifffile
        import zarr

        if int(zarr.__version__.split(".")[0]) < 3:
            # tifffile's zarr store needs zarr 3; an old zarr would otherwise read as "corrupt file"
            raise ImageReadError(f"Reading TIFF {_describe(path)} needs zarr 3, but zarr {zarr.__version__} is "
                                 "installed: pip install \"zarr>=3.1\" (as the package requires).")

        tif = None
        try:
            tif = tifffile.TiffFile(path)
            tif.filehandle.set_lock(True)  # napari/dask read tiles from several threads: seek+read atomically
            if not tif.series:
                raise ImageReadError(f"TIFF {_describe(path)} holds no image.")
            series = tif.series[0]
            dtype = np.dtype(series.dtype)
            if dtype.kind not in "uifb" or (dtype.kind in "iu" and dtype.itemsize > 4):
                raise ImageReadError(f"TIFF {_describe(path)} has unsupported pixel type {dtype}; "
                                     "convert it to 8-bit RGB.")
            fill = np.iinfo(dtype).max if dtype.kind in "iu" else 1
            # decode a region's tiles in parallel threads (zarr fetches them concurrently)
            workers = max(1, min(4, os.cpu_count() or 1))
            levels = [_TiffLevel(series, i, fill, workers) for i in range(len(series.levels))]
            mpp = _tiff_mpp(tif)
            grayscale = levels[0].samples < 3
            source = cls(path, levels, mpp, grayscale=grayscale, handle=tif, fmt="tiff")
            extra = tuple(getattr(series.keyframe, "extrasamples", ()) or ())
            # ExtraSamples 1/2 = associated/unassociated alpha: transparent is background (white)
            source.alpha = levels[0].samples in (2, 4) and bool(extra) and int(extra[-1]) in (1, 2)
            _note_other_series(tif, path)
            # Decode one tile now so a truncated or corrupt file fails at open, not deep in a worker.
            lvl = levels[-1]
            corner = source._read_raw(len(levels) - 1, 0, min(lvl.shape[0], 16), 0, min(lvl.shape[1], 16))
            if dtype.kind == "f":
                # the value range of float data, from the smallest level (or its centre when that is large)
                sh, sw = lvl.shape
                ch, cw = min(sh, 2048), min(sw, 2048)
                sample = source._read_raw(len(levels) - 1, (sh - ch) // 2, (sh - ch) // 2 + ch,
                                          (sw - cw) // 2, (sw - cw) // 2 + cw) if sh * sw > 256 else corner
                source.float_max = float_range_max(sample, f"TIFF {_describe(path)}")
            h0, w0 = levels[0].shape
            source._read_raw(0, max(0, h0 - 1), h0, max(0, w0 - 1), w0)
            return source
        except ImageReadError:
            if tif is not None:
                tif.close()
            raise
        except Exception as err:  # tifffile/zarr/imagecodecs raise many types for corrupt files
            if tif is not None:
                tif.close()
            detail = str(err).splitlines()[0] if str(err) else ""
            # tifffile, zarr and the codecs fail with their internal types (TypeError, KeyError...) on damaged
            # files: what the user needs is that the file is damaged, and which one
            raise ImageReadError(f"Cannot read TIFF {_describe(path)}: the file is truncated or corrupt"
                                 f"{f' ({detail})' if detail else ''}. Re-export or re-copy it.") from None

    @classmethod
    def _open_openslide(cls, path: Path) -> ImageSource:
        try:
            import openslide
        except ImportError:
            raise ImageReadError(f"{_describe(path)} is read through OpenSlide, which is not installed. Install "
                                 f"the extra: {OPENSLIDE_INSTALL}") from None
        except OSError as err:  # openslide-python without its C library (openslide-bin or a system package)
            raise ImageReadError(f"{_describe(path)} needs the OpenSlide library, which could not be loaded "
                                 f"({err}). Install it with: {OPENSLIDE_INSTALL}") from None
        if openslide.OpenSlide.detect_format(str(path)) is None:
            raise ImageReadError(f"OpenSlide does not recognise {_describe(path)} as a slide; open it with the "
                                 "'tifffile' reader, or check that the file (and, for MRXS/VMS, its companion "
                                 "files) is complete.")
        slide = None
        try:
            slide = openslide.OpenSlide(str(path))
            levels = [_OpenSlideLevel(slide, i) for i in range(slide.level_count)]
            props = slide.properties
            mpp = None
            try:
                mpp = _plausible(float(props[openslide.PROPERTY_NAME_MPP_X]))
            except (KeyError, ValueError):
                pass
            source = cls(path, levels, mpp, handle=slide, fmt="openslide")
            lvl = levels[-1]
            source._read_raw(len(levels) - 1, 0, min(lvl.shape[0], 16), 0, min(lvl.shape[1], 16))
            return source
        except Exception as err:  # OpenSlideError and the C library's messages for damaged files
            if slide is not None:
                slide.close()
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ImageReadError(f"Cannot read slide {_describe(path)} with OpenSlide: {detail}. The file may be "
                                 "truncated or corrupt (or, for MRXS/VMS, miss its companion files).") from None

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def name(self) -> str:
        return self._path.name if self._path is not None else "array"

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of level 0."""
        return self._levels[0].shape

    @property
    def n_levels(self) -> int:
        return len(self._levels)

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        return [lv.shape for lv in self._levels]

    @property
    def level_downsamples(self) -> list[float]:
        """Downsample factor of each level relative to level 0 (mean of the y and x ratios)."""
        h0, w0 = self.shape
        return [float((h0 / h + w0 / w) / 2.0) for h, w in self.level_shapes]

    @property
    def mpp(self) -> float | None:
        """µm per pixel at level 0, or None when the file does not say."""
        return self._mpp

    def assume_mpp(self, mpp: float | None) -> None:
        """Use ``mpp`` (µm/px at level 0) when the file states none: the user knows it (WSSS4LUAD PNGs are
        ~0.25 µm/px). A pixel size the file states is kept."""
        if self._mpp is None and mpp:
            self._mpp = _plausible(float(mpp))

    def level_mpp(self, level: int) -> float | None:
        return None if self._mpp is None else self._mpp * self.level_downsamples[level]

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (never coarser than asked)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.01:
                best = i
        return best

    # ------------------------------------------------------------------ reading
    def _check_level(self, level: int) -> _Level:
        if not 0 <= level < len(self._levels):
            raise ImageReadError(f"{self.name}: level {level} does not exist (it has {len(self._levels)}).")
        return self._levels[level]

    def _read_raw(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self._levels[level].read(y0, y1, x0, x1)

    def read_region(self, y: int, x: int, h: int, w: int, level: int = 0) -> np.ndarray:
        """Read ``uint8 (h, w, 3)`` at ``(y, x)`` in the coordinates of ``level``; outside is white."""
        lv = self._check_level(level)
        y, x, h, w = int(y), int(x), int(h), int(w)
        if h <= 0 or w <= 0:
            raise ValueError(f"Region size must be positive, got {h}x{w}.")
        H, W = lv.shape
        y0, y1, x0, x1 = max(0, y), min(H, y + h), max(0, x), min(W, x + w)
        out = np.full((h, w, 3), 255, np.uint8)
        if y1 > y0 and x1 > x0:
            try:
                block = self._read_raw(level, y0, y1, x0, x1)
            except Exception as err:
                raise ImageReadError(f"Cannot read pixels of {self.name} at level {level}, region "
                                     f"y={y0}:{y1} x={x0}:{x1} (truncated or corrupt file?): {err}.") from None
            out[y0 - y: y1 - y, x0 - x: x1 - x] = to_rgb_uint8(block, source=self.name, float_max=self.float_max,
                                                               alpha=self.alpha, channels=self.channels)
        return out

    def read_level(self, level: int = 0) -> np.ndarray:
        """Read a whole level as ``uint8 (h, w, 3)``; only for levels that fit in memory."""
        h, w = self._check_level(level).shape
        return self.read_region(0, 0, h, w, level)

    def napari_data(self) -> list[Any] | np.ndarray:
        """Data for a napari ``Image`` layer with ``rgb=True``.

        A pyramid gives a list of lazy dask arrays ``(h, w, 3) uint8``, one per level, whose chunks are
        read through ``read_region`` (so the same RGB conversion applies). A single small level is
        returned in memory; a single large TIFF level lazily.
        """
        if self.n_levels == 1:
            h, w = self.shape
            if self.format not in ("tiff", "openslide") or h * w <= _SMALL_IMAGE_PIXELS:
                return self.read_level(0)
        return [self.lazy_level(i) for i in range(self.n_levels)]

    @property
    def samples(self) -> int:
        """Samples per pixel stored in the file (3 for RGB, 1 for gray or label images)."""
        return self._levels[0].samples

    @property
    def dtype(self) -> np.dtype:
        """The stored pixel type (reads convert to uint8 RGB unless ``raw``)."""
        return np.dtype(self._levels[0].dtype)

    def read_raw_region(self, y: int, x: int, h: int, w: int, level: int = 0) -> np.ndarray:
        """The stored values of the first sample, ``(h, w)`` in the file's dtype, for label images.

        The region must lie inside the level.
        """
        lv = self._check_level(level)
        H, W = lv.shape
        if y < 0 or x < 0 or y + h > H or x + w > W or h <= 0 or w <= 0:
            raise ValueError(f"Region y={y} x={x} {h}x{w} is outside level {level} of {self.name} ({H}x{W}).")
        try:
            block = self._read_raw(level, y, y + h, x, x + w)
        except Exception as err:
            raise ImageReadError(f"Cannot read pixels of {self.name} at level {level}: {err}.") from None
        return block[..., 0] if block.ndim == 3 else block

    def lazy_level(self, level: int, chunk: int = 1024, raw: bool = False) -> Any:
        """A lazy dask array of one level, ``(h, w, 3) uint8`` (or ``(h, w)`` stored values when ``raw``);
        chunks align with the file's tiles."""
        import dask.array as da

        lv = self._check_level(level)
        h, w = lv.shape
        tile = getattr(lv, "chunk", (chunk, chunk))
        cy = max(tile[0], (chunk // tile[0]) * tile[0]) if tile[0] < h else h
        cx = max(tile[1], (chunk // tile[1]) * tile[1]) if tile[1] < w else w
        name = f"wsss-cram-{self.name}-level{level}-{'raw' if raw else 'rgb'}-{id(self):x}"

        def load(block_info: Any = None) -> np.ndarray:
            (y0, y1), (x0, x1) = block_info[None]["array-location"][:2]
            if raw:
                return self.read_raw_region(y0, x0, y1 - y0, x1 - x0, level)
            return self.read_region(y0, x0, y1 - y0, x1 - x0, level)

        if raw:
            return da.map_blocks(load, dtype=self.dtype, chunks=(_chunk_sizes(h, cy), _chunk_sizes(w, cx)),
                                 name=name, meta=np.empty((0, 0), self.dtype))
        chunks = (_chunk_sizes(h, cy), _chunk_sizes(w, cx), (3,))
        return da.map_blocks(load, dtype=np.uint8, chunks=chunks, name=name,
                             meta=np.empty((0, 0, 0), np.uint8))

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        for lv in self._levels:
            if isinstance(lv, _TiffLevel):
                lv.close()
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ImageSource({self.name!r}, shape={self.shape}, levels={self.n_levels}, "
                f"mpp={self.mpp}, format={self.format!r})")


def _chunk_sizes(n: int, chunk: int) -> tuple[int, ...]:
    sizes = [chunk] * (n // chunk)
    if n % chunk:
        sizes.append(n % chunk)
    return tuple(sizes)


def _png_raw_size(width: int, height: int, bit_depth: int, color_type: int, interlace: int) -> int:
    """Bytes of a PNG's decompressed IDAT stream: each row's filter byte plus its packed samples (per Adam7
    pass when interlaced)."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color_type, 4)

    def rows(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + (w * channels * bit_depth + 7) // 8)

    if not interlace:
        return rows(width, height)
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    return sum(rows(-(-(width - x0) // dx), -(-(height - y0) // dy)) for x0, y0, dx, dy in passes)


def check_png_pixel_data(path: Path, img: Any) -> None:
    """Raise ``ImageReadError`` when a PNG's compressed pixel data is shorter than its header's size says.

    Pillow decodes such a file without complaint when the end marker is present, filling the missing rows
    with black (which would be segmented), and a tiny file that claims a huge size decodes for minutes. The
    zlib stream is inflated here in bounded pieces, output discarded: cheap for patch-sized images.
    """
    import struct
    import zlib

    data = Path(path).read_bytes()
    pos, chunks = 8, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            chunks.append(data[pos + 8:pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    if len(data) < 29:
        raise ImageReadError(f"{_describe(path)} is too short to be a PNG (truncated?).")
    width, height, bit_depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    expected = _png_raw_size(width, height, bit_depth, color_type, interlace)
    inflater = zlib.decompressobj()
    produced = 0
    try:
        for chunk in chunks:
            piece = inflater.decompress(chunk, 1 << 24)
            produced += len(piece)
            while inflater.unconsumed_tail and produced < expected:
                piece = inflater.decompress(inflater.unconsumed_tail, 1 << 24)
                produced += len(piece)
            if produced >= expected:
                break
    except zlib.error as err:
        raise ImageReadError(f"Cannot decode {_describe(path)}: its pixel data is corrupt ({err}).") from None
    if produced < expected:
        rows = max(1, expected // max(1, height))
        raise ImageReadError(
            f"{_describe(path)} is truncated: its header says {width}x{height} px but its pixel data stops after "
            f"about {produced // rows} of {height} rows. Re-export or re-copy the file.")


def dicom_file_of(folder: Path) -> Path | None:
    """The first ``.dcm`` file of a folder (a DICOM slide: OpenSlide opens it from any of its files), or None."""
    try:
        found = sorted(f for f in Path(folder).iterdir() if f.suffix.lower() == ".dcm" and f.is_file())
    except OSError:
        return None
    return found[0] if found else None


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read a whole (small) image as ``uint8 (H, W, 3)``; raises ``ImageReadError``."""
    with ImageSource.open(path) as src:
        return src.read_level(0)


# ---------------------------------------------------------------------- pixel size
_REJECTED = threading.local()  # µm/px values a file stated but _plausible refused, for a warning naming the file


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        return None
    if not _MIN_PLAUSIBLE_MPP <= mpp < _MAX_PLAUSIBLE_MPP:
        if mpp < _MIN_PLAUSIBLE_MPP:  # 0.0001 µm/px made the engine up-sample the image 1000x, silently
            _REJECTED.values = [*getattr(_REJECTED, "values", []), float(mpp)]
        return None
    return float(mpp)


def _note_other_series(tif: Any, path: Path) -> None:
    """Warn when a TIFF holds more images than the one read (series[0]): a second scan, an OME series or a
    stack of pages. An SVS file's label, macro and thumbnail are expected, and not reported."""
    others = [s for s in tif.series[1:]
              if (getattr(s, "name", "") or "").lower() not in ("thumbnail", "label", "macro", "overview")]
    pages = int(getattr(tif.series[0], "keyframe", None) is not None and len(tif.series[0].pages) or 1)
    if others:
        warnings.warn(f"{path.name} holds {len(others) + 1} images (series); only the first "
                      f"({'x'.join(map(str, tif.series[0].shape))}) is read. Save each one as its own file.",
                      stacklevel=3)
    elif pages > 1 and len(tif.series[0].levels) == 1 and len(tif.series[0].shape) > 3:
        warnings.warn(f"{path.name} holds a stack of {pages} pages; only the first is read.", stacklevel=3)


def _mpp_from_dpi(dpi: Sequence[float] | None) -> float | None:
    if not dpi:
        return None
    try:
        return _plausible(25400.0 / float(dpi[0]))
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def _tiff_mpp(tif: Any) -> float | None:
    """µm/px of level 0 from OME, Aperio SVS or resolution tags, in that order of trust."""
    if tif.is_ome and tif.ome_metadata:
        mpp = _ome_mpp(tif.ome_metadata)
        if mpp is not None:
            return mpp
    page = tif.pages.first
    description = page.description or ""
    match = re.search(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)", description)
    if match:
        mpp = _plausible(float(match.group(1)))
        if mpp is not None:
            return mpp
    return _resolution_mpp(page)


def _ome_mpp(xml: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("}Pixels") or el.tag == "Pixels":
            value = el.get("PhysicalSizeX")
            if value is None:
                return None
            unit = el.get("PhysicalSizeXUnit", "µm")
            factor = _OME_UNITS_UM.get(unit)
            try:
                return None if factor is None else _plausible(float(value) * factor)
            except ValueError:
                return None
    return None


def _resolution_mpp(page: Any) -> float | None:
    tags = page.tags
    xres = tags.get("XResolution")
    unit_tag = tags.get("ResolutionUnit")
    if xres is None or unit_tag is None:
        return None
    unit = int(unit_tag.value)
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # 2 inch, 3 centimetre; 1 "none" is meaningless
    if um_per_unit is None:
        return None
    value = xres.value
    try:
        pixels_per_unit = value[0] / value[1] if isinstance(value, tuple) else float(value)
        return _plausible(um_per_unit / pixels_per_unit)
    except (ZeroDivisionError, TypeError, ValueError):
        return None
