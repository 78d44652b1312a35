"""QuPath GeoJSON round trip: QuPath-style annotations -> labels (core, CLI, napari reader, Segment dock) -> paint ->
export -> re-import, pixel-exact; the export follows QuPath 0.4/0.5 conventions."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from napari_wsss_cram.cli import main
from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.errors import WsssCramError
from napari_wsss_cram.core.io.png import read_index_png
from napari_wsss_cram.core.io.qupath import (
    geojson_to_labels,
    labels_to_geojson,
    parse_class_map,
    qupath_to_labels,
)
from napari_wsss_cram.core.placement import Placement
from widget_helpers import he_like_image, make_tiny_checkpoint

T, S, N, BG = 0, 1, 2, WSSS4LUAD.background_index
H, W = 120, 160


def _feature(geometry: dict, name: str | None, object_type: str = "annotation") -> dict:
    props: dict = {"objectType": object_type}
    if name is not None:
        props["classification"] = {"name": name, "color": [200, 0, 0]}
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": geometry, "properties": props}


def _box(x0, y0, x1, y1) -> list:
    """A closed ring of the box [x0, x1] x [y0, y1] in QuPath's pixel-corner coordinates."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def qupath_features() -> list:
    """What QuPath 0.4/0.5 exports as a bare list of Features (FeatureCollection unticked): a Tumor polygon with a
    hole, a Stroma MultiPolygon of two parts, a Normal region, plus a detection and an unclassified annotation."""
    return [
        _feature({"type": "Polygon", "coordinates": [_box(10, 10, 70, 60), _box(30, 20, 50, 40)]}, "Tumor"),
        _feature({"type": "MultiPolygon", "coordinates": [[_box(80, 10, 100, 30)], [_box(110, 50, 150, 90)]]},
                 "stroma"),
        _feature({"type": "Polygon", "coordinates": [_box(10, 80, 60, 110)]}, "NORMAL"),
        _feature({"type": "Polygon", "coordinates": [_box(0, 0, 160, 120)]}, "Tumor", object_type="detection"),
        _feature({"type": "Polygon", "coordinates": [_box(0, 0, 160, 120)]}, None),
    ]


def expected_labels() -> np.ndarray:
    """The pixels whose centres lie inside each region (box [x0, x1] covers pixel columns x0 .. x1 - 1)."""
    out = np.full((H, W), BG, np.uint8)
    out[10:60, 10:70] = T
    out[20:40, 30:50] = BG  # the hole
    out[10:30, 80:100] = S
    out[50:90, 110:150] = S
    out[80:110, 10:60] = N
    return out


def test_qupath_list_of_features_with_holes_and_multipolygons():
    imported = qupath_to_labels(qupath_features(), (H, W), WSSS4LUAD)
    np.testing.assert_array_equal(imported.labels, expected_labels())
    assert imported.regions == {"tumor": 1, "stroma": 1, "normal": 1}
    assert imported.not_regions == 1 and imported.unclassified == 1
    assert "Imported 3 annotations" in imported.summary() and "1 without a class" in imported.summary()
    # the same as a FeatureCollection, and through the one geojson_to_labels
    collection = {"type": "FeatureCollection", "features": qupath_features()}
    np.testing.assert_array_equal(geojson_to_labels(collection, (H, W), WSSS4LUAD), expected_labels())


def test_unknown_qupath_classes_are_listed_and_can_be_mapped():
    features = qupath_features() + [
        _feature({"type": "Polygon", "coordinates": [_box(120, 100, 150, 115)]}, "Necrosis"),
        _feature({"type": "Polygon", "coordinates": [_box(70, 100, 90, 115)]}, "Tumour"),
        _feature({"type": "Polygon", "coordinates": [_box(95, 100, 105, 115)]}, "Tumour")]
    with pytest.raises(WsssCramError) as err:
        qupath_to_labels(features, (H, W), WSSS4LUAD)
    text = str(err.value)
    assert "'Tumour' (2 annotations)" in text and "'Necrosis' (1 annotation)" in text
    assert "tumor, stroma, normal" in text and "=skip" in text
    mapping = parse_class_map("Tumour=tumor; necrosis = skip")
    assert mapping == {"Tumour": "tumor", "necrosis": None}
    imported = qupath_to_labels(features, (H, W), WSSS4LUAD, class_map=mapping)
    assert (imported.labels[100:115, 70:90] == T).all() and (imported.labels[100:115, 120:150] == BG).all()
    assert imported.skipped_by_map == {"Necrosis": 1}
    with pytest.raises(WsssCramError, match="QuPath name=model class"):
        parse_class_map("Tumour")


