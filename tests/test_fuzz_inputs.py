"""Property-based fuzzing of everything that reads a user's bytes (issue 11): whatever the input, the result is a
valid value or a clear ``WsssCramError`` naming the problem, never a hang, a crash or another exception.

Targets: the image reader (PNG, JPEG, TIFF, OME-TIFF: bytes flipped, inserted, truncated), patch names, the
labels CSV, the QuPath GeoJSON importer and checkpoint loading. Bounded for CI (``WSSS_FUZZ_EXAMPLES`` examples
per target, default 25); ``benchmarks/fuzz_inputs.py`` runs them longer and prints what each target saw.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.errors import WsssCramError

EXAMPLES = int(os.environ.get("WSSS_FUZZ_EXAMPLES", "25"))
# no deadline: the fuzz tests check outcomes, not speed (timings live in benchmarks/fuzz_inputs.py)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("WSSS_FUZZ_RANDOM") is None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], database=None)
#: target -> outcome -> count (printed by benchmarks/fuzz_inputs.py)
OUTCOMES: dict[str, Counter] = {}


def _record(target: str, outcome: str) -> None:
    OUTCOMES.setdefault(target, Counter())[outcome] += 1


# ----------------------------------------------------------------------------------------------- seed files

def _seed_images() -> dict[str, bytes]:
    import tifffile

    rng = np.random.default_rng(0)
    rgb = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
    seeds = {}
    for fmt, suffix in (("PNG", ".png"), ("JPEG", ".jpg")):
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format=fmt)
        seeds[suffix] = buffer.getvalue()
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgb, photometric="rgb", tile=(16, 16), compression="zlib")
    seeds[".tif"] = buffer.getvalue()
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgb, photometric="rgb", ome=True, metadata={"PhysicalSizeX": 0.5,
                                                                        "PhysicalSizeY": 0.5})
    seeds[".ome.tif"] = buffer.getvalue()
    return seeds


SEEDS = _seed_images()


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """``seed`` with a few bytes replaced, a run inserted or deleted, and maybe truncated."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data) - 1))
        del data[at:at + draw(st.integers(1, 64))]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def _write(suffix: str, data: bytes) -> Path:
    fd, name = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return Path(name)


@pytest.mark.parametrize("suffix", sorted(SEEDS))
def test_image_reader_never_crashes_on_damaged_files(suffix):
    from napari_wsss_cram.core.io.images import ImageSource

    @FUZZ
    @given(data=mutated(SEEDS[suffix]))
    def check(data: bytes) -> None:
        path = _write(suffix, data)
        try:
            with ImageSource.open(path) as source:
                rgb = source.read_level(0)
                assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
                assert rgb.shape[:2] == source.shape
            _record(f"image {suffix}", "read")
        except WsssCramError as err:
            assert path.name in str(err) or str(path) in str(err), f"the message does not name the file: {err}"
            _record(f"image {suffix}", "refused")
        finally:
            path.unlink()

    check()


# ----------------------------------------------------------------------------------------------- names and CSV

@FUZZ
@given(name=st.one_of(st.text(min_size=1, max_size=40).filter(lambda s: "/" not in s and "\x00" not in s),
                      st.from_regex(r"\A[a-z0-9_.-]{0,6}-\[[0-9, .-]{0,10}\]\Z")))
def test_patch_name_parser_gives_flags_or_a_clear_error(name):
    from napari_wsss_cram.core.data.patches import parse_patch_name

    try:
        stem, flags = parse_patch_name(Path(name + ".png"))
        assert isinstance(stem, str) and all(v in (0, 1) for v in flags)
        _record("patch names", "parsed")
    except WsssCramError:
        _record("patch names", "refused")


CSV_CELLS = st.one_of(st.sampled_from(["0", "1", "1.0", "0.6", "", " 1 ", "-1", "nan", "inf", "yes", "a.png",
                                       "missing.png", '"', "\ufeffpath"]), st.text(max_size=8))


