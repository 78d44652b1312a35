"""Pixel size (µm/px, ``mpp``) from what a file states, trusted only when plausible for microscopy.

From OME ``PhysicalSizeX``, Aperio ``MPP =`` in the SVS ImageDescription, or the TIFF resolution tags (only in
centimetres/inches and below 50 µm/px, so the ubiquitous "72 dpi" default is not taken for a pixel size).
Values below 0.05 µm/px are refused and remembered in :data:`REJECTED_MPP`, for a warning naming the file.
"""

from __future__ import annotations

import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

import numpy as np

#: µm per unit of the OME ``PhysicalSizeXUnit`` values we accept.
OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}
MAX_PLAUSIBLE_MPP = 50.0
MIN_PLAUSIBLE_MPP = 0.05  # below any optical scan (100x oil is ~0.1 µm/px); as core.validate.RANGES["mpp"]

REJECTED_MPP = threading.local()  # µm/px values a file stated but _plausible refused, for a warning naming the file


def plausible_mpp(mpp: float | None) -> float | None:
    """``mpp`` when it is a plausible microscope pixel size, else None (a too-small value is remembered)."""
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        return None
    if not MIN_PLAUSIBLE_MPP <= mpp < MAX_PLAUSIBLE_MPP:
        if mpp < MIN_PLAUSIBLE_MPP:  # 0.0001 µm/px made the engine up-sample the image 1000x, silently
            REJECTED_MPP.values = [*getattr(REJECTED_MPP, "values", []), float(mpp)]
        return None
    return float(mpp)


def mpp_from_dpi(dpi: Sequence[float] | None) -> float | None:
    """µm/px from an image's dots per inch (Pillow's ``info["dpi"]``), when plausible."""
    if not dpi:
        return None
    try:
        return plausible_mpp(25400.0 / float(dpi[0]))
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def tiff_mpp(tif: Any) -> float | None:
    """µm/px of level 0 from OME, Aperio SVS or resolution tags, in that order of trust."""
    if tif.is_ome and tif.ome_metadata:
        mpp = _ome_mpp(tif.ome_metadata)
        if mpp is not None:
            return mpp
    page = tif.pages.first
    description = page.description or ""
    match = re.search(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)", description)
    if match:
        mpp = plausible_mpp(float(match.group(1)))
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
            factor = OME_UNITS_UM.get(unit)
            try:
                return None if factor is None else plausible_mpp(float(value) * factor)
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
        return plausible_mpp(um_per_unit / pixels_per_unit)
    except (ZeroDivisionError, TypeError, ValueError):
        return None
