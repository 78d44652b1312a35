"""Pyramidal OME-TIFF: RGB, label or channel images streamed to disk tile by tile, with their µm/px and their
position on the slide (:class:`~..placement.Placement`), and that position read back.

Streaming a huge result (bounded memory)
----------------------------------------
``write_pyramidal_ome_tiff(path, source, shape=(H, W[, C]), dtype=np.uint8)`` accepts, besides a NumPy array:

- any array-like that supports 2-D slicing ``source[y0:y1, x0:x1]`` (a zarr array, an ``np.memmap``...), or
- a callable ``source(y, x, h, w) -> ndarray (h, w[, C])`` that computes or loads one block on demand.

Level 0 is read one strip of ``tile`` rows at a time and handed to tifffile as an iterator of tiles; each strip
is also downsampled by 2 and appended to a raw temporary file, which becomes the source of the next level
(stored as an OME ``SubIFDs`` pyramid). Peak memory is a few strips of the full width (e.g. 256 x 32768 x 3 B
= 24 MiB for RGB) whatever the height; the temporary files take one third of the level-0 raw size on disk.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..placement import Placement
from .atomic import atomic_path

TileSource = Callable[[int, int, int, int], np.ndarray]


def _downsample2(strip: np.ndarray, mean: bool) -> np.ndarray:
    """Halve a (h, w[, C]) strip; odd edges are replicated. Labels take the top-left pixel (no new values)."""
    if not mean:
        return strip[::2, ::2]
    h, w = strip.shape[:2]
    if h % 2 or w % 2:
        pad = [(0, h % 2), (0, w % 2)] + [(0, 0)] * (strip.ndim - 2)
        strip = np.pad(strip, pad, mode="edge")
    s = strip.astype(np.uint16)
    out = (s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2] + 2) // 4
    return out.astype(strip.dtype)


def _default_levels(h: int, w: int, tile: int) -> int:
    n = 1
    while max(h, w) > tile and min(h, w) > 1:
        h, w = -(-h // 2), -(-w // 2)
        n += 1
    return n


#: OME Image Name of the label masks this package writes: how the napari reader knows them from grayscale images.
LABELS_IMAGE_NAME = "napari-wsss-cram tissue labels"


def is_labels_tiff(path: str | os.PathLike) -> bool:
    """True for a TIFF written as a label mask by :func:`write_pyramidal_ome_tiff` (by its OME Image Name)."""
    import tifffile

    p = Path(path)
    # only regular TIFF files: opening a named pipe would block (napari's GUI thread with it)
    if not p.name.lower().endswith((".tif", ".tiff")) or not p.is_file():
        return False
    try:
        with tifffile.TiffFile(p) as tif:
            return bool(tif.series) and tif.series[0].name == LABELS_IMAGE_NAME
    except Exception:  # not a TIFF, or unreadable: the image reader reports it properly
        return False


def write_pyramidal_ome_tiff(
    path: str | os.PathLike,
    data: Any,
    mpp: float | None = None,
    tile: int = 256,
    *,
    shape: tuple[int, ...] | None = None,
    dtype: Any = np.uint8,
    n_levels: int | None = None,
    labels: bool | None = None,
    compression: str | None = "zlib",
    channel_names: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    ome_uuid: str | None = None,
    placement: Placement | None = None,
) -> Path:
    """Write a tiled, pyramidal OME-TIFF of RGB ``(H, W, 3)``, labels/gray ``(H, W)`` or channels ``(H, W, C)``.

    ``data`` is an array, an array-like sliceable as ``data[y0:y1, x0:x1]`` (zarr, memmap), or a callable
    ``data(y, x, h, w) -> block`` (then ``shape`` is required). Levels halve until one tile holds the image
    (or ``n_levels``). ``labels`` (default: True for 2-D uint8) picks nearest-pixel downsampling so no new
    values appear, and names the OME image :data:`LABELS_IMAGE_NAME` so it re-opens as labels; otherwise 2x2
    means. ``mpp`` is stored as OME PhysicalSizeX/Y and as resolution tags.
    ``progress(done_strips, total_strips)`` is called after each strip of level 0 (it may raise to cancel).
    ``ome_uuid`` fixes the OME UUID (tifffile draws a random one) for byte-reproducible files.
    ``placement`` (a region of a slide, e.g. a field of view) is recorded as OME ``PositionY/PositionX`` (µm of
    the image's top-left corner from the slide's, when the slide states its µm/px) and exactly, in level-0
    pixels, in a private TIFF tag (:data:`PLACEMENT_TAG`): :func:`read_placement` gives it back.
    """
    import tifffile

    if tile % 16:
        raise ValueError("tile must be a multiple of 16 (TIFF requirement).")
    if callable(data) and not hasattr(data, "shape"):
        if shape is None:
            raise ValueError("shape=(H, W[, C]) is required when data is a callable.")
        read_block: TileSource = data
        full_shape = tuple(int(s) for s in shape)
        dt = np.dtype(dtype)
    else:
        full_shape = tuple(int(s) for s in data.shape)
        dt = np.dtype(data.dtype)

        def read_block(y: int, x: int, h: int, w: int) -> np.ndarray:
            return data[y: y + h, x: x + w]

    if len(full_shape) not in (2, 3):
        raise ValueError(f"Expected (H, W) or (H, W, C) data, got shape {full_shape}.")
    H, W = full_shape[:2]
    if H < 1 or W < 1:
        raise ValueError(f"Cannot write an empty image of shape {full_shape}.")
    samples = full_shape[2] if len(full_shape) == 3 else 1
    is_rgb = samples == 3
    if labels is None:
        labels = samples == 1 and dt == np.uint8
    n = n_levels or _default_levels(H, W, tile)
    level_shapes = [(H, W)]
    for _ in range(1, n):
        h, w = level_shapes[-1]
        level_shapes.append((-(-h // 2), -(-w // 2)))
    sample_shape = (samples,) if len(full_shape) == 3 else ()

    if is_rgb:
        photometric, axes = "rgb", "YXS"
    elif samples == 1:
        photometric, axes = "minisblack", "YX"
    else:
        photometric, axes = "minisblack", "YXC"
    metadata: dict[str, Any] = {"axes": axes}
    if ome_uuid is not None:
        metadata["UUID"] = f"urn:uuid:{ome_uuid}"
    if samples > 1 and not is_rgb:
        metadata["Channel"] = {"Name": channel_names or [f"channel {i}" for i in range(samples)]}
    if labels and samples == 1:
        metadata["Name"] = LABELS_IMAGE_NAME
    if mpp is not None:
        metadata.update(PhysicalSizeX=float(mpp), PhysicalSizeY=float(mpp),
                        PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
    extratags: list[tuple] = []
    if placement is not None:
        position = placement.position_um()
        if position is not None:
            planes = samples if (samples > 1 and not is_rgb) else 1
            metadata["Plane"] = {"PositionY": [float(position[0])] * planes, "PositionYUnit": ["µm"] * planes,
                                 "PositionX": [float(position[1])] * planes, "PositionXUnit": ["µm"] * planes}
        extratags.append((PLACEMENT_TAG, "s", 0, json.dumps(placement.to_metadata()), True))
    final = Path(path)
    with atomic_path(final) as tmp, tempfile.TemporaryDirectory(prefix=".levels-", dir=final.parent) as tdir:
        level_files = [Path(tdir) / f"level{i}.raw" for i in range(n)]

        def strips(level: int) -> Iterator[np.ndarray]:
            h, w = level_shapes[level]
            row_bytes = w * samples * dt.itemsize
            for y in range(0, h, tile):
                sh = min(tile, h - y)
                if level == 0:
                    block = np.asarray(read_block(y, 0, sh, w))
                    if block.shape[:2] != (sh, w):
                        raise ValueError(f"data source returned {block.shape} for a {sh}x{w} block.")
                    block = block.astype(dt, copy=False).reshape((sh, w) + sample_shape)
                    if progress is not None:
                        progress(y // tile + 1, -(-h // tile))
                else:
                    block = np.fromfile(level_files[level], dtype=dt, count=sh * w * samples,
                                        offset=y * row_bytes).reshape((sh, w) + sample_shape)
                yield block

        def tiles(level: int) -> Iterator[np.ndarray]:
            w = level_shapes[level][1]
            # The next level's strip is written (and flushed) *before* this strip's tiles are yielded:
            # tifffile stops pulling after the last tile, so code after the final yield would never run.
            nxt = open(level_files[level + 1], "wb") if level + 1 < n else None
            try:
                for block in strips(level):
                    if nxt is not None:
                        np.ascontiguousarray(_downsample2(block, mean=not labels)).tofile(nxt)
                        nxt.flush()
                    for x in range(0, w, tile):
                        yield block[:, x: x + tile]
            finally:
                if nxt is not None:
                    nxt.close()

        with tifffile.TiffWriter(tmp, bigtiff=H * W * samples * dt.itemsize > 2**31, ome=True) as tif:
            for level in range(n):
                h, w = level_shapes[level]
                kwargs: dict[str, Any] = {}
                if mpp is not None:
                    res = 1e4 / (float(mpp) * (H / h))  # pixels per cm at this level
                    kwargs.update(resolution=(res, res), resolutionunit="CENTIMETER")
                if level == 0:
                    kwargs.update(subifds=n - 1, metadata=metadata, extratags=extratags)
                else:
                    kwargs.update(subfiletype=1, metadata=None)
                tif.write(tiles(level), shape=(h, w) + sample_shape, dtype=dt, tile=(tile, tile),
                          photometric=photometric, planarconfig="contig" if samples > 1 else None,
                          compression=compression, maxworkers=1, **kwargs)
    return final


#: Private TIFF tag (the reusable 65000-65535 range) holding a result's :class:`Placement` as JSON.
PLACEMENT_TAG = 65101


def read_placement(path: str | os.PathLike) -> Placement | None:
    """The placement an OME-TIFF written by :func:`write_pyramidal_ome_tiff` records (exactly, from its private
    tag; else from OME ``PositionY/PositionX`` and ``PhysicalSize``), or None when it records none."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            tag = page.tags.get(PLACEMENT_TAG)
            if tag is not None:
                return Placement.from_metadata(json.loads(tag.value))
            ome = tif.ome_metadata if tif.is_ome else None
    except (OSError, ValueError, tifffile.TiffFileError, KeyError, TypeError):
        return None
    if not ome:
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(ome)
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels")), None)
    plane = next((el for el in root.iter() if el.tag.endswith("}Plane")), None)
    if pixels is None or plane is None or "PositionX" not in plane.attrib or "PhysicalSizeX" not in pixels.attrib:
        return None
    try:
        mpp = float(pixels.attrib["PhysicalSizeX"])
        position = (float(plane.attrib.get("PositionY", 0.0)), float(plane.attrib["PositionX"]))
    except ValueError:
        return None
    if not mpp > 0:
        return None
    # Without the slide's own µm/px the image's pixels serve as level 0 (exact for a level-0 result).
    return Placement.from_position_um(position, mpp)


