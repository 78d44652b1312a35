"""QuPath GeoJSON <-> class labels, as QuPath 0.4/0.5 write and read it: the one owner of GeoJSON geometry
(labels traced into polygons for the export, polygons rasterised into labels for the import).

QuPath's conventions (File > Export objects as GeoJSON, and drag-and-drop import):
- a FeatureCollection, or (with "Export as FeatureCollection" unticked) a bare JSON list of Features;
- ``properties.objectType``: ``"annotation"`` for drawn regions (``"detection"``/``"cell"``/``"tile"`` are
  per-object results, not regions: they are skipped on import); QuPath <= 0.3 wrote ``"id":
  "PathAnnotationObject"`` at the top level instead;
- ``properties.classification``: ``{"name": "Tumor", "color": [r, g, b]}`` (0.5 may add ``"names"`` for derived
  classes such as ``Tumor: Positive``; QuPath <= 0.2 wrote ``colorRGB``);
- Polygon / MultiPolygon (rings: exterior then holes) or a GeometryCollection of them, in level-0 pixels, pixel
  corners at integers, y down.
Class names map to the model's classes case-insensitively ("Tumor" -> tumor); ``class_map`` renames others
(``{"Tumour": "tumor", "Immune cells": None}``, None = skip). QuPath's built-in classes are case-sensitive, so
the export spells a model class the way QuPath does ("tumor" -> "Tumor", "normal" -> "Normal").
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..classes import ClassSpec
from ..errors import WsssCramError
from ..placement import Placement
from .atomic import atomic_path
from .png import as_label_array

#: QuPath's built-in classifications (PathClassManager defaults), spelled as QuPath spells them.
QUPATH_CLASSES = ("Tumor", "Stroma", "Immune cells", "Necrosis", "Other", "Region*", "Ignore*", "Positive",
                  "Negative")
#: objectType values that are regions a pathologist drew (the rest are per-object measurements).
REGION_TYPES = ("annotation",)
HINT = ("Export the annotations from QuPath with File > Export objects as GeoJSON (features with a Polygon or "
        "MultiPolygon geometry and a classification).")


def qupath_name(name: str) -> str:
    """The class name to write for QuPath: its built-in spelling when ``name`` is one of them ("Tumor"), else
    ``name`` with a capital first letter as QuPath's classes have ("Normal"). The import matches either."""
    builtin = next((q for q in QUPATH_CLASSES if q.lower() == name.strip().lower()), None)
    return builtin or name[:1].upper() + name[1:]


def parse_class_map(text: str) -> dict[str, str | None]:
    """``"Tumour=tumor, Immune cells=skip"`` -> ``{"Tumour": "tumor", "Immune cells": None}`` (skip/ignore/none:
    regions of that class are left out). Raises WsssCramError on a malformed entry."""
    mapping: dict[str, str | None] = {}
    for item in (part.strip() for part in text.replace(";", ",").split(",")):
        if not item:
            continue
        if "=" not in item:
            raise WsssCramError(f"Class mapping '{item}' is not of the form 'QuPath name=model class' "
                                "(e.g. 'Tumour=tumor, Immune cells=skip').")
        source, target = (s.strip() for s in item.split("=", 1))
        if not source or not target:
            raise WsssCramError(f"Class mapping '{item}' needs a name on both sides of '='.")
        mapping[source] = None if target.lower() in ("skip", "ignore", "none", "-") else target
    return mapping


@dataclass
class QuPathImport:
    """Labels rasterised from QuPath annotations, and what was used or left out (for the user's message)."""

    labels: np.ndarray
    regions: Counter = field(default_factory=Counter)  # model class name -> annotations drawn
    unclassified: int = 0  # annotations without a classification (left out)
    not_regions: int = 0  # detections / cells / tiles (left out)
    skipped_by_map: Counter = field(default_factory=Counter)  # QuPath names the mapping said to skip
    not_areas: Counter = field(default_factory=Counter)  # geometry type (LineString, Point, ...) -> left out
    derived: Counter = field(default_factory=Counter)  # (derived QuPath name, model class) -> annotations
    clipped: int = 0  # annotations reaching beyond the labels (only the part inside is filled)

    def summary(self) -> str:
        """``Imported 3 annotations (tumor 2, stroma 1); 'Tumor: Positive' read as tumor (2); left out: 1 without
        a class, 40 detections/cells, 2 lines (LineString), 1 point (Point)``."""
        used = ", ".join(f"{name} {n}" for name, n in sorted(self.regions.items()))
        total = sum(self.regions.values())
        text = f"Imported {total} annotation{'' if total == 1 else 's'}" + (f" ({used})" if used else "")
        if self.derived:
            text += "; derived classes read as their base class: " + ", ".join(
                f"'{name}' as {target} ({n})" for (name, target), n in self.derived.items()) + \
                " (map them in 'QuPath names' to change this)"
        left = []
        if self.unclassified:
            left.append(f"{self.unclassified} without a class")
        if self.not_regions:
            left.append(f"{self.not_regions} detections/cells")
        if self.skipped_by_map:
            left.append(", ".join(f"{n} '{name}' (mapped to skip)" for name, n in self.skipped_by_map.items()))
        if self.clipped:
            left.append(f"the part{'' if self.clipped == 1 else 's'} of {self.clipped} annotation"
                        f"{'' if self.clipped == 1 else 's'} beyond the image")
        for kind, n in sorted(self.not_areas.items()):
            word = GEOMETRY_WORDS.get(kind, "annotation")
            left.append(f"{n} {word}{'' if n == 1 else 's'} ({kind}: no area to fill)")
        return text + ("; left out: " + ", ".join(left) if left else "")


