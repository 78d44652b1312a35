"""The one placement object: output pixels <-> level-0 pixels, napari scale/translate, GeoJSON corners, µm."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.io.qupath import geojson_to_labels, labels_to_geojson
from napari_wsss_cram.core.placement import Placement


def test_region_of_a_level_maps_pixel_centres_and_corners():
    placed = Placement.of_region(10, 20, 4.0, level=2, mpp0=0.25)
    # napari: pixel centre i of level 2 sits at level-0 pixel (i + 0.5) * 4 - 0.5
    assert placed.scale == (4.0, 4.0) and placed.translate == ((10 + 0.5) * 4 - 0.5, (20 + 0.5) * 4 - 0.5)
    ys, xs = placed.to_level0([0, 3], [0, 1])
    np.testing.assert_allclose(ys, [(10.5) * 4 - 0.5, (13.5) * 4 - 0.5])
    np.testing.assert_allclose(xs, [(20.5) * 4 - 0.5, (21.5) * 4 - 0.5])
    # GeoJSON: corner 0 of the region is level-0 corner (40, 80), and back
    assert placed.corner_to_level0(0, 0) == (40.0, 80.0)
    np.testing.assert_allclose(placed.level0_to_corner(*placed.corner_to_level0(2.5, 7.0)), (2.5, 7.0))
    assert placed.mpp == pytest.approx(1.0) and placed.position_um() == pytest.approx((10.0, 20.0))
    assert Placement.from_napari(placed.scale, placed.translate) == Placement(4.0, (40.0, 80.0))
    assert Placement.from_metadata(placed.to_metadata()) == placed


def test_a_level_handed_over_as_an_array_is_measured_in_level0_pixels():
    """The dock segments pyramid level 1 as a plain array; the engine's placement (in that array's pixels) is
    rescaled: pixel centre u of the array sits at level-0 pixel (u + 0.5) * 2 - 0.5."""
    in_array = Placement.of_region(5, 7, 1.0, mpp0=0.5)
    placed = in_array.in_units_of(2.0)
    assert placed.translate == ((5 + 0.5) * 2 - 0.5, (7 + 0.5) * 2 - 0.5) and placed.scale == (2.0, 2.0)
    assert placed.mpp0 == pytest.approx(0.25) and placed.mpp == pytest.approx(0.5)


def test_layer_transform_composes_with_the_source_layer():
    scale, translate = Placement.of_region(3, 4, 2.0).layer_transform((0.5, 0.5), (100.0, 200.0))
    np.testing.assert_allclose(scale, (1.0, 1.0))
    np.testing.assert_allclose(translate, (100 + 0.5 * 6.5, 200 + 0.5 * 8.5))
    # a source layer with a leading axis (a stack): its last two axes count
    scale3, translate3 = Placement.of_region(3, 4, 2.0).layer_transform((7.0, 0.5, 0.5), (9.0, 100.0, 200.0))
    np.testing.assert_allclose(scale3, scale)
    np.testing.assert_allclose(translate3, translate)


def test_both_geojson_paths_use_the_placement():
    rng = np.random.default_rng(0)
    labels = np.kron(rng.integers(0, 4, (6, 8)), np.ones((8, 8), int)).astype(np.uint8)
    placed = Placement.of_region(30, 12, 2.0)
    gj = labels_to_geojson(labels, WSSS4LUAD, tolerance=0, placement=placed)
    xs = [pt[0] for f in gj["features"] for poly in f["geometry"]["coordinates"] for r in poly for pt in r]
    ys = [pt[1] for f in gj["features"] for poly in f["geometry"]["coordinates"] for r in poly for pt in r]
    assert min(xs) >= 24 and max(xs) <= 24 + 2 * 64 and min(ys) >= 60 and max(ys) <= 60 + 2 * 48
    np.testing.assert_array_equal(geojson_to_labels(gj, labels.shape, WSSS4LUAD, placement=placed), labels)
    # the same features read onto the whole level-1 grid land at the region's offset
    whole = geojson_to_labels(gj, (100, 100), WSSS4LUAD, placement=Placement(2.0))
    np.testing.assert_array_equal(whole[30:78, 12:76], labels)