def test_export_follows_qupath_conventions():
    labels = expected_labels()
    gj = labels_to_geojson(labels, WSSS4LUAD, placement=Placement(downsample=2.0, origin=(100.0, 40.0)))
    assert gj["type"] == "FeatureCollection"
    by_name = {f["properties"]["classification"]["name"]: f for f in gj["features"]}
    assert set(by_name) == {"Tumor", "Stroma", "Normal"}  # QuPath's spelling of its built-in classes
    for name, feature in by_name.items():
        props = feature["properties"]
        assert props["objectType"] == "annotation" and str(uuid.UUID(feature["id"])) == feature["id"]
        assert props["classification"]["color"] == list(WSSS4LUAD.colors[WSSS4LUAD.index_of(name)])
        assert feature["geometry"]["type"] == "MultiPolygon"
    assert len(by_name["Stroma"]["geometry"]["coordinates"]) == 2  # two parts
    [tumor] = by_name["Tumor"]["geometry"]["coordinates"]
    assert len(tumor) == 2  # exterior + hole
    # level-0 pixel corners: label column 10 starts at x = 40 + 2 * 10, row 10 at y = 100 + 2 * 10
    xs = [p[0] for ring in tumor for p in ring]
    ys = [p[1] for ring in tumor for p in ring]
    assert min(xs) == 60 and max(xs) == 40 + 2 * 70 and min(ys) == 120 and max(ys) == 100 + 2 * 60
    back = geojson_to_labels(gj, labels.shape, WSSS4LUAD, placement=Placement(downsample=2.0, origin=(100.0, 40.0)))
    np.testing.assert_array_equal(back, labels)  # exact


def test_cli_geojson_to_mask(tmp_path, capsys):
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(qupath_features()))
    out = tmp_path / "mask.png"
    assert main(["geojson-to-mask", str(path), "--shape", f"{H}x{W}", "--out", str(out)]) == 0
    np.testing.assert_array_equal(read_index_png(out), expected_labels())
    assert "Imported 3 annotations" in capsys.readouterr().err
    # an image gives the size; a name the model lacks is an error naming it
    bad = tmp_path / "bad.geojson"
    bad.write_text(json.dumps([_feature({"type": "Polygon", "coordinates": [_box(0, 0, 5, 5)]}, "Lymphocytes")]))
    assert main(["geojson-to-mask", str(bad), "--shape", "8x8", "--out", str(tmp_path / "b.png")]) == 2
    assert "'Lymphocytes'" in capsys.readouterr().err
    assert main(["geojson-to-mask", str(bad), "--shape", "8x8", "--out", str(tmp_path / "b.png"),
                 "--map", "Lymphocytes=stroma"]) == 0


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.mark.gui
def test_import_paint_export_reimport_is_pixel_exact(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path,
                                                     monkeypatch):
    monkeypatch.setenv("WSSS_CRAM_SETTINGS_FILE", str(tmp_path / "settings.ini"))
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": qupath_features()}))
    viewer = make_napari_viewer()
    image = viewer.add_image(np.resize(he_like_image(96), (H, W, 3)), name="patch", rgb=True,
                             scale=(0.5, 0.5), translate=(10.0, 20.0), metadata={"mpp": 0.5})
    _, widget = viewer.window.add_plugin_dock_widget("napari-wsss-cram", "Segment")
    assert widget.set_checkpoint(tiny_checkpoint)
    # the dock's action: read and rasterised in a worker, added on the image with the model's classes
    assert widget.import_qupath(path) is not None
    qtbot.waitUntil(lambda: "qupath: patch" in viewer.layers, timeout=20_000)
    layer = viewer.layers["qupath: patch"]
    np.testing.assert_array_equal(layer.data, expected_labels())
    np.testing.assert_allclose(layer.scale, image.scale)
    np.testing.assert_allclose(layer.translate, image.translate)
    assert "Imported 3 annotations" in widget.message.text()
    assert widget.labels_combo.currentText() == "qupath: patch"
    # the pathologist corrects: normal becomes stroma, and a new tumor region is painted
    painted = layer.data.copy()
    painted[painted == N] = S
    painted[95:115, 100:140] = T
    layer.data = painted
    widget.export_panel.format_checks["png"].setChecked(False)
    widget.export_panel.format_checks["ome-tiff"].setChecked(False)
    written = widget.export(tmp_path / "out")
    [geojson] = [p for p in written if p.endswith(".geojson")]
    # dropped on the viewer: the plugin's reader places it on the open image of matching size
    viewer.open(geojson, plugin="napari-wsss-cram")  # read in a worker: the layer comes when it is done
    qtbot.waitUntil(lambda: "qupath: patch [1]" in viewer.layers, timeout=20_000)
    again = viewer.layers["qupath: patch [1]"]
    np.testing.assert_array_equal(again.data, painted)  # pixel-exact after a full round trip
    np.testing.assert_allclose(again.scale, image.scale)
    np.testing.assert_allclose(again.translate, image.translate)
    exported = json.loads(open(geojson).read())
    assert {f["properties"]["classification"]["name"] for f in exported["features"]} == {"Tumor", "Stroma"}