#: What a pathologist calls a GeoJSON geometry that encloses no area (QuPath's line, polyline and point tools).
GEOMETRY_WORDS = {"LineString": "line", "MultiLineString": "line", "Point": "point", "MultiPoint": "point set",
                  "none": "annotation without geometry"}


def load_features(geojson: Any, where: str = "GeoJSON") -> tuple[list, str]:
    """The features of a QuPath export: a path, a FeatureCollection, a bare list of Features, or one Feature
    -> (features, ``where`` for messages)."""
    if isinstance(geojson, str | os.PathLike):
        path = Path(geojson)
        where = f"GeoJSON '{path}'"
        try:
            geojson = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as err:
            raise WsssCramError(f"Cannot read {where}: {err}. {HINT}") from None
    if isinstance(geojson, list):
        return geojson, where
    if not isinstance(geojson, dict):
        raise WsssCramError(f"{where}: the file holds no GeoJSON object. {HINT}")
    if geojson.get("type") == "FeatureCollection":
        features = geojson.get("features", [])
        if not isinstance(features, list):
            raise WsssCramError(f"{where}: 'features' is not a list. {HINT}")
        return features, where
    return [geojson], where


def _polygons(geom: dict) -> list | None:
    """Polygon rings of a geometry (a list of polygons, each a list of rings); None for other geometry types."""
    kind = geom.get("type")
    if kind == "Polygon":
        return [geom.get("coordinates")]
    if kind == "MultiPolygon":
        return geom.get("coordinates")
    if kind == "GeometryCollection":
        out = []
        for part in geom.get("geometries") or []:
            polys = _polygons(part) if isinstance(part, dict) else None
            out += polys or []
        return out
    return None


def _class_name(props: dict, feature: dict) -> Any:
    classification = props.get("classification")
    if classification is None:
        classification = feature.get("classification")  # some older exports put it at the top level
    if isinstance(classification, dict):
        name = classification.get("name")
        if name is None and isinstance(classification.get("names"), list):
            name = ": ".join(str(n) for n in classification["names"])
        return name
    return classification


def _is_derived(name: str) -> bool:
    """A QuPath derived class ("Tumor: Positive": a base class and its intensity or sub-type)."""
    return ":" in name


def _target_class(name: str, mapping: Mapping[str, str | None], classes: ClassSpec) -> str | None:
    """The model class a QuPath class name goes to (None: the map says skip).

    The map wins for the full name ("Tumor: Positive=stroma"); then a model class of that name; then, for a
    derived class, its base class ("Tumor: Positive" -> "Tumor"), through the map too ("Tumour=tumor").
    """
    key = name.strip().lower()
    if key in mapping:
        return mapping[key]
    if not _is_derived(name) or _knows(classes, name):
        return name
    base = name.split(":", 1)[0].strip()
    return mapping.get(base.lower(), base) if base else name


def _knows(classes: ClassSpec, name: str) -> bool:
    try:
        classes.index_of(name)
    except KeyError:
        return False
    return True


