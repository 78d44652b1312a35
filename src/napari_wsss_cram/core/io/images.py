"""THE image reader of the project: PNG/JPEG (Pillow), TIFF/OME-TIFF/SVS (tifffile) and, with the optional
``openslide`` extra, vendor slides (MRXS, NDPI, SCN, BIF, DICOM... through OpenSlide), one interface.

``ImageSource.open(path)`` never loads a whole TIFF: pyramid levels come from ``series[0].levels`` and are
read lazily, decoding only the tiles (or strips) a region overlaps (:mod:`.levels`), and ``lazy_level`` gives
lazy (dask) arrays built on the same region reads. PNG/JPEG are decoded whole at open (they are patch-sized formats;
a truncated file is thus caught at once).

Pixel conversions (:mod:`.pixels`) are explicit and identical for every path that reads pixels:
RGB is kept; alpha (RGBA, gray+alpha, TIFF ExtraSamples) is blended onto white, so transparent is background;
more than 3 channels without alpha are refused unless the RGB channels are named; the EXIF orientation of a
JPEG/PNG is applied (as viewers show it); grayscale is converted to RGB with a warning, 16-bit is scaled to
8-bit (full range, ``v / 257``), float is read as ``0..1``. Everything returned is ``uint8 (h, w, 3)``. A TIFF
holding more than one image (series) is read as its first, with a warning; a stated µm/px below 0.05 is
ignored with a warning naming the file.

Pixel size (µm/px, ``mpp``, :mod:`.pixel_size`) comes from OME ``PhysicalSizeX``, Aperio ``MPP =`` in the SVS
ImageDescription, or the TIFF resolution tags (only when in centimetres/inches and plausible for microscopy,
< 50 µm/px, so the ubiquitous "72 dpi" default is not mistaken for a pixel size).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageReadError
from .formats import OPENSLIDE_INSTALL, OPENSLIDE_SUFFIXES, READERS, SLIDE_SUFFIXES  # noqa: F401
from .levels import ArrayLevel, LevelReader, OpenSlideLevel, TiffLevel
from .pixel_size import MIN_PLAUSIBLE_MPP, REJECTED_MPP, mpp_from_dpi, plausible_mpp, tiff_mpp
from .pixels import float_range_max, to_rgb_uint8
from .png import check_png_pixel_data

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class GrayscaleImageWarning(UserWarning):
    """A grayscale image was converted to RGB (H&E models expect colour)."""


def _describe(path: Path) -> str:
    return f"'{path}'"


class ImageSource:
    """A readable image or (pyramidal) slide. Use ``ImageSource.open(path)``; close it or use ``with``.

    Coordinates of ``read_region`` are in pixels *of the requested level*. Regions that extend past the
    image are padded with white (255), which the tissue mask treats as background.
    """

    def __init__(self, path: Path | None, levels: list[LevelReader], mpp: float | None,
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
        REJECTED_MPP.values = []
        source = cls._open(path, reader, channels)
        for value in REJECTED_MPP.values:
            if source.mpp is None:
                warnings.warn(f"{Path(path).name} states {value:g} µm per pixel, below any microscope's "
                              f"{MIN_PLAUSIBLE_MPP:g}; ignoring it (the image has no pixel size: pass --scale, or "
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
        return cls(None, [ArrayLevel(arr)], mpp, fmt="array")

    @classmethod
    def _open_pillow(cls, path: Path) -> ImageSource:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                if img.format == "PNG":
                    check_png_pixel_data(path, img)
                img.load()
                mpp = mpp_from_dpi(img.info.get("dpi"))
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
        return cls(path, [ArrayLevel(rgb)], mpp, grayscale=grayscale, fmt="pillow")

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
            levels = [TiffLevel(series, i, fill, workers) for i in range(len(series.levels))]
            mpp = tiff_mpp(tif)
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
            levels = [OpenSlideLevel(slide, i) for i in range(slide.level_count)]
            props = slide.properties
            mpp = None
            try:
                mpp = plausible_mpp(float(props[openslide.PROPERTY_NAME_MPP_X]))
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
            self._mpp = plausible_mpp(float(mpp))

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
    def _check_level(self, level: int) -> LevelReader:
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
            if isinstance(lv, TiffLevel):
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