VALID_ROW = st.tuples(st.sampled_from(["a.png", " a.png "]), st.sampled_from(["0", "1", "1.0"]),
                      st.sampled_from(["0", "1"]), st.sampled_from(["0", "1", "0.0"])).map(list)


@FUZZ
@given(rows=st.lists(st.one_of(VALID_ROW, st.lists(CSV_CELLS, min_size=0, max_size=5)), min_size=0, max_size=5),
       header=st.sampled_from(["path,tumor,stroma,normal", "\ufeffpath,tumor,stroma,normal", "file,a,b", "x", ""]),
       separator=st.sampled_from([",", ";", "\t"]))
def test_labels_csv_gives_an_index_or_a_clear_error(rows, header, separator):
    from napari_wsss_cram.core.data.patches import discover_patches

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(folder / "a.png")
        text = header + "\n" + "\n".join(separator.join(r) for r in rows) + "\n"
        (folder / "labels.csv").write_text(text, encoding="utf-8")
        try:
            index = discover_patches(folder / "labels.csv")
            assert len(index) >= 1 and set(np.unique(index.labels)) <= {0, 1}
            assert index.labels.sum(axis=1).min() >= 1
            _record("labels CSV", "read")
        except WsssCramError:
            _record("labels CSV", "refused")


# ----------------------------------------------------------------------------------------------- GeoJSON

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10),
                      st.sampled_from(["Polygon", "MultiPolygon", "tumor", "stroma", "Feature", "FeatureCollection"]))
JSON_ANY = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.sampled_from(
                                                                ["type", "features", "geometry", "properties",
                                                                 "classification", "name", "coordinates"]),
                                                                inner, max_size=4)), max_leaves=20)
RING = st.lists(st.lists(st.one_of(st.floats(-50, 100), st.floats(allow_nan=True, allow_infinity=True),
                                   st.text(max_size=2)), min_size=0, max_size=3), min_size=0, max_size=6)
FEATURE = st.fixed_dictionaries({
    "type": st.just("Feature"),
    "geometry": st.one_of(JSON_ANY, st.fixed_dictionaries({
        "type": st.sampled_from(["Polygon", "MultiPolygon", "Point"]),
        "coordinates": st.one_of(st.lists(RING, max_size=2), st.lists(st.lists(RING, max_size=2), max_size=2),
                                 JSON_ANY)})),
    "properties": st.one_of(JSON_ANY, st.fixed_dictionaries({"classification": st.one_of(
        st.fixed_dictionaries({"name": st.sampled_from(["tumor", "stroma", "Tumor", "necrosis", "", "normal"])}),
        JSON_ANY)})),
})


@FUZZ
@given(document=st.one_of(JSON_ANY, st.fixed_dictionaries({"type": st.just("FeatureCollection"),
                                                           "features": st.lists(FEATURE, max_size=4)})))
def test_geojson_importer_gives_labels_or_a_clear_error(document):
    from napari_wsss_cram.core.io.qupath import geojson_to_labels

    try:
        labels = geojson_to_labels(document, (24, 32), WSSS4LUAD)
        assert labels.shape == (24, 32) and labels.max() <= WSSS4LUAD.background_index
        _record("GeoJSON", "imported")
    except WsssCramError:
        _record("GeoJSON", "refused")


@FUZZ
@given(data=st.binary(max_size=200))
def test_geojson_file_bytes_give_labels_or_a_clear_error(data):
    from napari_wsss_cram.core.io.qupath import geojson_to_labels

    path = _write(".geojson", data)
    try:
        labels = geojson_to_labels(path, (8, 8), WSSS4LUAD)
        # a successful read is a class label map of the asked shape (background where no polygon is)
        assert labels.shape == (8, 8) and labels.dtype == np.uint8
        assert set(np.unique(labels)) <= set(range(WSSS4LUAD.background_index + 1))
        _record("GeoJSON file", "imported")
    except WsssCramError as err:
        assert path.name in str(err)
        _record("GeoJSON file", "refused")
    finally:
        path.unlink()