def features_bounds(geojson: Any) -> tuple[float, float, float, float]:
    """(y0, x0, y1, x1) in level-0 pixels of the box that holds every polygon of the annotations."""
    features, where = load_features(geojson)
    lo, hi = [math.inf, math.inf], [-math.inf, -math.inf]
    for feat in features:
        geom = feat.get("geometry") if isinstance(feat, dict) else None
        for poly in (_polygons(geom) or []) if isinstance(geom, dict) else []:
            for ring in poly or []:
                try:
                    xy = np.asarray(ring, float)
                except (TypeError, ValueError):
                    continue
                if xy.ndim == 2 and xy.shape[1] >= 2 and len(xy) and np.isfinite(xy[:, :2]).all():
                    lo = [min(lo[0], float(xy[:, 1].min())), min(lo[1], float(xy[:, 0].min()))]
                    hi = [max(hi[0], float(xy[:, 1].max())), max(hi[1], float(xy[:, 0].max()))]
    if not math.isfinite(hi[0]) or max(hi) <= 0:
        raise WsssCramError(f"{where}: no polygon annotations found. {HINT}")
    return lo[0], lo[1], hi[0], hi[1]


def features_extent(geojson: Any) -> tuple[int, int]:
    """(height, width) in level-0 pixels that hold every polygon of the annotations (their max y, max x)."""
    _, _, y1, x1 = features_bounds(geojson)
    return math.ceil(max(y1, 0.0)), math.ceil(max(x1, 0.0))


def qupath_to_labels(
    geojson: Any,
    shape: tuple[int, int],
    classes: ClassSpec,
    *,
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
    fill: int | None = None,
    class_map: Mapping[str, str | None] | None = None,
) -> QuPathImport:
    """Rasterise QuPath annotations into class labels of ``shape`` (a level of downsample ``scale`` whose pixel
    (0, 0) corner sits at ``offset`` = (y, x) level-0 pixels).

    Pixels take a class when their centre is inside (even-odd over rings: holes stay holes); later annotations
    overwrite earlier ones; the rest get ``fill`` (default: background). Class names that neither the model nor
    ``class_map`` knows raise one WsssCramError listing all of them.
    """
    from skimage.draw import polygon as fill_polygon

    features, where = load_features(geojson)
    mapping = {k.strip().lower(): v for k, v in (class_map or {}).items()}
    h, w = int(shape[0]), int(shape[1])
    result = QuPathImport(np.full((h, w), classes.background_index if fill is None else fill, np.uint8))
    unknown: Counter = Counter()

    def bad(what: str) -> WsssCramError:
        return WsssCramError(f"{where}: {what}. {HINT}")

    for n, feat in enumerate(features, start=1):
        if not isinstance(feat, dict):
            raise bad(f"feature {n} is not an object")
        geom = feat.get("geometry") or {}
        props = feat.get("properties") or {}
        if not isinstance(geom, dict) or not isinstance(props, dict):
            raise bad(f"feature {n} has a malformed geometry or properties")
        object_type = props.get("objectType")
        old_id = feat.get("id")
        if object_type is None and isinstance(old_id, str) and old_id.startswith("Path"):  # QuPath <= 0.3
            object_type = "annotation" if old_id == "PathAnnotationObject" else "detection"
        if object_type is not None and object_type not in REGION_TYPES:
            result.not_regions += 1
            continue
        polys = _polygons(geom)
        if not polys:  # points and lines mark no region: counted and said, whatever their class
            kind = geom.get("type") or "none"
            result.not_areas[kind if isinstance(kind, str) else "none"] += 1
            continue
        name = _class_name(props, feat)
        if name is None:
            result.unclassified += 1
            continue
        if not isinstance(name, str):
            raise bad(f"feature {n} has a classification that is not a name")
        target = _target_class(name, mapping, classes)
        if target is None:
            result.skipped_by_map[name] += 1
            continue
        try:
            idx = classes.index_of(target)
        except KeyError:
            unknown[name] += 1
            continue
        if _is_derived(name) and name.strip().lower() not in mapping and target != name:
            result.derived[(name, classes.all_names[idx])] += 1
        if not isinstance(polys, list) or not all(isinstance(poly, list) for poly in polys):
            raise bad(f"feature {n} has malformed polygon coordinates")
        rings = []  # (rows, cols) in label pixels (centres at integers)
        for poly in polys:
            for ring in poly:
                try:
                    xy = np.asarray(ring, float)
                except (TypeError, ValueError):
                    raise bad(f"feature {n} has a ring that is not a list of [x, y] points") from None
                if xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy[:, :2]).all():
                    raise bad(f"feature {n} has a ring that is not a list of finite [x, y] points")
                if len(xy) >= 3:
                    rings.append(((xy[:, 1] - offset[0]) / scale - 0.5, (xy[:, 0] - offset[1]) / scale - 0.5))
        if not rings:
            continue
        # fill within the feature's bounding box only: a slide-sized mask per annotation would cost 64 MB each
        y0 = max(0, int(math.floor(min(r.min() for r, _ in rings))))
        x0 = max(0, int(math.floor(min(c.min() for _, c in rings))))
        y1 = min(h, int(math.ceil(max(r.max() for r, _ in rings))) + 1)
        x1 = min(w, int(math.ceil(max(c.max() for _, c in rings))) + 1)
        result.regions[classes.all_names[idx]] += 1
        if any(r.min() < -0.5 or c.min() < -0.5 or r.max() > h - 0.5 or c.max() > w - 0.5 for r, c in rings):
            result.clipped += 1
        if y1 <= y0 or x1 <= x0:
            continue  # outside the labels
        mask = np.zeros((y1 - y0, x1 - x0), bool)
        for rows, cols in rings:
            rr, cc = fill_polygon(rows - y0, cols - x0, shape=mask.shape)
            mask[rr, cc] ^= True
        result.labels[y0:y1, x0:x1][mask] = idx
    if unknown:
        names = ", ".join(f"'{k}' ({v} annotation{'s' if v > 1 else ''})" for k, v in unknown.most_common())
        raise WsssCramError(
            f"{where}: class names the model does not know: {names}. The model's classes are "
            f"{', '.join(classes.all_names)} (matched ignoring case). Map the others, e.g. "
            f"'{next(iter(unknown))}={classes.names[0]}' or '{next(iter(unknown))}=skip'.")
    return result


