"""QuPath files as QuPath writes them (issue 20, items 5-7): derived classes, lines and points, annotations that
reach beyond the image; in the core, the Segment dock's Import and the napari reader (real viewer)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.io.qupath import parse_class_map, qupath_to_labels
from test_qupath import _box, _feature
from widget_helpers import he_like_image

T, S, BG = 0, 1, WSSS4LUAD.background_index


def _derived(geometry: dict, names: list[str], old_style: bool = False) -> dict:
    """A feature of a derived class: QuPath 0.4/0.5 write ``"names": [...]`` beside the joined ``name``; an
    older export only the joined name."""
    feature = _feature(geometry, ": ".join(names))
    if not old_style:
        feature["properties"]["classification"] = {"names": names, "color": [200, 0, 0]}
    return feature


def _features_with_derived_lines_points() -> list:
    return [
        _derived({"type": "Polygon", "coordinates": [_box(0, 0, 20, 10)]}, ["Tumor", "Positive"]),
        _derived({"type": "Polygon", "coordinates": [_box(0, 10, 20, 20)]}, ["Stroma", "Negative"], old_style=True),
        _feature({"type": "LineString", "coordinates": [[0, 0], [10, 10]]}, "Tumor"),
        _feature({"type": "LineString", "coordinates": [[5, 0], [10, 10]]}, "Lymphocytes"),  # unknown: no refusal
        _feature({"type": "Point", "coordinates": [3, 3]}, "Tumor"),
    ]


def test_derived_classes_map_to_their_base_and_a_map_overrides():
    imported = qupath_to_labels(_features_with_derived_lines_points(), (20, 20), WSSS4LUAD)
    assert (imported.labels[:10] == T).all() and (imported.labels[10:] == S).all()
    summary = imported.summary()
    assert "'Tumor: Positive' as tumor (1)" in summary and "'Stroma: Negative' as stroma (1)" in summary
    # the user's map wins for the full derived name
    mapped = qupath_to_labels(_features_with_derived_lines_points(), (20, 20), WSSS4LUAD,
                              class_map=parse_class_map("Tumor: Positive=stroma, Stroma: Negative=skip"))
    assert (mapped.labels[:10] == S).all() and (mapped.labels[10:] == BG).all()
    assert mapped.skipped_by_map == {"Stroma: Negative": 1} and not mapped.derived


def test_lines_and_points_are_counted_by_kind():
    imported = qupath_to_labels(_features_with_derived_lines_points(), (20, 20), WSSS4LUAD)
    assert imported.not_areas == {"LineString": 2, "Point": 1}
    summary = imported.summary()
    assert "2 lines (LineString: no area to fill)" in summary and "1 point (Point: no area to fill)" in summary


def test_one_annotation_is_singular():
    one = qupath_to_labels([_feature({"type": "Polygon", "coordinates": [_box(0, 0, 5, 5)]}, "Tumor")], (8, 8),
                           WSSS4LUAD)
    assert one.summary().startswith("Imported 1 annotation (tumor 1)")


@pytest.mark.gui
def test_dock_import_of_derived_classes_says_what_it_did(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_CRAM_SETTINGS_FILE", str(tmp_path / "settings.ini"))
    path = tmp_path / "qupath05.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": _features_with_derived_lines_points()}))
    viewer = make_napari_viewer()
    viewer.add_image(np.resize(he_like_image(32), (20, 20, 3)), name="patch", rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-wsss-cram", "Segment")
    # the bundled model loads in the background and says so when done: let it, so its message cannot land
    # after the import's (a CI run lost "Imported..." that way)
    qtbot.waitUntil(lambda: widget.model is not None, timeout=60_000)
    assert widget.import_qupath(path) is not None
    qtbot.waitUntil(lambda: "qupath: patch" in viewer.layers, timeout=20_000)
    assert (viewer.layers["qupath: patch"].data[:10] == T).all()
    # the message follows the layer (the import's end is handled over more than one event-loop turn)
    qtbot.waitUntil(lambda: "Imported" in widget.message.text(), timeout=20_000)
    text = widget.message.text()
    assert "Imported 2 annotations" in text and "'Tumor: Positive' as tumor" in text
    assert "2 lines" in text and "1 point" in text


@pytest.mark.gui
def test_dropped_geojson_beyond_the_image_is_clipped_to_it_and_said_in_napari(make_napari_viewer, qtbot, tmp_path):
    """A polygon poking out of the open image: the layer lies on that image (not a separate layer of the
    polygon's extent) and holds only the pixels inside it; the note reaches napari's notifications."""
    from napari.utils.notifications import notification_manager

    path = tmp_path / "poking.geojson"
    # 0..700 x 0..600 around a 100 x 80 image: only 100 x 80 pixels lie on the image
    path.write_text(json.dumps([_feature({"type": "Polygon", "coordinates": [_box(20, 10, 700, 600)]}, "Tumor")]))
    viewer = make_napari_viewer()
    image = viewer.add_image(np.resize(he_like_image(96), (80, 100, 3)), name="patch", rgb=True, scale=(0.5, 0.5))
    seen = []
    notification_manager.notification_ready.connect(lambda n: seen.append(str(n.message)))
    viewer.open(str(path), plugin="napari-wsss-cram")  # read in a worker: the layer comes when it is done
    qtbot.waitUntil(lambda: "qupath: patch" in viewer.layers, timeout=20_000)
    layer = viewer.layers["qupath: patch"]
    assert layer.data.shape == (80, 100)
    np.testing.assert_allclose(layer.scale, image.scale)
    assert int((layer.data == T).sum()) == (80 - 10) * (100 - 20)
    assert layer.metadata["wsss_cram"]["source"] == "patch"
    assert any("beyond the image" in text and "Imported 1 annotation" in text for text in seen), seen
