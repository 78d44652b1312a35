"""Output writers: index PNG, streamed pyramidal OME-TIFF, QuPath GeoJSON, composition, overwrite safety."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.composition import composition
from napari_wsss_cram.core.errors import OutputExistsError
from napari_wsss_cram.core.io.atomic import atomic_path
from napari_wsss_cram.core.io.guard import ensure_can_write
from napari_wsss_cram.core.io.images import ImageSource
from napari_wsss_cram.core.io.ometiff import write_pyramidal_ome_tiff
from napari_wsss_cram.core.io.png import read_index_png, write_index_png
from napari_wsss_cram.core.io.qupath import geojson_to_labels, labels_to_geojson, write_geojson
from napari_wsss_cram.core.metrics import ConfusionMatrix
from napari_wsss_cram.core.placement import Placement


def blob_labels(h: int = 240, w: int = 300, seed: int = 0) -> np.ndarray:
    """Smooth random regions of the 4 WSSS4LUAD values, with a hole and an island."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(4, h, w)), (0, 12, 12))
    labels = field.argmax(0).astype(np.uint8)
    labels[60:140, 60:160] = 0
    labels[80:120, 80:140] = 1  # a hole in tumor ...
    labels[95:105, 100:115] = 0  # ... with a tumor island inside it
    return labels


def test_index_png_round_trip_and_palette(tmp_path):
    labels = blob_labels()
    labels[0, :5] = 255
    path = write_index_png(tmp_path / "m.png", labels, WSSS4LUAD)
    with Image.open(path) as img:
        assert img.mode == "P"
        assert img.getpalette()[:12] == [0, 64, 128, 64, 128, 0, 243, 152, 0, 255, 255, 255]
    assert np.array_equal(read_index_png(path), labels)
    Image.fromarray(labels).save(tmp_path / "plain.png")  # a plain grayscale index PNG reads too
    assert np.array_equal(read_index_png(tmp_path / "plain.png"), labels)


def test_rgb_mask_read_with_classes(tmp_path):
    labels = blob_labels(50, 60)
    colors = np.array(WSSS4LUAD.all_colors, np.uint8)
    Image.fromarray(colors[labels]).save(tmp_path / "rgb.png")
    assert np.array_equal(read_index_png(tmp_path / "rgb.png", WSSS4LUAD), labels)


@pytest.mark.parametrize("kind", ["rgb", "labels"])
def test_pyramidal_ome_tiff_round_trip_with_pixel_size(tmp_path, kind):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (700, 900, 3), np.uint8) if kind == "rgb" else blob_labels(700, 900)
    path = write_pyramidal_ome_tiff(tmp_path / f"{kind}.ome.tif", data, mpp=0.25, tile=128)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        levels = tif.series[0].levels
        assert [lv.shape[:2] for lv in levels] == [(700, 900), (350, 450), (175, 225), (88, 113)]
        assert levels[0].keyframe.is_tiled and levels[0].keyframe.tilelength == 128
        assert np.array_equal(levels[0].asarray(), data)
        if kind == "labels":  # nearest-pixel levels: no invented label values
            assert np.array_equal(levels[2].asarray(), data[::4, ::4])
    if kind == "rgb":
        with ImageSource.open(path) as src:
            assert src.mpp == pytest.approx(0.25)
            assert src.n_levels == 4
            assert np.array_equal(src.read_region(100, 200, 50, 60), data[100:150, 200:260])


def test_ome_tiff_streams_from_a_callable_tile_source(tmp_path):
    labels = blob_labels(1000, 777)
    calls = []

    def source(y, x, h, w):
        calls.append((y, x, h, w))
        return labels[y: y + h, x: x + w]

    path = write_pyramidal_ome_tiff(tmp_path / "s.ome.tif", source, shape=labels.shape, tile=256)
    assert max(h for _, _, h, _ in calls) <= 256  # never asked for more than one strip of tiles
    assert np.array_equal(tifffile.imread(path), labels)


