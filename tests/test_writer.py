"""npe2 writer: a tissue Labels layer saved as palette PNG, pyramidal OME-TIFF or QuPath GeoJSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_wsss_cram._writer import export_labels, write_labels
from napari_wsss_cram.core.classes import WSSS4LUAD, ClassSpec
from napari_wsss_cram.core.errors import WsssCramError
from napari_wsss_cram.core.io.png import read_index_png
from napari_wsss_cram.core.io.qupath import geojson_to_labels
from napari_wsss_cram.core.placement import Placement


def _mask() -> np.ndarray:
    mask = np.full((80, 120), WSSS4LUAD.background_index, np.uint8)
    mask[5:40, 10:70] = 0
    mask[40:75, 30:110] = 1
    mask[10:30, 80:110] = 2
    return mask


def _meta(classes=WSSS4LUAD, **extra) -> dict:
    return {"name": "case CRF labels", "metadata": {"wsss_cram": {"classes": classes.to_dict(), **extra}}}


def test_png_keeps_indices_and_palette(tmp_path):
    from PIL import Image

    path = tmp_path / "labels.png"
    assert write_labels(str(path), _mask(), _meta()) == [str(path)]
    np.testing.assert_array_equal(read_index_png(path), _mask())
    with Image.open(path) as img:
        assert img.mode == "P"
        assert tuple(img.getpalette()[:3]) == WSSS4LUAD.colors[0]


def test_ome_tiff_is_pyramidal_with_pixel_size(tmp_path):
    path = tmp_path / "labels.ome.tif"
    write_labels(str(path), _mask(), _meta(mpp=0.5))
    np.testing.assert_array_equal(tifffile.imread(path), _mask())
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata


def test_geojson_in_level0_coordinates_round_trips(tmp_path):
    path = tmp_path / "labels.geojson"
    # Labels of pyramid level 1 (2 level-0 px per label px) of a region starting at level-0 (y=100, x=40).
    placed = Placement(downsample=2.0, origin=(100.0, 40.0))
    write_labels(str(path), _mask(), _meta(placement=placed.to_metadata()))
    data = json.loads(path.read_text())
    names = {f["properties"]["classification"]["name"] for f in data["features"]}
    assert names == {"Tumor", "Stroma", "Normal"}  # QuPath's spelling of its classes
    xs = [pt[0] for f in data["features"] for poly in f["geometry"]["coordinates"] for ring in poly for pt in ring]
    assert min(xs) == pytest.approx(40 + 2 * 10)
    back = geojson_to_labels(path, (80, 120), WSSS4LUAD, placement=placed)
    assert (back == _mask()).mean() > 0.99


def test_custom_classes_and_refusals(tmp_path):
    classes = ClassSpec(("a", "b"))
    mask = np.array([[0, 1], [2, 2]], np.uint8).repeat(8, 0).repeat(8, 1)
    path = tmp_path / "two.png"
    write_labels(str(path), mask, _meta(classes))
    np.testing.assert_array_equal(read_index_png(path), mask)
    assert write_labels(str(tmp_path / "labels.jpg"), mask, _meta(classes)) == []
    with pytest.raises(WsssCramError, match="label value 7"):
        export_labels(tmp_path / "bad.png", np.full((8, 8), 7, np.uint8), classes)


def test_napari_save_layers_uses_the_plugin_writer(tmp_path):
    import napari
    from napari.layers import Labels
    from napari.plugins import _initialize_plugins

    _initialize_plugins()  # what napari does at start-up (discovers our npe2 manifest)

    layer = Labels(_mask(), name="case", metadata=_meta()["metadata"])
    written = napari.save_layers(str(tmp_path / "case.png"), [layer], plugin="napari-wsss-cram")
    assert [str(p) for p in written] == [str(tmp_path / "case.png")]
    np.testing.assert_array_equal(read_index_png(tmp_path / "case.png"), _mask())
