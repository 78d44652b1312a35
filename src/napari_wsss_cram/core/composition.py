"""Tissue composition of a label map: pixels and mm² per class, share of tissue, and the tumor-stroma ratio
(TSR), as a table for the dock, the CSV/JSON exports and the batch summary. Analysis, not a file format.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .classes import IGNORE_INDEX, ClassSpec


def class_pixel_counts(labels: Any, num_values: int = 256, strip_rows: int = 4096) -> np.ndarray:
    """Pixel count per label value (length 256), reading ``labels`` in row strips (works for zarr/memmap)."""
    counts = np.zeros(num_values, np.int64)
    h = labels.shape[0]
    for y in range(0, h, strip_rows):
        block = np.asarray(labels[y: y + strip_rows])
        counts += np.bincount(block.ravel().astype(np.uint8, copy=False), minlength=num_values)[:num_values]
    return counts


def composition_csv(table: dict) -> str:
    """A :func:`composition` table as CSV text (one row per class, then the tumor-stroma figures), for
    spreadsheets and the clipboard."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["class", "pixels", "area_mm2", "percent_of_tissue"])
    for name, values in table["classes"].items():
        area, fraction = values.get("area_mm2"), values.get("tissue_fraction")
        writer.writerow([name, values["pixels"], "" if area is None else f"{area:.6f}",
                         "" if fraction is None else f"{100 * fraction:.2f}"])
    if "tsr_stroma_fraction" in table:  # one row, always: an empty value says the ratio is undefined
        fraction = table["tsr_stroma_fraction"]
        writer.writerow([TSR_COLUMN, "", "", "" if fraction is None else f"{100 * fraction:.2f}"])
    return out.getvalue()


#: The name of the tumor-stroma ratio wherever it is written (composition CSV, batch summary): what it is.
TSR_COLUMN = "tsr_stroma_percent_of_tumor_plus_stroma"
#: Above this stroma share of tumor + stroma a tumour is "stroma-high" (the TSR literature's 50% cut-off).
TSR_HIGH_ABOVE = 0.5


def tumor_stroma_ratio(tumor_pixels: int, stroma_pixels: int) -> float | None:
    """The tumor-stroma ratio (TSR) as the field defines it: the stroma share of tumor + stroma area (0..1).

    None (undefined) when there is no tumor: the TSR describes the stroma *of a tumor*, so an image of stroma
    alone has no TSR, never "100% stroma-high".
    """
    tumor, stroma = int(tumor_pixels), int(stroma_pixels)
    if tumor <= 0:
        return None
    return stroma / (tumor + stroma)


def tsr_category(fraction: float | None) -> str | None:
    """``"stroma-high"`` above 50% stroma, ``"stroma-low"`` otherwise, None when the TSR is undefined."""
    if fraction is None:
        return None
    return "stroma-high" if fraction > TSR_HIGH_ABOVE else "stroma-low"


def describe_tsr(table: dict) -> str:
    """One line for people: ``Tumor-stroma ratio (TSR): stroma 40.0% of tumor + stroma (stroma-low)``, or why
    it is undefined."""
    if "tsr_stroma_fraction" not in table:
        return "Tumor-stroma ratio (TSR): needs classes named tumor and stroma."
    fraction = table["tsr_stroma_fraction"]
    if fraction is None:
        return "Tumor-stroma ratio (TSR): undefined, there is no tumor here."
    return (f"Tumor-stroma ratio (TSR): stroma {100 * fraction:.1f}% of tumor + stroma "
            f"({tsr_category(fraction)})")


def composition(labels: Any, classes: ClassSpec, mpp: float | None = None,
                counts: np.ndarray | None = None) -> dict:
    """Tissue composition of a label map (0..K-1 tissue, K background, 255 ignored).

    Returns per class ``pixels``, ``area_mm2`` (None without ``mpp``) and ``tissue_fraction`` (share of
    tissue pixels), plus, when classes named tumor and stroma exist, ``tsr_stroma_fraction`` (the tumor-stroma
    ratio, :func:`tumor_stroma_ratio`: stroma / (tumor + stroma), None without tumor) and ``tsr_category``.
    Pass precomputed ``counts`` (from ``class_pixel_counts``) to avoid a second pass over a big map.
    """
    if counts is None:
        counts = class_pixel_counts(labels)
    mm2_per_px = None if mpp is None else (float(mpp) * 1e-3) ** 2
    tissue = int(counts[: classes.num_classes].sum())
    per_class = {}
    for i, name in enumerate(classes.all_names):
        n = int(counts[i])
        per_class[name] = {
            "pixels": n,
            "area_mm2": None if mm2_per_px is None else n * mm2_per_px,
            "tissue_fraction": (n / tissue if tissue else 0.0) if i < classes.num_classes else None,
        }
    names = [n.lower() for n in classes.names]
    tumor = next((i for i, n in enumerate(names) if n in ("tumor", "tumour")), None)
    stroma = names.index("stroma") if "stroma" in names else None
    tsr = {}
    if tumor is not None and stroma is not None:
        fraction = tumor_stroma_ratio(counts[tumor], counts[stroma])
        tsr = {"tsr_stroma_fraction": fraction, "tsr_category": tsr_category(fraction)}
    total = int(counts.sum())
    return {
        "classes": per_class,
        "tissue_pixels": tissue,
        "tissue_area_mm2": None if mm2_per_px is None else tissue * mm2_per_px,
        "background_pixels": int(counts[classes.background_index]),
        "ignored_pixels": int(counts[IGNORE_INDEX]) if len(counts) > IGNORE_INDEX else 0,
        "total_pixels": total,
        "mpp": None if mpp is None else float(mpp),
        **tsr,
    }
