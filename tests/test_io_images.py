"""ImageSource: the one reader (PNG/JPEG/TIFF/OME-TIFF/SVS-like), conversions, pixel size and bad inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_wsss_cram._reader import image_layer_data
from napari_wsss_cram.core.errors import ImageReadError
from napari_wsss_cram.core.io.images import GrayscaleImageWarning, ImageSource, read_rgb


@pytest.fixture()
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (300, 410, 3), dtype=np.uint8)


def test_png_and_jpeg_read(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert np.array_equal(read_rgb(tmp_path / "a.png"), rgb)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    with ImageSource.open(tmp_path / "a.jpg") as src:
        assert src.shape == (300, 410) and src.n_levels == 1 and src.mpp is None
        assert src.read_level(0).dtype == np.uint8


def test_rgba_opaque_pixels_keep_their_colour_and_transparent_ones_are_background(tmp_path, rgb):
    # issue 21: alpha is no longer dropped (a transparent area read as its hidden colour, often black tissue)
    opacity = np.full(rgb.shape[:2], 255, np.uint8)
    opacity[:, : rgb.shape[1] // 2] = 0
    Image.fromarray(np.dstack([rgb, opacity]), "RGBA").save(tmp_path / "a.png")
    out = read_rgb(tmp_path / "a.png")
    half = rgb.shape[1] // 2
    assert np.array_equal(out[:, half:], rgb[:, half:]) and (out[:, :half] == 255).all()


def test_grayscale_converted_with_warning(tmp_path, rgb):
    gray = rgb[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    with pytest.warns(GrayscaleImageWarning, match="g.png"):
        out = read_rgb(tmp_path / "g.png")
    assert out.shape == (300, 410, 3) and np.array_equal(out[..., 2], gray)


def test_16bit_scaled(tmp_path):
    data = np.array([[0, 257, 65535, 32896]], np.uint16).repeat(4, 0)
    tifffile.imwrite(tmp_path / "a16.tif", np.dstack([data] * 3), photometric="rgb")
    out = read_rgb(tmp_path / "a16.tif")
    assert out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 1, 255, 128]


def test_pyramidal_ome_tiff_levels_regions_and_mpp(tmp_path, rgb):
    path = tmp_path / "s.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(64, 64), subifds=1, photometric="rgb",
                  metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        tif.write(rgb[::2, ::2], tile=(64, 64), subfiletype=1, photometric="rgb")
    with ImageSource.open(path) as src:
        assert src.n_levels == 2 and src.level_shapes == [(300, 410), (150, 205)]
        assert src.level_downsamples == [1.0, 2.0]
        assert src.mpp == pytest.approx(0.5) and src.level_mpp(1) == pytest.approx(1.0)
        assert np.array_equal(src.read_region(70, 130, 100, 90), rgb[70:170, 130:220])
        assert np.array_equal(src.read_region(10, 20, 30, 40, level=1), rgb[::2, ::2][10:40, 20:60])
        # outside the image is white padding
        edge = src.read_region(-5, 400, 20, 20)
        assert (edge[:5] == 255).all() and np.array_equal(edge[5:, :10], rgb[:15, 400:410])
        data = image_layer_data(src)
        assert isinstance(data, list) and [d.shape for d in data] == [(300, 410, 3), (150, 205, 3)]
        assert np.array_equal(np.asarray(data[1][5:9, 7:11]), rgb[::2, ::2][5:9, 7:11])


def test_svs_like_tiled_tiff_with_aperio_mpp(tmp_path, rgb):
    path = tmp_path / "slide.svs"
    desc = "Aperio Image Library v12.0.15\n410x300 [0,0 410x300] (64x64) JPEG/RGB Q=70|AppMag = 40|MPP = 0.2520"
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(64, 64), photometric="rgb", description=desc, compression="jpeg")
        tif.write(rgb[::4, ::4], tile=(64, 64), photometric="rgb", compression="jpeg", subfiletype=1)
    with ImageSource.open(path) as src:
        assert src.mpp == pytest.approx(0.252)
        assert src.shape == (300, 410)
        assert src.n_levels == 2 and src.level_shapes[1] == (75, 103)
        # JPEG is lossy: compare with tifffile's own whole-page decode
        expected = tifffile.imread(path)
        assert np.array_equal(src.read_region(37, 90, 150, 200), expected[37:187, 90:290])


def test_planar_strips_and_resolution_tags(tmp_path, rgb):
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(rgb, 2, 0), photometric="rgb", planarconfig="separate",
                     rowsperstrip=17, resolution=(40000, 40000), resolutionunit="CENTIMETER")
    with ImageSource.open(path) as src:
        assert src.mpp == pytest.approx(0.25)
        assert np.array_equal(src.read_region(33, 50, 60, 70), rgb[33:93, 50:120])


def test_72_dpi_is_not_a_pixel_size(tmp_path, rgb):
    tifffile.imwrite(tmp_path / "d.tif", rgb, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with ImageSource.open(tmp_path / "d.tif") as src:
        assert src.mpp is None


@pytest.mark.parametrize("case", ["missing", "empty", "text", "truncated_png", "truncated_tiff", "folder"])
def test_bad_inputs_name_the_file(tmp_path, rgb, case):
    path = tmp_path / f"bad_{case}.tif"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path = tmp_path / "bad_text.png"
        path.write_text("this is not an image")
    elif case == "truncated_png":
        path = tmp_path / "bad_truncated.png"
        Image.fromarray(rgb).save(path)
        path.write_bytes(path.read_bytes()[: 2000])
    elif case == "truncated_tiff":
        tifffile.imwrite(tmp_path / "full.tif", rgb, photometric="rgb", tile=(64, 64), compression="zlib")
        path.write_bytes((tmp_path / "full.tif").read_bytes()[: 30000])
    elif case == "folder":
        path = tmp_path / "afolder.tif"
        path.mkdir()
    with pytest.raises(ImageReadError, match=path.name):
        with ImageSource.open(path) as src:
            src.read_level(0)


def test_one_pixel_image_reads(tmp_path):
    Image.fromarray(np.array([[[10, 20, 30]]], np.uint8)).save(tmp_path / "one.png")
    assert read_rgb(tmp_path / "one.png").tolist() == [[[10, 20, 30]]]


def test_real_wsss4luad_patch(wsss4luad_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = read_rgb(wsss4luad_dir / "2.validation" / "img" / "00.png")
    with Image.open(wsss4luad_dir / "2.validation" / "img" / "00.png") as ref:
        expected = np.asarray(ref.convert("RGB"))  # an RGB PNG: the reader must give its pixels unchanged
    assert img.dtype == np.uint8 and np.array_equal(img, expected)


# ----------------------------------------------------------------- tifffile's zarr store (aszarr + zarr 3)
def _write_tiff_case(path, case: str, rgb: np.ndarray) -> None:
    """A TIFF of the given layout, written by tifffile: the reader must give exactly tifffile's own pixels."""
    if case == "tiled-pyramid":  # generic TIFF, reduced levels in SubIFDs, zlib + predictor
        with tifffile.TiffWriter(path) as tif:
            tif.write(rgb, tile=(64, 64), subifds=2, photometric="rgb", compression="zlib", predictor=True)
            tif.write(rgb[::2, ::2], tile=(64, 64), subfiletype=1, photometric="rgb", compression="zlib")
            tif.write(rgb[::4, ::4], tile=(32, 32), subfiletype=1, photometric="rgb", compression="zlib")
    elif case == "stripped":  # strips whose height does not divide the image, LZW
        tifffile.imwrite(path, rgb, photometric="rgb", rowsperstrip=23, compression="lzw")
    elif case == "ome-jpeg":  # OME-TIFF pyramid, JPEG tiles (lossy: compared with tifffile's own decode)
        with tifffile.TiffWriter(path) as tif:
            tif.write(rgb, tile=(64, 64), subifds=1, photometric="rgb", compression="jpeg",
                      metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
            tif.write(rgb[::2, ::2], tile=(64, 64), subfiletype=1, photometric="rgb", compression="jpeg")
    else:
        raise AssertionError(case)


@pytest.mark.parametrize("case", ["tiled-pyramid", "stripped", "ome-jpeg"])
def test_tiff_levels_and_regions_match_tifffile_pages(tmp_path, rgb, case):
    path = tmp_path / f"{case}.ome.tif" if case.startswith("ome") else tmp_path / f"{case}.tif"
    _write_tiff_case(path, case, rgb)
    with tifffile.TiffFile(path) as tif:  # tifffile's whole-page decode, not its zarr store
        expected = [lv.pages[0].asarray() for lv in tif.series[0].levels]
    rng = np.random.default_rng(3)
    with ImageSource.open(path) as src:
        assert src.level_shapes == [e.shape[:2] for e in expected]
        assert src.mpp == (pytest.approx(0.25) if case == "ome-jpeg" else None)
        for level, ref in enumerate(expected):
            assert np.array_equal(src.read_level(level), ref), f"level {level}"
            h, w = ref.shape[:2]
            for _ in range(6):  # regions that start and end inside tiles/strips, and one past the edge
                y, x = int(rng.integers(0, h - 1)), int(rng.integers(0, w - 1))
                rh, rw = int(rng.integers(1, h - y + 1)), int(rng.integers(1, w - x + 1))
                assert np.array_equal(src.read_region(y, x, rh, rw, level), ref[y:y + rh, x:x + rw])
            edge = src.read_region(h - 5, w - 7, 20, 20, level)
            assert np.array_equal(edge[:5, :7], ref[h - 5:, w - 7:]) and (edge[5:] == 255).all()
        data = image_layer_data(src)
        levels = data if isinstance(data, list) else [data]
        for level, ref in enumerate(expected):
            assert np.array_equal(np.asarray(levels[level]), ref)


def test_sparse_tiles_read_as_white(tmp_path, rgb):
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, rgb, tile=(64, 64), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as tif:  # tile (1, 2) becomes "not stored", as scanners write
        page = tif.pages[0]
        counts, offsets = list(page.databytecounts), list(page.dataoffsets)
        counts[1 * 7 + 2], offsets[1 * 7 + 2] = 0, 0
        page.tags["TileByteCounts"].overwrite(counts)
        page.tags["TileOffsets"].overwrite(offsets)
    with ImageSource.open(path) as src:
        out = src.read_level(0)
    assert (out[64:128, 128:192] == 255).all()
    keep = np.ones(rgb.shape[:2], bool)
    keep[64:128, 128:192] = False
    assert np.array_equal(out[keep], rgb[keep])


def test_damaged_tile_table_is_refused_not_read_as_white(tmp_path, rgb):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, rgb, tile=(64, 64), photometric="rgb", compression="zlib")
    path.write_bytes(path.read_bytes()[:-4000])  # the last tiles' bytes are gone
    with pytest.raises(ImageReadError, match=r"cut.tif.*truncated or corrupt.*past the end of the file"):
        ImageSource.open(path)