def test_cancelled_write_leaves_nothing(tmp_path):
    class Stop(Exception):
        pass

    def source(y, x, h, w):
        if y >= 512:
            raise Stop
        return np.zeros((h, w), np.uint8)

    with pytest.raises(Stop):
        write_pyramidal_ome_tiff(tmp_path / "c.ome.tif", source, shape=(2048, 300), tile=256)
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_and_refusal_to_overwrite(tmp_path):
    target = tmp_path / "out.json"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("{}")
    assert target.read_text() == "{}"
    with pytest.raises(OutputExistsError, match="out.json"):
        ensure_can_write(target, overwrite=False)
    assert ensure_can_write(target, overwrite=True) == target
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_geojson_schema_and_round_trip(tmp_path):
    labels = blob_labels()
    gj = labels_to_geojson(labels, WSSS4LUAD)
    assert gj["type"] == "FeatureCollection"
    names = [f["properties"]["classification"]["name"] for f in gj["features"]]
    assert sorted(names) == ["Normal", "Stroma", "Tumor"]  # QuPath's spelling; background is not exported
    for f in gj["features"]:
        assert f["geometry"]["type"] == "MultiPolygon"
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"]["color"] == list(WSSS4LUAD.colors[WSSS4LUAD.index_of(
            f["properties"]["classification"]["name"])])
        for poly in f["geometry"]["coordinates"]:
            for ring in poly:
                assert ring[0] == ring[-1] and len(ring) >= 4
    tumor = next(f for f in gj["features"] if f["properties"]["classification"]["name"] == "Tumor")
    assert any(len(poly) > 1 for poly in tumor["geometry"]["coordinates"])  # the hole is kept
    path = write_geojson(tmp_path / "m.geojson", labels, WSSS4LUAD)
    back = geojson_to_labels(path, labels.shape, WSSS4LUAD)
    assert json.loads(path.read_text())["features"]
    cm = ConfusionMatrix(WSSS4LUAD)
    cm.update(back, labels)
    assert cm.miou() >= 0.99
    assert back[100, 107] == 0 and back[85, 85] == 1  # island inside the hole, and the hole


def test_geojson_exact_without_simplification_and_scaled_coordinates():
    labels = blob_labels(120, 150, seed=3)
    exact = geojson_to_labels(labels_to_geojson(labels, WSSS4LUAD, tolerance=0), labels.shape, WSSS4LUAD)
    assert np.array_equal(exact, labels)
    placed = Placement.of_region(250, 500, 4.0)  # a region of level 2: corner at (1000, 2000) level-0 px
    gj = labels_to_geojson(labels, WSSS4LUAD, tolerance=0, placement=placed)
    xs = [pt[0] for f in gj["features"] for poly in f["geometry"]["coordinates"] for r in poly for pt in r]
    assert 2000 <= min(xs) and max(xs) <= 2000 + 4 * 150
    back = geojson_to_labels(gj, labels.shape, WSSS4LUAD, placement=placed)
    assert np.array_equal(back, labels)


def test_geojson_round_trip_on_real_masks(wsss4luad_dir):
    cm = ConfusionMatrix(WSSS4LUAD)
    for path in sorted((wsss4luad_dir / "2.validation" / "mask").glob("*.png"))[:6]:
        labels = read_index_png(path)
        cm.update(geojson_to_labels(labels_to_geojson(labels, WSSS4LUAD), labels.shape, WSSS4LUAD), labels)
    assert cm.miou() >= 0.99


def test_composition_on_hand_made_mask():
    labels = np.full((10, 20), 3, np.uint8)  # 200 px: background
    labels[:, :6] = 0        # 60 tumor
    labels[:, 6:10] = 1      # 40 stroma
    labels[:5, 10:12] = 2    # 10 normal
    labels[9, 19] = 255      # 1 ignored
    comp = composition(labels, WSSS4LUAD, mpp=0.5)
    assert comp["classes"]["tumor"]["pixels"] == 60
    assert comp["classes"]["normal"]["pixels"] == 10
    assert comp["tissue_pixels"] == 110 and comp["background_pixels"] == 89 and comp["ignored_pixels"] == 1
    assert comp["classes"]["tumor"]["area_mm2"] == pytest.approx(60 * 0.25e-6)
    assert comp["classes"]["stroma"]["tissue_fraction"] == pytest.approx(40 / 110)
    assert comp["tsr_stroma_fraction"] == pytest.approx(0.4) and comp["tsr_category"] == "stroma-low"
    no_mpp = composition(labels, WSSS4LUAD)
    assert no_mpp["classes"]["tumor"]["area_mm2"] is None and no_mpp["mpp"] is None
