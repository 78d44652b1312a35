"""Issue 21, items 2 and 4: every number checked in one place (``core.validate``), and inputs read as the user sees
them. Each test is named after a failure kind of the issue; a property test draws every field of the typed
settings."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from napari_wsss_cram.cli import main
from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.crf import CRFParams, dense_crf
from napari_wsss_cram.core.errors import ImageReadError, WsssCramError
from napari_wsss_cram.core.inference import PredictSettings
from napari_wsss_cram.core.io.images import ImageSource, read_rgb
from napari_wsss_cram.core.io.png import read_index_png
from napari_wsss_cram.core.model.config import ModelConfig
from napari_wsss_cram.core.train_config import TrainConfig
from napari_wsss_cram.core.validate import MODEL_RANGES, RANGES, TRAIN_RANGES

EXAMPLES = int(os.environ.get("WSSS_FUZZ_EXAMPLES", "25"))
# no deadline: a property test checks behaviour, not speed (a loaded CI machine once timed one example out)
PROPERTY = settings(max_examples=EXAMPLES * 2, deadline=None, database=None,
                    derandomize=os.environ.get("WSSS_FUZZ_RANDOM") is None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ANY_NUMBER = st.one_of(st.integers(-10 ** 9, 10 ** 9), st.floats(allow_nan=True, allow_infinity=True),
                       st.floats(-5, 300), st.integers(-3, 300), st.booleans(), st.none(), st.text(max_size=3))


def _numeric_fields(cls) -> list[str]:
    default = cls()
    return [f.name for f in dataclasses.fields(cls)
            if isinstance(getattr(default, f.name), (int, float)) and not isinstance(getattr(default, f.name), bool)
            or f.name in ("mpp", "tissue_threshold", "steps", "minutes", "threads", "val_scale", "val_every_steps")]


# ------------------------------------------------------------------------------------- property: every field

@PROPERTY
@given(data=st.data())
def test_every_crf_field_gives_a_running_crf_or_a_clear_error(data):
    values = {name: data.draw(ANY_NUMBER, label=name)
              for name in data.draw(st.sets(st.sampled_from(_numeric_fields(CRFParams)), min_size=1))}
    try:
        params = CRFParams(**values, backend=data.draw(st.sampled_from(["torch", "pydensecrf"])))
    except WsssCramError as err:
        assert "must be" in str(err)
        return
    for name in _numeric_fields(CRFParams):
        low, high, _ = RANGES[name]
        assert low <= getattr(params, name) <= high
    rng = np.random.default_rng(0)
    image = (rng.random((24, 24, 3)) * 255).astype(np.uint8)
    probs = rng.dirichlet([1, 1, 1], (24, 24)).transpose(2, 0, 1).astype(np.float32)
    out = dense_crf(image, probs, params)  # a crash (SIGSEGV) would end the test run here
    assert np.isfinite(out).all() and np.allclose(out.sum(0), 1, atol=1e-3)


@pytest.mark.parametrize("cls", [PredictSettings, TrainConfig, ModelConfig])
def test_every_numeric_setting_gives_a_config_in_range_or_a_clear_error(cls):
    fields = _numeric_fields(cls)
    table = {PredictSettings: RANGES, TrainConfig: TRAIN_RANGES, ModelConfig: MODEL_RANGES}[cls]

    @PROPERTY
    @given(data=st.data())
    def check(data) -> None:
        names = data.draw(st.sets(st.sampled_from(fields), min_size=1, max_size=3))
        values = {name: data.draw(ANY_NUMBER, label=name) for name in names}
        try:
            built = cls(**values)
        except (WsssCramError, ValueError) as err:  # ModelConfig speaks ValueError (a checkpoint's config)
            assert str(err)
            return
        for name in fields:
            value = getattr(built, name)
            assert value is None or isinstance(value, str) or math.isfinite(float(value)), (name, value)
            if name in table and value is not None:
                assert table[name][0] <= value <= table[name][1], (name, value)

    check()


# ----------------------------------------------------------------------------------- named failure kinds: numbers

def _patch(path: Path, size: int = 48) -> Path:
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.array([150, 90, 160]) + rng.normal(0, 10, (size, size, 3)), 0, 255)
                    .astype(np.uint8)).save(path)
    return path


def test_a_negative_tissue_threshold_is_refused_not_an_all_background_map(tmp_path, capsys):
    for value in ("-5", "300"):
        assert main(["predict", str(tmp_path / "m.pt"), str(_patch(tmp_path / "p.png")), "--out",
                     str(tmp_path / "out"), "--tissue-threshold", value, "--scale", "1"]) in (2,)
        # refused by the settings before the checkpoint is read, or by the checkpoint: never a map
        assert not (tmp_path / "out" / "p.png").exists()
    with pytest.raises(WsssCramError, match="--tissue-threshold must be in 128..255"):
        PredictSettings(tissue_threshold=-5)


def test_a_negative_min_frac_is_refused(tmp_path, capsys):
    from test_data import make_pixel_set

    data = make_pixel_set(tmp_path / "data", n=1, size=64)
    for flag, value in (("--min-frac", "-0.1"), ("--min-frac", "nan"), ("--min-tissue", "2"), ("--overlap", "-1")):
        assert main(["patchify", str(data), "--out", str(tmp_path / "out"), flag, value]) == 2
        err = capsys.readouterr().err
        assert flag in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scale", ["-1", "nan", "0", "1e9"])
def test_pseudo_labels_negative_or_nan_scale_is_refused(tmp_path, capsys, scale):
    _patch(tmp_path / "patches" / "a-[1, 0, 0].png")
    assert main(["pseudo-labels", str(tmp_path / "missing.pt"), str(tmp_path / "patches"), "--out",
                 str(tmp_path / "pl"), "--scale", scale]) == 2
    assert "--scale must be" in capsys.readouterr().err


def test_a_file_claiming_0_0001_um_per_px_is_ignored_with_a_warning_naming_it(tmp_path):
    path = tmp_path / "tiny_pixels.ome.tif"
    tifffile.imwrite(path, np.full((32, 32, 3), 120, np.uint8), photometric="rgb", ome=True,
                     metadata={"PhysicalSizeX": 0.0001, "PhysicalSizeY": 0.0001})
    with pytest.warns(UserWarning, match=r"tiny_pixels.ome.tif states 0.0001 µm per pixel"):
        with ImageSource.open(path) as source:
            assert source.mpp is None


def test_an_mpp_implying_80x_upsampling_is_refused(tmp_path):
    from napari_wsss_cram.core.inference import predict_source
    from napari_wsss_cram.core.progress import drive

    path = tmp_path / "coarse.ome.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 120, np.uint8), photometric="rgb", ome=True,
                     metadata={"PhysicalSizeX": 4.0, "PhysicalSizeY": 4.0})
    with ImageSource.open(path) as source, pytest.raises(WsssCramError, match=r"would resample it 80x"):
        drive(predict_source(torch.nn.Identity(), None, source, PredictSettings(mpp=0.05)))


@pytest.mark.parametrize("device", ["meta", "cuda:99", "xla"])
def test_an_unusable_device_is_a_message(device):
    from napari_wsss_cram.core.device import resolve_device

    with pytest.raises(WsssCramError, match=f"{device.split(':')[0]}"):
        resolve_device(device)


# ------------------------------------------------------------------------------------ named failure kinds: inputs

def _palette_mask(path: Path, indices: np.ndarray, colours: list[tuple[int, int, int]]) -> Path:
    img = Image.fromarray(indices.astype(np.uint8), "P")
    img.putpalette([c for colour in colours for c in colour] + [0] * (768 - 3 * len(colours)))
    img.save(path)
    return path


def test_a_palette_mask_with_reordered_palette_entries_is_mapped_by_colour(tmp_path):
    truth = np.zeros((8, 8), np.uint8)
    truth[:, 2:4], truth[:, 4:6], truth[:, 6:] = 1, 2, 3
    # another editor saved the same picture with its palette in another order: stroma first, tumor second...
    order = [1, 0, 3, 2]
    colours = [WSSS4LUAD.all_colors[i] for i in order]
    indices = np.vectorize(order.index)(truth)
    mask = read_index_png(_palette_mask(tmp_path / "m.png", indices, colours), WSSS4LUAD)
    assert np.array_equal(mask, truth)


def test_a_palette_mask_mixing_class_colours_and_others_is_refused(tmp_path):
    colours = [WSSS4LUAD.all_colors[0], (1, 2, 3)]
    path = _palette_mask(tmp_path / "odd.png", np.array([[0, 1], [1, 0]]), colours)
    with pytest.raises(ImageReadError, match="odd.png.*mixes class colours"):
        read_index_png(path, WSSS4LUAD)


def test_exif_orientation_is_applied(tmp_path):
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :10] = 200  # a bright band on the left of the stored pixels
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = read_rgb(tmp_path / "phone.jpg")
    assert shown.shape == (40, 20, 3)  # portrait, as every viewer shows it
    assert shown[:10].mean() > 150 and shown[-10:].mean() < 50


def test_transparent_pixels_are_background_in_a_tiff_with_alpha(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 30  # dark pixels, hidden by alpha 0 on the left half
    rgba[:, 8:, 3] = 255
    tifffile.imwrite(tmp_path / "a.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    out = read_rgb(tmp_path / "a.tif")
    assert (out[:, :8] == 255).all() and (out[:, 8:] == 30).all()


def test_more_than_3_channels_are_refused_unless_the_rgb_channels_are_named(tmp_path):
    stack = np.zeros((16, 16, 5), np.uint8)
    stack[..., 2], stack[..., 3], stack[..., 4] = 10, 20, 30
    tifffile.imwrite(tmp_path / "plex.tif", stack, photometric="minisblack", planarconfig="contig")
    with pytest.raises(ImageReadError, match=r"plex.tif'? has 5 channels.*--channels R,G,B"):
        read_rgb(tmp_path / "plex.tif")
    with ImageSource.open(tmp_path / "plex.tif", channels=(2, 3, 4)) as source:
        assert source.read_level(0)[0, 0].tolist() == [10, 20, 30]


def test_a_second_image_in_a_tiff_is_reported(tmp_path):
    path = tmp_path / "two.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.full((16, 16, 3), 100, np.uint8), photometric="rgb")
        tif.write(np.full((8, 8, 3), 50, np.uint8), photometric="rgb")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_rgb(path)[0, 0].tolist() == [100, 100, 100]
    assert any("two.tif holds 2 images" in str(w.message) for w in caught)


def test_predict_segments_a_5_channel_image_only_with_its_rgb_channels_named(tmp_path, capsys):
    from napari_wsss_cram.core.checkpoint import save_checkpoint
    from napari_wsss_cram.core.model.cram import CRAMNet

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.pt", CRAMNet(WSSS4LUAD, ModelConfig(
        backbone="resnet18", output_stride=16, aspp_channels=8, attention_dim=8), weights=None))
    stack = np.zeros((48, 48, 5), np.uint8)
    stack[..., 1:4] = np.array([150, 90, 160], np.uint8)
    tifffile.imwrite(tmp_path / "plex.tif", stack, photometric="minisblack", planarconfig="contig")
    argv = ["predict", str(ckpt), str(tmp_path / "plex.tif"), "--out", str(tmp_path / "out"), "--scale", "1",
            "--format", "png"]
    assert main(argv) == 2
    assert "plex.tif has 5 channels" in capsys.readouterr().err
    assert main(argv + ["--channels", "1,2,3", "--overwrite"]) == 0
    assert (tmp_path / "out" / "plex.png").is_file()