@pytest.mark.gui
def test_the_import_result_is_the_last_thing_the_dock_is_told(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """napari's progress bar processes events while it repaints, so a result that arrives while a progress event
    is being handled is handled inside that handler: the dock must still end on the result, not on "Importing..."
    (a CI run left "Importing qupath.geojson..." in the Segment dock after the layer was added)."""
    from napari.utils import progress
    from qtpy.QtCore import QThreadPool

    from napari_wsss_cram.widgets._qupath_job import QuPathImportRun

    repaint = progress.set_description

    def worker_ends_during_the_repaint(self, description):  # the timing of the CI run, made certain
        QThreadPool.globalInstance().waitForDone(20_000)
        repaint(self, description)

    monkeypatch.setattr(progress, "set_description", worker_ends_during_the_repaint)
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(qupath_features()))
    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((H, W, 3), np.uint8), name="patch", rgb=True)
    told = []
    QuPathImportRun(str(path), [image], WSSS4LUAD, None, lambda result: told.append("result"),
                    lambda err: told.append(f"error {err}"), fixed=True, on_progress=lambda event: told.append("progress"))
    qtbot.waitUntil(lambda: "result" in told, timeout=20_000)
    qtbot.wait(50)
    assert told == ["progress", "result"]


@pytest.mark.gui
def test_a_model_that_loads_after_an_import_leaves_its_message(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """Annotations imported while the dock's model still loads: the model arriving enables Run but does not
    write "Ready." over "Imported 3 annotations" (it did: the pathologist lost what the import said)."""
    import threading

    from napari_wsss_cram.widgets import _segment_job

    monkeypatch.setenv("WSSS_CRAM_SETTINGS_FILE", str(tmp_path / "settings.ini"))
    release = threading.Event()
    real_load = _segment_job.load_model

    def slow_load(*args, **kwargs):  # the bundled model loads until the import is done
        release.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(_segment_job, "load_model", slow_load)
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": qupath_features()}))
    viewer = make_napari_viewer()
    viewer.add_image(np.resize(he_like_image(96), (H, W, 3)), name="patch", rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-wsss-cram", "Segment")
    assert widget.loading_model and widget.message.text() == "Loading the model…"
    assert widget.import_qupath(path) is not None
    qtbot.waitUntil(lambda: "Imported 3 annotations" in widget.message.text(), timeout=20_000)
    release.set()
    qtbot.waitUntil(lambda: not widget.loading_model, timeout=30_000)
    qtbot.wait(50)
    assert widget.run_button.isEnabled()  # the model is there: Run is offered
    assert "Imported 3 annotations" in widget.message.text()
    # a model chosen afterwards still says what it is doing, and "Ready." when it is there
    widget.picker.load()
    assert widget.message.text() == "Loading the model…"
    qtbot.waitUntil(lambda: not widget.loading_model, timeout=30_000)
    assert widget.message.text() == "Ready."


@pytest.mark.gui
def test_reader_places_annotations_on_a_slide_level(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """A big image: the labels come at the power-of-two level that stays paintable, still over the image."""
    from napari_wsss_cram.core.io import qupath

    path = tmp_path / "slide.geojson"
    path.write_text(json.dumps(qupath_features()))
    viewer = make_napari_viewer()
    full = np.zeros((240, 320, 3), np.uint8)
    viewer.add_image([full, full[::2, ::2]], name="slide", rgb=True, multiscale=True, scale=(0.25, 0.25))
    real = qupath.qupath_to_level_labels
    # 160 px stands in for the 8192 px limit of a real slide
    monkeypatch.setattr(qupath, "qupath_to_level_labels", lambda *a, **k: real(*a, **{**k, "max_side": 160}))
    viewer.open(str(path), plugin="napari-wsss-cram")  # read in a worker: the layer comes when it is done
    qtbot.waitUntil(lambda: "qupath: slide" in viewer.layers, timeout=20_000)
    layer = viewer.layers["qupath: slide"]
    assert layer.data.shape == (120, 160)  # level 1 of 240 x 320
    np.testing.assert_allclose(layer.scale, (0.5, 0.5))
    np.testing.assert_allclose(layer.translate, (0.125, 0.125))  # a level-1 pixel centre sits between two
    assert layer.metadata["wsss_cram"]["placement"]["downsample"] == 2.0
    # level-0 box [10, 70] x [10, 60] with its hole [30, 50] x [20, 40] -> level-1 [5, 35] x [5, 30], [15, 25] x [10, 20]
    assert (layer.data[5:30, 5:35] == T).sum() == 25 * 30 - 10 * 10