def downsample_for(shape: tuple[int, int], max_side: int = 8192) -> int:
    """The power of two that brings a level-0 ``shape`` to at most ``max_side`` pixels a side (paintable)."""
    d = 1
    while max(-(-int(shape[0]) // d), -(-int(shape[1]) // d)) > max_side:
        d *= 2
    return d


def qupath_to_level_labels(geojson: Any, level0_shape: tuple[int, int], classes: ClassSpec, *,
                           max_side: int = 8192, class_map: Mapping[str, str | None] | None = None
                           ) -> tuple[QuPathImport, int]:
    """QuPath annotations of an image of ``level0_shape`` as labels at the downsample (a power of two) that keeps
    them at most ``max_side`` a side -> (import, downsample). Label pixel ``u`` covers level-0 pixels
    ``u * d .. (u + 1) * d``; the GeoJSON export takes the same ``Placement(downsample=d)`` back."""
    d = downsample_for(level0_shape, max_side)
    shape = (-(-int(level0_shape[0]) // d), -(-int(level0_shape[1]) // d))
    return qupath_to_labels(geojson, shape, classes, scale=float(d), class_map=class_map), d


# ---------------------------------------------------------------------------- labels -> GeoJSON
def _ring_to_coords(ring: np.ndarray, placement: Placement) -> list[list[float]]:
    """(row, col) contour through pixel-edge midpoints -> closed [[x, y], ...] in level-0 pixel-corner coordinates."""
    ys, xs = placement.corner_to_level0(ring[:, 0] + 0.5, ring[:, 1] + 0.5)
    coords = [[round(float(x), 3), round(float(y), 3)] for x, y in zip(xs, ys, strict=True)]
    if coords[0] != coords[-1]:
        coords.append(coords[0])
    return coords


def _signed_area(ring: np.ndarray) -> float:
    y, x = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """A closed ring without the vertices that lie on a straight run (exact: contour points are half-integers)."""
    pts = ring[:-1] if len(ring) > 1 and np.array_equal(ring[0], ring[-1]) else ring
    if len(pts) < 4:
        return ring
    before, after = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - before[:, 0]) * (after[:, 1] - pts[:, 1]) - (pts[:, 1] - before[:, 1]) * (after[:, 0] - pts[:, 0])
    kept = pts[cross != 0]
    if len(kept) < 3:
        return ring
    return np.vstack([kept, kept[:1]])


def mask_to_polygons(mask: np.ndarray, tolerance: float = 0.0) -> list[list[np.ndarray]]:
    """Trace a boolean mask into polygons ``[exterior, hole, hole...]`` of (row, col) vertices.

    Contours run through the midpoints between pixel centres, so filling each polygon by pixel centres
    (even-odd rule over its rings) gives the mask back exactly before simplification.
    """
    from skimage.measure import approximate_polygon, find_contours, points_in_poly

    padded = np.pad(mask.astype(np.uint8), 1)
    contours = find_contours(padded, 0.5)
    exteriors: list[np.ndarray] = []
    holes: list[np.ndarray] = []
    for c in contours:
        if len(c) < 4:
            continue
        c = c - 1.0  # undo padding
        area = _signed_area(c)
        if abs(area) < 1e-9:
            continue
        simple = approximate_polygon(c, tolerance) if tolerance > 0 else _drop_collinear(c)
        if len(np.unique(simple[:-1], axis=0)) < 3 or abs(_signed_area(simple)) < 0.25:
            simple = c
        # find_contours walks with the high side on a fixed hand: the sign of the area tells outer from hole.
        (exteriors if area > 0 else holes).append(simple)
    polygons = [[e] for e in exteriors]
    if holes and exteriors:
        boxes = np.array([[e[:, 0].min(), e[:, 0].max(), e[:, 1].min(), e[:, 1].max()] for e in exteriors])
        areas = np.array([abs(_signed_area(e)) for e in exteriors])
        for hole in holes:
            py, px = hole[0]
            inside_box = np.nonzero((boxes[:, 0] <= py) & (py <= boxes[:, 1]) &
                                    (boxes[:, 2] <= px) & (px <= boxes[:, 3]))[0]
            candidates = [i for i in inside_box[np.argsort(areas[inside_box])]
                          if points_in_poly(hole[:1, ::-1], exteriors[i][:, ::-1])[0]]
            if candidates:
                polygons[candidates[0]].append(hole)  # the smallest enclosing exterior
    return polygons


def labels_to_geojson(
    labels: np.ndarray,
    classes: ClassSpec,
    *,
    placement: Placement | None = None,
    tolerance: float = 0.0,
    include_background: bool = False,
) -> dict:
    """A QuPath FeatureCollection: one MultiPolygon annotation per class present, holes kept
    (``objectType`` "annotation", ``classification`` name in QuPath's spelling + colour; see the module docstring).

    Coordinates are full-resolution pixels (x right, y down, pixel corners at integers): pass the labels'
    ``placement`` (:class:`~napari_wsss_cram.core.placement.Placement`) when they are a downsampled level or a
    region. ``tolerance`` is the Douglas-Peucker simplification in label pixels. The
    default 0 is exact (QuPath -> napari -> QuPath round trips give the same pixels) and only drops vertices
    on straight runs; on a 2048² synthetic mask it was also 4x faster than 0.5 (2.0 vs 8.1 s) for a 1.7x
    larger file (2.0 vs 1.2 MiB). 0.5
    keeps every vertex within half a pixel and lost < 1% mIoU round-trip on the 31 WSSS4LUAD validation masks.
    """
    arr = as_label_array(labels)
    placement = placement or Placement()
    features = []
    last = classes.num_outputs if include_background else classes.num_classes
    present = np.unique(arr)
    for idx in range(last):
        if idx not in present:
            continue
        polygons = mask_to_polygons(arr == idx, tolerance)
        if not polygons:
            continue
        coordinates = [[_ring_to_coords(r, placement) for r in poly] for poly in polygons]
        features.append({
            "type": "Feature",
            "id": str(uuid.UUID(int=idx + 1)),
            "geometry": {"type": "MultiPolygon", "coordinates": coordinates},
            "properties": {
                "objectType": "annotation",
                # QuPath's own spelling of its built-in classes (they are case-sensitive there)
                "classification": {"name": qupath_name(classes.all_names[idx]),
                                   "color": [int(c) for c in classes.all_colors[idx]]},
                "isLocked": False,
            },
        })
    return {"type": "FeatureCollection", "features": features}


def geojson_to_labels(
    geojson: dict | list | str | os.PathLike,
    shape: tuple[int, int],
    classes: ClassSpec,
    *,
    placement: Placement | None = None,
    fill: int | None = None,
    class_map: dict[str, str | None] | None = None,
) -> np.ndarray:
    """Rasterise QuPath annotations (a FeatureCollection, a list of Features, or a path) into class labels.

    ``shape`` and ``placement`` describe the labels grid (a region or a downsampled level of the slide whose
    level-0 pixels the GeoJSON coordinates are in; default: level 0 from the corner).
    Pixels take a class when their centre is inside (even-odd over rings, so holes stay holes); the rest get
    ``fill`` (default: background). Unknown class names raise ``WsssCramError``.
    """
    placement = placement or Placement()
    return qupath_to_labels(geojson, shape, classes, scale=placement.downsample, offset=placement.origin,
                            fill=fill, class_map=class_map).labels


def write_geojson(path: str | os.PathLike, labels_or_geojson: np.ndarray | dict,
                  classes: ClassSpec | None = None, **kwargs: Any) -> Path:
    """Write a FeatureCollection (given, or made from labels with ``labels_to_geojson(**kwargs)``)."""
    if isinstance(labels_or_geojson, dict):
        data = labels_or_geojson
    else:
        if classes is None:
            raise ValueError("classes is required to convert labels to GeoJSON.")
        data = labels_to_geojson(labels_or_geojson, classes, **kwargs)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, separators=(",", ":")))
    return Path(path)