# ----------------------------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def small_checkpoint_bytes() -> bytes:
    return checkpoint_bytes()


def checkpoint_bytes() -> bytes:
    """A real checkpoint file of a real (tiny-head resnet18) model: what `wsss-cram train` writes."""
    from napari_wsss_cram.core.checkpoint import save_checkpoint
    from napari_wsss_cram.core.model.config import ModelConfig
    from napari_wsss_cram.core.model.cram import CRAMNet

    torch.manual_seed(0)
    model = CRAMNet(WSSS4LUAD, ModelConfig(backbone="resnet18", aspp_channels=8, attention_dim=8), weights=None)
    with tempfile.TemporaryDirectory() as folder:
        return save_checkpoint(Path(folder) / "m.pt", model).read_bytes()


def test_checkpoint_loading_never_crashes_on_damaged_files(small_checkpoint_bytes):
    from napari_wsss_cram.core.checkpoint import load_checkpoint

    # the zip's central directory (where damage decides what torch sees) is at the end: mutate there and anywhere
    tail = len(small_checkpoint_bytes) - 4096

    @settings(FUZZ, max_examples=max(5, EXAMPLES // 2))
    @given(flips=st.lists(st.tuples(st.one_of(st.integers(0, len(small_checkpoint_bytes) - 1),
                                              st.integers(tail, len(small_checkpoint_bytes) - 1)),
                                    st.integers(0, 255)), min_size=1, max_size=4),
           cut=st.one_of(st.none(), st.integers(0, len(small_checkpoint_bytes))))
    def check(flips, cut) -> None:
        data = bytearray(small_checkpoint_bytes)
        for at, value in flips:
            data[at] = value
        path = _write(".pt", bytes(data[:cut] if cut is not None else data))
        try:
            model, info = load_checkpoint(path)
            assert info.classes.names == WSSS4LUAD.names
            _record("checkpoint", "loaded (damage outside the weights)")
        except WsssCramError as err:
            assert path.name in str(err)
            _record("checkpoint", "refused")
        finally:
            path.unlink()

    check()


# ----------------------------------------------------------------------------------------- CLI flags (issue 21)

#: a number as a user may type it: ordinary, negative, zero, huge, not finite, or not a number at all
_NUMBER_TEXT = st.one_of(st.integers(0, 300).map(str), st.floats(0.05, 20).map(repr),  # plausible, more often
                         st.integers(-10 ** 12, 10 ** 12).map(str),
                         st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
                         st.sampled_from(["nan", "inf", "-inf", "0", "-0", "1e308", "0x10", "", "abc", "1,5"]))
_PREDICT_FLAGS = ("--tile", "--overlap", "--batch", "--scale", "--mpp", "--tissue-threshold", "--output-level")
_CRF_KEYS = ("gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb", "bilateral_compat", "iterations")


def _tissue_image() -> np.ndarray:
    """An H&E-like 48x48 image: every pixel is tissue (gray ~ 120-170, under any allowed threshold)."""
    rng = np.random.default_rng(1)
    base = np.array([150, 90, 160], np.float32)
    return np.clip(base + rng.normal(0, 12, (48, 48, 3)), 0, 255).astype(np.uint8)


def test_predict_flags_give_settings_that_segment_or_a_clear_error(small_checkpoint_bytes):
    """Every numeric flag of ``predict`` and every ``--crf-params`` key, drawn: the command line either gives
    settings that segment an all-tissue image into tissue classes, or a ``WsssCramError`` / argparse error,
    never another exception, a crash, a hang or a silent all-background map."""
    from napari_wsss_cram.cli import build_parser
    from napari_wsss_cram.commands.predict import settings_from_args
    from napari_wsss_cram.core.checkpoint import load_checkpoint
    from napari_wsss_cram.core.inference import predict_array
    from napari_wsss_cram.core.progress import drive

    path = _write(".pt", small_checkpoint_bytes)
    model, info = load_checkpoint(path)
    parser = build_parser()
    image = _tissue_image()

    @settings(FUZZ, max_examples=max(10, EXAMPLES))
    @given(flags=st.dictionaries(st.sampled_from(_PREDICT_FLAGS), _NUMBER_TEXT, max_size=3),
           crf=st.dictionaries(st.sampled_from(_CRF_KEYS), _NUMBER_TEXT, max_size=3),
           device=st.sampled_from(["cpu", "auto", "meta", "cuda:99", "tpu", "cpu:0"]))
    def check(flags, crf, device) -> None:
        argv = ["predict", str(path), "x.png", "--out", "o", "--device", device]
        for flag, value in flags.items():
            argv += [f"{flag}={value}"]
        if crf:
            argv += ["--crf", "--crf-params", ",".join(f"{k}={v}" for k, v in crf.items())]
        try:
            args = parser.parse_args(argv)
        except SystemExit:  # argparse: "argument --tile: invalid int value", one line, exit 2
            _record("CLI flags", "refused by the parser")
            return
        args.formats = ("png",)
        try:
            from napari_wsss_cram.core.device import resolve_device

            resolve_device(args.device)
            settings_, _ = settings_from_args(args, info)
        except WsssCramError:
            _record("CLI flags", "refused with a message")
            return
        settings_.device = "cpu"
        settings_.tile = min(settings_.tile, 256)  # drawn sizes up to the limits; the run itself kept small
        settings_.overlap = min(settings_.overlap, settings_.tile // 2)
        settings_.batch = min(settings_.batch or 4, 4)
        settings_.crf_params.iterations = min(settings_.crf_params.iterations, 3)
        try:
            prediction = drive(predict_array(model, info, image, settings_, mpp=0.5))
        except WsssCramError:
            _record("CLI flags", "refused with a message")  # e.g. an --mpp that resamples beyond the limits
            return
        labels = np.asarray(prediction.labels)
        assert labels.size and (labels != info.classes.background_index).any(), "silent all-background output"
        _record("CLI flags", "segmented")

    try:
        check()
    finally:
        path.unlink()


# --------------------------------------------------------------------------------------- TOML presets (issue 21)

_TOML_VALUE = st.one_of(st.integers(-10 ** 6, 10 ** 6), st.floats(allow_nan=True, allow_infinity=True),
                        st.booleans(), st.text(max_size=8), st.lists(st.integers(-5, 5), max_size=3))


def test_training_presets_give_a_config_or_a_clear_error():
    """A TOML preset with drawn values for every training and model setting: ``load_config`` gives a config whose
    numbers are finite and in range, or a ``DatasetError`` naming the preset file; never another exception."""
    import dataclasses

    import tomli_w

    from napari_wsss_cram.core.errors import DatasetError
    from napari_wsss_cram.core.model.config import ModelConfig
    from napari_wsss_cram.core.train_config import TrainConfig, load_config
    from napari_wsss_cram.core.validate import MODEL_RANGES, TRAIN_RANGES

    train_keys = sorted(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("model", "data", "out"))
    model_keys = sorted(f.name for f in dataclasses.fields(ModelConfig))

    @settings(FUZZ, max_examples=max(20, EXAMPLES * 2))
    @given(top=st.dictionaries(st.sampled_from(train_keys), _TOML_VALUE, max_size=4),
           model=st.dictionaries(st.sampled_from(model_keys), _TOML_VALUE, max_size=3))
    def check(top, model) -> None:
        table = {**top, **({"model": model} if model else {})}
        path = _write(".toml", tomli_w.dumps(table).encode())
        try:
            config = load_config(path)
        except DatasetError as err:
            assert path.name in str(err)
            _record("TOML preset", "refused")
            return
        finally:
            path.unlink()
        for name, (low, high, _) in TRAIN_RANGES.items():
            value = getattr(config, name)
            assert value is None or low <= value <= high, (name, value)
        built = ModelConfig(**config.model)
        for name, (low, high, _) in MODEL_RANGES.items():
            value = getattr(built, name)
            assert value is None or low <= value <= high, (name, value)
        _record("TOML preset", "loaded")

    check()
