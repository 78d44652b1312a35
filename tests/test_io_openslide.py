"""The optional OpenSlide backend behind ``ImageSource``: same pixels, levels and µm/px as tifffile on the
slides both read, clear messages where OpenSlide is missing or cannot read a file."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import tifffile

from napari_wsss_cram._reader import image_layer_data
from napari_wsss_cram.core.errors import ImageReadError
from napari_wsss_cram.core.io.images import OPENSLIDE_INSTALL, ImageSource


@pytest.fixture()
def he_rgb() -> np.ndarray:
    """A 512 x 768 image with smooth structure (JPEG of pure noise would hide decoder differences less)."""
    yy, xx = np.mgrid[0:512, 0:768].astype(np.float32)
    rng = np.random.default_rng(5)
    base = np.stack([128 + 90 * np.sin(xx / 37.0 + c) * np.cos(yy / 23.0 - c) for c in range(3)], axis=2)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def write_aperio_svs(path, rgb: np.ndarray, compression: str = "jpeg") -> None:
    """An SVS as Aperio writes it (and tiatoolbox's tests do): tiled full level whose ImageDescription starts
    "Aperio Image Library" and carries ``MPP``/``AppMag``, a stripped thumbnail, then a reduced tiled level."""
    h, w = rgb.shape[:2]
    head = "Aperio Image Library v12.0.15\r\n"
    desc = f"{head}{w}x{h} [0,0 {w}x{h}] (128x128) JPEG/RGB Q=70|AppMag = 40|MPP = 0.2520"
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(128, 128), photometric="rgb", compression=compression, description=desc,
                  metadata=None)
        tif.write(rgb[::8, ::8], photometric="rgb", compression=compression, metadata=None,
                  description=f"{head}{w // 8}x{h // 8} -> thumbnail")
        tif.write(rgb[::4, ::4], tile=(128, 128), photometric="rgb", compression=compression, metadata=None,
                  description=f"{head}{w}x{h} -> {w // 4}x{h // 4} JPEG/RGB Q=70")


def write_generic_pyramid(path, rgb: np.ndarray) -> None:
    """A generic tiled TIFF pyramid (levels as top-level pages), JPEG, pixel size in the resolution tags."""
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(128, 128), photometric="rgb", compression="jpeg",
                  resolution=(40000, 40000), resolutionunit="CENTIMETER")
        tif.write(rgb[::2, ::2], tile=(128, 128), photometric="rgb", compression="jpeg", subfiletype=1)
        tif.write(rgb[::4, ::4], tile=(64, 64), photometric="rgb", compression="jpeg", subfiletype=1)


@pytest.mark.parametrize("kind", ["generic-tiff", "aperio-svs", "aperio-svs-zlib"])
def test_openslide_and_tifffile_give_the_same_slide(tmp_path, he_rgb, kind):
    openslide = pytest.importorskip("openslide")
    if kind == "generic-tiff":
        path, mpp = tmp_path / "slide.tif", 0.25
        write_generic_pyramid(path, he_rgb)
    else:
        path, mpp = tmp_path / "slide.svs", 0.252
        write_aperio_svs(path, he_rgb, "zlib" if kind.endswith("zlib") else "jpeg")
    assert openslide.OpenSlide.detect_format(str(path)) == kind.removesuffix("-svs-zlib").removesuffix("-svs")
    rng = np.random.default_rng(11)
    with ImageSource.open(path, reader="tifffile") as tf, ImageSource.open(path, reader="openslide") as osl:
        assert (tf.format, osl.format) == ("tiff", "openslide")
        assert osl.level_shapes == tf.level_shapes and osl.n_levels >= 2
        assert osl.level_downsamples == tf.level_downsamples
        assert osl.mpp == pytest.approx(mpp) and tf.mpp == pytest.approx(mpp)
        for level in range(tf.n_levels):
            assert np.array_equal(osl.read_level(level), tf.read_level(level)), f"level {level}"
            h, w = tf.level_shapes[level]
            for _ in range(5):
                y, x = int(rng.integers(-20, h - 1)), int(rng.integers(-20, w - 1))
                rh, rw = int(rng.integers(1, 300)), int(rng.integers(1, 300))
                assert np.array_equal(osl.read_region(y, x, rh, rw, level), tf.read_region(y, x, rh, rw, level))
        lazy = image_layer_data(osl)
        assert isinstance(lazy, list) and np.array_equal(np.asarray(lazy[1]), tf.read_level(1))
    # "auto" keeps SVS and TIFF on tifffile
    with ImageSource.open(path) as auto:
        assert auto.format == "tiff"


def test_openslide_unscanned_tiles_read_as_white(tmp_path, he_rgb):
    pytest.importorskip("openslide")
    path = tmp_path / "sparse.svs"
    write_aperio_svs(path, he_rgb, "zlib")
    with tifffile.TiffFile(path, mode="r+b") as tif:  # tile (1, 2) of level 0 "not stored", as scanners do
        page = tif.pages[0]
        counts, offsets = list(page.databytecounts), list(page.dataoffsets)
        counts[1 * 6 + 2], offsets[1 * 6 + 2] = 0, 0
        page.tags["TileByteCounts"].overwrite(counts)
        page.tags["TileOffsets"].overwrite(offsets)
    with ImageSource.open(path, reader="openslide") as osl, ImageSource.open(path, reader="tifffile") as tf:
        a, b = osl.read_level(0), tf.read_level(0)
    assert (a[128:256, 256:384] == 255).all() and np.array_equal(a, b)


def test_vendor_formats_need_openslide_and_say_how_to_install_it(tmp_path, monkeypatch):
    path = tmp_path / "slide.mrxs"
    path.write_text("[GENERAL]\nSLIDE_VERSION = 01.02\n", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "openslide", None)  # as without the extra: the import fails
    with pytest.raises(ImageReadError) as err:
        ImageSource.open(path)
    assert "slide.mrxs" in str(err.value) and OPENSLIDE_INSTALL in str(err.value)
    assert OPENSLIDE_INSTALL == 'pip install "napari-wsss-cram[openslide]"'
    # choosing OpenSlide for a TIFF without it installed says the same; tifffile still reads it
    tif_path = tmp_path / "plain.tif"
    tifffile.imwrite(tif_path, np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(ImageReadError, match=r"plain.tif.*napari-wsss-cram\[openslide\]"):
        ImageSource.open(tif_path, reader="openslide")
    with ImageSource.open(tif_path, reader="auto") as src:
        assert src.format == "tiff"


def test_reader_choice_errors_name_the_file(tmp_path):
    path = tmp_path / "slide.mrxs"
    path.write_text("[GENERAL]\n", encoding="utf-8")
    with pytest.raises(ImageReadError, match=r"slide.mrxs.*only OpenSlide reads"):
        ImageSource.open(path, reader="tifffile")
    with pytest.raises(ImageReadError, match="Unknown reader 'bioformats'"):
        ImageSource.open(path, reader="bioformats")


def test_openslide_refuses_a_damaged_vendor_file_with_its_name(tmp_path):
    pytest.importorskip("openslide")
    path = tmp_path / "broken.ndpi"
    path.write_bytes(b"II*\x00" + b"\x00" * 64)
    with pytest.raises(ImageReadError, match=r"broken.ndpi"):
        ImageSource.open(path)


def test_a_folder_of_dcm_files_is_opened_as_one_dicom_slide(tmp_path):
    from napari_wsss_cram.commands.predict import collect_inputs

    folder = tmp_path / "case1"
    folder.mkdir()
    for name in ("level0.dcm", "level1.dcm"):
        (folder / name).write_bytes(b"\x00" * 128 + b"DICM")
    (tmp_path / "patch.png").write_bytes(b"")
    assert collect_inputs([str(folder)]) == [folder]
    with pytest.raises(ImageReadError, match=r"level0.dcm"):  # the folder opens through its first .dcm file
        ImageSource.open(folder, reader="tifffile")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from napari_wsss_cram.core.checkpoint import save_checkpoint
    from napari_wsss_cram.core.classes import WSSS4LUAD
    from napari_wsss_cram.core.model.config import ModelConfig
    from napari_wsss_cram.core.model.cram import CRAMNet

    torch.manual_seed(0)
    model = CRAMNet(WSSS4LUAD, ModelConfig(backbone="resnet18", mpp=1.0), weights=None)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", model)


def test_predict_reader_flag_gives_the_same_labels_from_both_backends(tmp_path, he_rgb, checkpoint):
    pytest.importorskip("openslide")
    from PIL import Image

    from napari_wsss_cram.cli import main

    slide = tmp_path / "in" / "case.svs"
    slide.parent.mkdir()
    write_aperio_svs(slide, he_rgb[:256, :384])
    masks = {}
    for reader in ("tifffile", "openslide"):
        out = tmp_path / reader
        assert main(["predict", str(checkpoint), str(slide.parent), "--out", str(out), "--reader", reader,
                     "--scale", "0.5", "--format", "png", "--device", "cpu", "--tile", "128", "--overlap", "16"]) == 0
        with Image.open(out / "case.png") as im:
            masks[reader] = np.asarray(im)
    assert masks["tifffile"].shape == (256, 384) and len(np.unique(masks["tifffile"])) > 1
    assert np.array_equal(masks["tifffile"], masks["openslide"])


def test_predict_on_a_vendor_slide_without_openslide_names_the_extra(tmp_path, checkpoint, capsys, monkeypatch):
    from napari_wsss_cram.cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "case.ndpi").write_bytes(b"II*\x00" + b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "openslide", None)
    assert main(["predict", str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "case.ndpi" in err and OPENSLIDE_INSTALL in err and "Traceback" not in err


def test_napari_reader_takes_vendor_slides_and_passes_the_message_on(tmp_path, monkeypatch):
    from napari_wsss_cram._reader import napari_get_reader

    path = tmp_path / "case.scn"
    path.write_bytes(b"II*\x00" + b"\x00" * 64)
    reader = napari_get_reader(str(path))
    assert reader is not None
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(ImageReadError, match=r"case.scn.*napari-wsss-cram\[openslide\]"):
        reader(str(path))
