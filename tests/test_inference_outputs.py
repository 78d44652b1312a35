"""Outputs of the engine for one input: files, GeoJSON schema, composition, refusal to overwrite, cancel."""

from __future__ import annotations

import json
from xml.etree import ElementTree

import numpy as np
import pytest

from napari_wsss_cram.core.errors import OutputExistsError
from napari_wsss_cram.core.inference import PredictSettings, predict_array
from napari_wsss_cram.core.io.images import ImageSource
from napari_wsss_cram.core.io.png import read_index_png
from napari_wsss_cram.core.io.qupath import geojson_to_labels
from napari_wsss_cram.core.io.writers import write_outputs
from napari_wsss_cram.core.progress import Cancelled, CancelToken, drive
from test_inference import ColorNet, colour_blocks

ALL = ("png", "ome-tiff", "geojson", "probs")


@pytest.fixture(scope="module")
def prediction():
    img, _ = colour_blocks(96, 128, 24)
    return drive(predict_array(ColorNet(), None, img, PredictSettings(scale=1.0, tile=64, overlap=16), mpp=0.5))


def test_writes_every_output_with_schema(tmp_path, prediction):
    row = write_outputs(prediction, tmp_path, "patch", ALL)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["patch.geojson", "patch.ome.tif", "patch.png", "patch_composition.csv", "patch_composition.json",
                     "patch_probs.ome.tif"]
    classes = prediction.classes
    np.testing.assert_array_equal(read_index_png(tmp_path / "patch.png"), prediction.labels)
    with ImageSource.open(tmp_path / "patch.ome.tif") as src:
        assert src.mpp == pytest.approx(0.5)
    gj = json.loads((tmp_path / "patch.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and gj["features"]
    for feature in gj["features"]:
        assert feature["geometry"]["type"] == "MultiPolygon"
        assert feature["properties"]["objectType"] == "annotation"
        cls = feature["properties"]["classification"]
        assert cls["name"].lower() in classes.names and cls["color"] == list(classes.colors[classes.index_of(cls["name"])])
    back = geojson_to_labels(gj, prediction.shape, classes)
    assert (back == prediction.labels).mean() > 0.99
    comp = json.loads((tmp_path / "patch_composition.json").read_text())
    for name, count in prediction.class_pixels.items():
        assert comp["classes"][name]["pixels"] == count
        assert comp["classes"][name]["area_mm2"] == pytest.approx(count * 0.0005 ** 2)
    t, s = prediction.class_pixels["tumor"], prediction.class_pixels["stroma"]
    assert comp["tsr_stroma_fraction"] == (pytest.approx(s / (t + s)) if t else None)
    assert row["image"] == "patch" and row["pixels_tumor"] == t and row["tiles"] == prediction.info["tiles"]


def test_refuses_to_overwrite(tmp_path, prediction):
    write_outputs(prediction, tmp_path, "patch", ("png",))
    before = (tmp_path / "patch.png").stat().st_mtime_ns
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_outputs(prediction, tmp_path, "patch", ("png", "geojson"))
    assert not (tmp_path / "patch.geojson").exists()  # refused before writing anything
    assert (tmp_path / "patch.png").stat().st_mtime_ns == before
    write_outputs(prediction, tmp_path, "patch", ("png", "geojson"), overwrite=True)
    assert (tmp_path / "patch.geojson").exists()


def test_cancel_while_writing_leaves_nothing(tmp_path, prediction):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        write_outputs(prediction, tmp_path, "patch", ALL, cancel=token)
    assert list(tmp_path.iterdir()) == []


def test_streamed_prediction_outputs(tmp_path):
    img, truth = colour_blocks(200, 150, 40)
    pred = drive(predict_array(ColorNet(), None, img, PredictSettings(
        scale=1.0, tile=64, overlap=16, stream_threshold_mp=0.0, work_dir=str(tmp_path)), mpp=1.0))
    out = tmp_path / "out"
    try:
        row = write_outputs(pred, out, "slide", ALL)
    finally:
        pred.cleanup()
    assert not (out / "slide.png").exists() and row["skipped_outputs"] == "png"
    with ImageSource.open(out / "slide.ome.tif") as src:
        labels = src.read_level(0)[..., 0]
    assert (labels == truth).mean() > 0.97
    with ImageSource.open(out / "slide_probs.ome.tif") as src:
        assert src.shape == (200, 150)
    comp = json.loads((out / "slide_composition.json").read_text())
    assert comp["skipped_outputs"] == ["png"] and comp["total_pixels"] == 200 * 150
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the temporary store is gone


@pytest.mark.parametrize("level", [0, 1])
def test_field_of_view_ome_tiff_keeps_its_position(tmp_path, level):
    """A field of view at an offset, exported as OME-TIFF, re-opens through the plugin's reader over the same
    spot of the slide (OME PositionY/X in µm, physical size, exact placement)."""
    import tifffile

    from napari_wsss_cram._reader import read_layer
    from napari_wsss_cram.core.inference import predict_source
    from napari_wsss_cram.core.io.ometiff import write_pyramidal_ome_tiff

    img, truth = colour_blocks(512, 384, 64)
    slide = tmp_path / "slide.ome.tif"
    write_pyramidal_ome_tiff(slide, img, mpp=0.5, tile=128)
    region = (40, 24, 96, 80)  # y, x, h, w in pixels of the output level
    with ImageSource.open(slide) as src:
        pred = drive(predict_source(ColorNet(), None, src, PredictSettings(scale=1.0, tile=128, output_level=level),
                                    region=region))
    write_outputs(pred, tmp_path / "out", "fov", ("ome-tiff", "probs"))
    d = 2.0 ** level
    with tifffile.TiffFile(tmp_path / "out" / "fov.ome.tif") as tif:
        ome = tif.ome_metadata
    root = ElementTree.fromstring(ome)
    plane = next(el for el in root.iter() if el.tag.endswith("}Plane")).attrib
    pixels = next(el for el in root.iter() if el.tag.endswith("}Pixels")).attrib
    # the corner of the region, in µm from the slide's corner (0.5 µm per level-0 pixel)
    assert float(plane["PositionY"]) == pytest.approx(40 * d * 0.5) and plane["PositionYUnit"] == "µm"
    assert float(plane["PositionX"]) == pytest.approx(24 * d * 0.5) and plane["PositionXUnit"] == "µm"
    assert float(pixels["PhysicalSizeX"]) == pytest.approx(0.5 * d)
    slide_layer = read_layer(slide)
    data, kwargs, kind = read_layer(tmp_path / "out" / "fov.ome.tif")
    assert kind == "labels"
    np.testing.assert_array_equal(np.asarray(data), pred.labels)
    # world position (µm) of a labels pixel centre = that of the slide pixel it was computed for
    slide_scale = np.asarray(slide_layer[1]["scale"])
    np.testing.assert_allclose(kwargs["scale"], slide_scale * d)
    np.testing.assert_allclose(kwargs["translate"], slide_scale * np.asarray(pred.translate))
    world_of_first = np.asarray(kwargs["translate"])
    level0_centre = (np.asarray(region[:2]) + 0.5) * d - 0.5
    np.testing.assert_allclose(world_of_first, level0_centre * 0.5)
    assert (np.asarray(data) == truth[::int(d), ::int(d)][40:136, 24:104]).mean() > 0.95
    probs = read_layer(tmp_path / "out" / "fov_probs.ome.tif")
    np.testing.assert_allclose(probs[1]["translate"], kwargs["translate"])
