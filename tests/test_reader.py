"""napari reader and sample-data contributions, loaded through the real viewer (offscreen, under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_wsss_cram import _sample_data
from napari_wsss_cram._reader import napari_get_reader
from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.io.ometiff import write_pyramidal_ome_tiff
from napari_wsss_cram.core.io.png import write_index_png

PLUGIN = "napari-wsss-cram"


def test_get_reader_accepts_only_image_names(tmp_path):
    assert napari_get_reader(str(tmp_path / "a.txt")) is None
    assert napari_get_reader(str(tmp_path / "a.zarr")) is None
    assert callable(napari_get_reader(str(tmp_path / "a.png")))
    assert callable(napari_get_reader([str(tmp_path / "a.svs"), str(tmp_path / "b.ome.tif")]))


@pytest.mark.gui
def test_png_opens_as_rgb_image(make_napari_viewer, tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (120, 90, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "patch.png")
    from napari_wsss_cram._reader import read_layer

    data, kwargs, kind = read_layer(tmp_path / "patch.png")  # the plugin's reader (the sample patch uses it)
    layer = make_napari_viewer()._add_layer_from_data(data, kwargs, kind)[0]
    assert layer._type_string == "image" and layer.rgb and not layer.multiscale
    assert layer.data.shape == (120, 90, 3)
    assert layer.metadata["path"].endswith("patch.png") and layer.metadata["mpp"] is None


@pytest.mark.gui
def test_a_plain_png_opens_without_choose_reader(make_napari_viewer, tmp_path):
    """napari asks "Choose reader" when two plugins claim a file: plain images are left to napari's own reader,
    so dropping a PNG opens it at once; the plugin keeps the label exports and masks among PNGs."""
    from napari.plugins import _npe2

    from napari_wsss_cram.core.io.png import write_index_png

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 80, 3), np.uint8)).save(tmp_path / "patch.png")
    assert PLUGIN not in _npe2.get_readers(str(tmp_path / "patch.png"))
    assert PLUGIN not in _npe2.get_readers(str(tmp_path / "photo.JPG"))
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(tmp_path / "patch.png"))  # no plugin named: raised MultipleReaderError before
    assert layer.rgb and layer.data.shape == (96, 80, 3)
    write_index_png(tmp_path / "patch_labels.png", np.zeros((20, 30), np.uint8), WSSS4LUAD)
    assert PLUGIN in _npe2.get_readers(str(tmp_path / "patch_labels.png"))
    assert PLUGIN in _npe2.get_readers(str(tmp_path / "slide.svs"))


@pytest.mark.gui
def test_pyramid_opens_lazy_multiscale_with_pixel_size(make_napari_viewer, tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (1100, 1300, 3), np.uint8)
    path = write_pyramidal_ome_tiff(tmp_path / "slide.ome.tif", rgb, mpp=0.5, tile=256)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin=PLUGIN)
    assert layer._type_string == "image" and layer.multiscale and layer.rgb
    assert [tuple(d.shape) for d in layer.data] == [(1100, 1300, 3), (550, 650, 3), (275, 325, 3),
                                                   (138, 163, 3)]
    assert not isinstance(layer.data[0], np.ndarray)  # lazy: nothing was read whole
    assert tuple(layer.scale) == pytest.approx((0.5, 0.5))
    assert layer.metadata["mpp"] == pytest.approx(0.5) and len(layer.metadata["level_shapes"]) == 4
    assert np.array_equal(np.asarray(layer.data[0][100:110, 200:210]), rgb[100:110, 200:210])


@pytest.mark.gui
def test_masks_open_as_labels(make_napari_viewer, tmp_path):
    labels = np.zeros((64, 80), np.uint8)
    labels[10:30, 20:50] = 1
    labels[40:, :] = 3
    write_index_png(tmp_path / "mask.png", labels, WSSS4LUAD)
    write_pyramidal_ome_tiff(tmp_path / "big_mask.ome.tif", np.tile(labels, (10, 10)), mpp=0.25)
    viewer = make_napari_viewer()
    (png_layer,) = viewer.open(str(tmp_path / "mask.png"), plugin=PLUGIN)
    assert png_layer._type_string == "labels" and np.array_equal(png_layer.data, labels)
    (tif_layer,) = viewer.open(str(tmp_path / "big_mask.ome.tif"), plugin=PLUGIN)
    assert tif_layer._type_string == "labels" and tif_layer.multiscale
    assert tuple(tif_layer.data[0].shape) == (640, 800)
    assert np.array_equal(np.asarray(tif_layer.data[0][:64, :80]), labels)


@pytest.mark.gui
def test_bad_file_gives_a_clear_error(make_napari_viewer, tmp_path):
    bad = tmp_path / "broken.tif"
    tifffile.imwrite(tmp_path / "ok.tif", np.zeros((300, 300, 3), np.uint8), photometric="rgb",
                     tile=(64, 64), compression="zlib")
    bad.write_bytes((tmp_path / "ok.tif").read_bytes()[:200])
    viewer = make_napari_viewer()
    with pytest.raises(Exception, match="broken.tif") as info:
        viewer.open(str(bad), plugin=PLUGIN)
    assert "Traceback" not in str(info.value)
    assert len(viewer.layers) == 0


@pytest.mark.gui
def test_sample_patch(make_napari_viewer, monkeypatch, tmp_path):
    monkeypatch.setenv("WSSS_CRAM_CACHE", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    layers = viewer.open_sample(PLUGIN, "patch")
    image, labels = layers
    assert image._type_string == "image" and image.rgb
    assert labels._type_string == "labels"
    assert image.data.shape[:2] == labels.data.shape
    assert set(np.unique(labels.data)) <= {0, 1, 2, 3}


@pytest.mark.gui
@pytest.mark.slow
def test_sample_slide_generated_on_first_use(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    """The first open generates the slide in a background thread (issue 20 item 8: 55 s of a frozen window with
    repaints every few seconds): a placeholder at once, a progress bar with the time left, the slide when ready."""
    import threading

    from napari_wsss_cram.core import sample

    monkeypatch.setenv("WSSS_CRAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_sample_data, "SLIDE_SIZE", 1024)  # the real one is 4096: same code, 16x faster
    viewer = make_napari_viewer()
    import warnings

    import napari.utils
    from napari.utils.notifications import notification_manager

    steps, bars, threads = [], [], []
    real_progress, real_make_slide = napari.utils.progress, sample.make_slide

    class Progress(real_progress):
        def refresh(self, *args, **kwargs):
            steps.append((self.n, self.total, threading.current_thread() is threading.main_thread()))
            return super().refresh(*args, **kwargs)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    def make_slide(*args, **kwargs):
        threads.append(threading.current_thread() is threading.main_thread())
        return real_make_slide(*args, **kwargs)

    monkeypatch.setattr(napari.utils, "progress", Progress)
    monkeypatch.setattr(sample, "make_slide", make_slide)
    shown = []
    notification_manager.notification_ready.connect(lambda n: shown.append(str(n.message)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [placeholder] = viewer.open_sample(PLUGIN, "slide")  # returns at once
        assert placeholder.name == _sample_data.PLACEHOLDER_NAME
        qtbot.waitUntil(lambda: "synthetic H&E slide" in viewer.layers, timeout=120_000)
    assert threads == [False]  # generated off napari's GUI thread
    assert _sample_data.PLACEHOLDER_NAME not in viewer.layers
    assert not [w for w in caught if "grayscale" in str(w.message)]  # its truth mask is not a grayscale image
    assert (tmp_path / "cache" / "slide-1024" / "sample_slide.ome.tif").is_file()
    assert any("generating the synthetic slide" in text and str(tmp_path / "cache") in text for text in shown)
    assert len(bars) == 1 and len(steps) > 4 and steps[-1][0] == steps[-1][1]  # image strips, then mask strips
    assert [n for n, _, _ in steps] == sorted(n for n, _, _ in steps) and all(gui for _, _, gui in steps)
    assert "s left" in bars[0].desc or steps[-1][0] == steps[-1][1]
    image, truth = viewer.layers["synthetic H&E slide"], viewer.layers["synthetic H&E slide truth"]
    assert image._type_string == "image" and image.multiscale and image.rgb
    assert [tuple(d.shape[:2]) for d in image.data] == [(1024, 1024), (512, 512), (256, 256)]
    assert tuple(image.scale) == pytest.approx((0.25, 0.25))
    assert truth._type_string == "labels" and truth.multiscale
    steps.clear()
    viewer.open_sample(PLUGIN, "slide")  # cached: no generation, no progress bar
    assert not steps and len(bars) == 1


@pytest.mark.gui
def test_exported_labels_ome_tiff_reopens_as_labels_without_warning(make_napari_viewer, tmp_path):
    import warnings

    from napari_wsss_cram._writer import export_labels

    labels = np.full((96, 128), WSSS4LUAD.background_index, np.uint8)
    labels[10:40, 20:70] = 0
    labels[50:90, 30:100] = 1
    path = export_labels(tmp_path / "patch_labels.ome.tif", labels, WSSS4LUAD, mpp=0.5)  # no "mask" in the name
    viewer = make_napari_viewer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (layer,) = viewer.open(path, plugin=PLUGIN)
    assert layer._type_string == "labels"
    data = np.asarray(layer.data[0] if layer.multiscale else layer.data)
    np.testing.assert_array_equal(data, labels)
    assert not [w for w in caught if "grayscale" in str(w.message)]
    assert tuple(layer.scale) == pytest.approx((0.5, 0.5))
