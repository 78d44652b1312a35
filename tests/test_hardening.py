"""Issue 11's "bad" inputs: each one used to corrupt data or give a silent wrong answer; now each is refused
with a message that names the file and what to do, and nothing is lost."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_wsss_cram.cli import main
from napari_wsss_cram.commands.predict import SUMMARY_NAME as SUMMARY
from napari_wsss_cram.core.checkpoint import load_checkpoint, save_checkpoint
from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.data.patches import discover_patches
from napari_wsss_cram.core.data.pixel import discover_pixel_dataset, load_mask
from napari_wsss_cram.core.errors import CheckpointError, DatasetError, ImageReadError
from napari_wsss_cram.core.io.guard import folder_lock
from napari_wsss_cram.core.io.images import ImageSource, read_rgb
from napari_wsss_cram.core.io.png import write_index_png
from napari_wsss_cram.core.model.config import ModelConfig
from napari_wsss_cram.core.model.cram import CRAMNet


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = CRAMNet(WSSS4LUAD, ModelConfig(backbone="resnet18"), weights=None)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", model)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _he_patch(path: Path, size: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size, size, 3)) * 180).astype(np.uint8)).save(path)
    return path


# 1 ---------------------------------------------------------------------------------- outputs never replace inputs

def test_predict_into_the_input_folder_never_replaces_the_inputs(tmp_path, checkpoint, capsys):
    images = tmp_path / "img"
    images.mkdir()
    for i in range(2):
        _he_patch(images / f"p{i}.png", seed=i)
    before = _digest(images)
    code = main(["predict", str(checkpoint), str(images), "--out", str(images), "--overwrite", "--scale", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "would replace the input" in err and "p0.png" in err
    assert _digest(images) == before


# 2 ---------------------------------------------------------------------------------- CSV labels are exact

def test_fractional_csv_labels_are_refused_not_floored(tmp_path):
    _he_patch(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("path,tumor,stroma,normal\na.png,0.6,1,0\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"line 2: class values must be 0 or 1.*fractions"):
        discover_patches(tmp_path / "labels.csv")


def test_excel_byte_order_mark_and_decimal_ones_are_read(tmp_path):
    _he_patch(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_bytes("\ufeffpath,tumor,stroma,normal\na.png,1.0,0,1\n".encode())
    index = discover_patches(tmp_path / "labels.csv")
    assert index.labels.tolist() == [[1, 0, 1]]


# 3 ---------------------------------------------------------------------------------- mask folders keep their order

def test_mask_folder_class_order_is_read_from_its_classes_txt(tmp_path):
    truth = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)  # tumor, stroma, normal, background
    # the same mask written by a tool that ordered the classes alphabetically: normal, stroma, tumor
    alphabetical = np.array([2, 1, 0, 3], np.uint8)[truth]
    for d in ("img", "mask"):
        (tmp_path / d).mkdir()
    Image.fromarray(np.full((2, 4, 3), 120, np.uint8)).save(tmp_path / "img" / "a.png")
    write_index_png(tmp_path / "mask" / "a.png", alphabetical, WSSS4LUAD)
    (tmp_path / "classes.txt").write_text("normal\nstroma\ntumor\n", encoding="utf-8")
    index = discover_pixel_dataset(tmp_path, WSSS4LUAD)  # the model's order
    assert np.array_equal(load_mask(index.samples[0], WSSS4LUAD), truth)
    (tmp_path / "classes.txt").write_text("necrosis\nstroma\ntumor\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="classes.txt names the classes necrosis"):
        discover_pixel_dataset(tmp_path, WSSS4LUAD)


# 4 ---------------------------------------------------------------------------------- damaged checkpoints

def _tamper(source: Path, dest: Path, change) -> Path:
    payload = torch.load(source, weights_only=True)
    name = "backbone.conv1.weight" if "backbone.conv1.weight" in payload["state_dict"] else \
        next(k for k, v in payload["state_dict"].items() if v.is_floating_point() and v.numel() > 10)
    change(payload, name)
    torch.save(payload, dest)
    return dest


def test_a_checkpoint_with_damaged_tensor_bytes_is_refused(tmp_path, checkpoint):
    load_checkpoint(checkpoint)  # the intact file loads

    def flip(payload, name):
        raw = payload["state_dict"][name].reshape(-1).view(torch.int32)
        raw[3] ^= 1 << 20  # one bit of one weight

    with pytest.raises(CheckpointError, match="damaged.*checksum"):
        load_checkpoint(_tamper(checkpoint, tmp_path / "flipped.pt", flip))


def test_a_checkpoint_with_nan_weights_is_refused_even_with_a_matching_checksum(tmp_path, checkpoint):
    from napari_wsss_cram.core.checkpoint import tensors_sha256

    def nan(payload, name):
        payload["state_dict"][name].fill_(float("nan"))
        payload["tensor_sha256"] = tensors_sha256(payload["state_dict"])

    with pytest.raises(CheckpointError, match="not finite.*diverged"):
        load_checkpoint(_tamper(checkpoint, tmp_path / "nan.pt", nan))


# 5 ---------------------------------------------------------------------------------- truncated PNG pixel data

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, rows_present: int) -> bytes:
    """An RGB PNG whose compressed data holds only ``rows_present`` rows, with a valid end marker."""
    raw = b"".join(b"\x00" + bytes([120, 60, 140]) * width for _ in range(rows_present))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def test_png_whose_pixel_data_stops_early_is_refused(tmp_path):
    whole = tmp_path / "whole.png"
    whole.write_bytes(_png(30, 20, 20))
    assert read_rgb(whole)[19, 29].tolist() == [120, 60, 140]
    cut = tmp_path / "cut.png"
    cut.write_bytes(_png(30, 20, 1))
    with pytest.raises(ImageReadError, match=r"cut.png.*truncated.*1 of 20 rows"):
        read_rgb(cut)


def test_tiny_png_claiming_a_huge_size_is_refused_at_once(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png(12000, 12000, 0))
    assert bomb.stat().st_size < 200
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError, match="12000x12000"):
        read_rgb(bomb)
    assert time.perf_counter() - t0 < 10  # refused from the header and the stream length, nothing decoded


# 6 ---------------------------------------------------------------------------------- float TIFF ranges

def test_float_tiff_holding_0_to_255_reads_as_the_8_bit_image(tmp_path):
    import tifffile

    rng = np.random.default_rng(0)
    rgb = (rng.random((24, 32, 3)) * 255).round().astype(np.uint8)
    tifffile.imwrite(tmp_path / "f255.tif", rgb.astype(np.float32), photometric="rgb")
    tifffile.imwrite(tmp_path / "f01.tif", rgb.astype(np.float32) / 255.0, photometric="rgb")
    assert np.array_equal(read_rgb(tmp_path / "f255.tif"), rgb)
    assert np.array_equal(read_rgb(tmp_path / "f01.tif"), rgb)
    tifffile.imwrite(tmp_path / "nan.tif", np.full((24, 32, 3), np.nan, np.float32), photometric="rgb")
    with pytest.raises(ImageReadError, match="nan.tif.*no finite pixel values"):
        read_rgb(tmp_path / "nan.tif")


# 7 ---------------------------------------------------------------------------------- one run per output folder

def test_a_second_predict_into_a_busy_folder_is_refused(tmp_path, checkpoint, capsys):
    images = tmp_path / "img"
    images.mkdir()
    _he_patch(images / "p.png")
    out = tmp_path / "out"
    with folder_lock(out, "wsss-cram predict"):
        assert main(["predict", str(checkpoint), str(images), "--out", str(out), "--scale", "1"]) == 2
        assert "Another wsss-cram predict is writing into" in capsys.readouterr().err
        assert not (out / "p.png").exists()
    # released: the run goes through
    assert main(["predict", str(checkpoint), str(images), "--out", str(out), "--scale", "1",
                 "--format", "png"]) == 0
    assert (out / "p.png").exists()


# 8 ---------------------------------------------------------------------------------- evaluate --json

def test_evaluate_refuses_an_existing_json_before_evaluating(tmp_path, checkpoint, capsys, sample_data_dir):
    scores = tmp_path / "scores.json"
    scores.write_text('{"keep": true}', encoding="utf-8")
    t0 = time.perf_counter()
    code = main(["evaluate", str(checkpoint), str(sample_data_dir / "validation"), "--json", str(scores)])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert json.loads(scores.read_text(encoding="utf-8")) == {"keep": True}
    assert time.perf_counter() - t0 < 30
    folder = tmp_path / "a-folder.json"
    folder.mkdir()
    assert main(["evaluate", str(checkpoint), str(sample_data_dir / "validation"), "--json", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err


# 9 ---------------------------------------------------------------------------------- pipes do not hang

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.timeout(60)  # a regression would block in open(): fail, do not hang the suite
def test_a_named_pipe_is_refused_not_read_forever(tmp_path):
    from napari_wsss_cram._reader import napari_get_reader

    fifo = tmp_path / "slide.png"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError, match="not a regular file"):
        ImageSource.open(fifo)
    reader = napari_get_reader(str(fifo))
    if reader is not None:  # napari's reader refuses it the same way, on the GUI thread, at once
        with pytest.raises(ImageReadError, match="not a regular file"):
            reader(str(fifo))
    assert time.perf_counter() - t0 < 5


# ---------------------------------------------------------------------------------- weak cases: settings

@pytest.mark.parametrize(("overrides", "message"), [
    ({"steps": 0}, "steps must be at least 1"),
    ({"lr": float("nan")}, "lr must be a finite positive number"),
    ({"lr": "fast"}, "'lr' must be a number, got 'fast'"),
    ({"crop": 1.5}, "'crop' must be a whole number"),
    ({"flip": 1}, "'flip' must be true or false"),
    ({"model": {"bakbone": "resnet18"}}, r"Unknown \[model\] settings: bakbone"),
])
def test_bad_training_settings_are_named(overrides, message):
    from napari_wsss_cram.core.train_config import TrainConfig

    with pytest.raises(DatasetError, match=message):
        TrainConfig(**overrides)


def test_a_toml_value_of_the_wrong_type_names_the_file(tmp_path):
    from napari_wsss_cram.core.train_config import load_config

    preset = tmp_path / "mine.toml"
    preset.write_text('batch_size = "eight"\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"mine.toml: setting 'batch_size' must be a whole number"):
        load_config(preset)


@pytest.mark.parametrize(("flags", "message"), [
    (["--batch", "0"], "--batch must be at least 1"),
    (["--scale", "250"], "--scale 250 is outside"),
])
def test_predict_refuses_settings_that_are_slips(tmp_path, checkpoint, capsys, flags, message):
    _he_patch(tmp_path / "p.png")
    argv = ["predict", str(checkpoint), str(tmp_path / "p.png"), "--out", str(tmp_path / "out")]
    if "--scale" not in flags:
        argv += ["--scale", "1"]
    assert main(argv + flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "p.png").exists()


def test_an_output_folder_that_is_a_file_is_refused_before_work(tmp_path, checkpoint, capsys, sample_data_dir):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder", encoding="utf-8")
    _he_patch(tmp_path / "p.png")
    assert main(["predict", str(checkpoint), str(tmp_path / "p.png"), "--out", str(blocker), "--scale", "1"]) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err
    assert main(["train", str(sample_data_dir / "patches"), "--out", str(blocker), "--config", "sample",
                 "--steps", "1", "--weights", "none"]) == 2
    assert "run folder (--out)" in capsys.readouterr().err and blocker.read_text() == "not a folder"


# ---------------------------------------------------------------------------------- weak cases: training faults

def _tiny_config(sample_data_dir: Path, out: Path, **kw):
    from napari_wsss_cram.core.train_config import TrainConfig

    settings = dict(data=str(sample_data_dir / "patches"), out=str(out), weights="none", device="cpu", steps=3,
                    batch_size=2, crop=32, scale_min=1.0, scale_max=1.0, workers=0, threads=1, crf_workers=0,
                    checkpoint_every=1, model={"backbone": "resnet18", "output_stride": 16, "aspp_channels": 16,
                                               "attention_dim": 16})
    return TrainConfig(**{**settings, **kw})


def test_a_diverging_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path, sample_data_dir):
    from napari_wsss_cram.core.errors import TrainingError
    from napari_wsss_cram.core.progress import drive
    from napari_wsss_cram.core.train import Trainer, train_steps

    class Diverging(Trainer):
        def training_step(self, batch):
            loss, terms = super().training_step(batch)
            return (loss * float("nan") if self.step >= 1 else loss), terms

    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"step 2: training diverged.*last.pt holds the last good step.*--lr"):
        drive(train_steps(_tiny_config(sample_data_dir, run), trainer_class=Diverging))
    assert load_checkpoint(run / "last.pt")[1].extra["step"] == 1


def test_a_full_disk_is_said_plainly_and_the_previous_checkpoint_survives(tmp_path, sample_data_dir, monkeypatch):
    import errno

    from napari_wsss_cram.core.errors import TrainingError
    from napari_wsss_cram.core.progress import drive
    from napari_wsss_cram.core.train import train_steps

    real_save = torch.save
    calls = {"n": 0}

    def filling_disk(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # resume.pt and last.pt of step 1 fit; then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", filling_disk)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="the disk is full.*previous checkpoint is untouched"):
        drive(train_steps(_tiny_config(sample_data_dir, run)))
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(run / "last.pt")[1].extra["step"] == 1
    assert not [p for p in run.iterdir() if ".partial" in p.name]  # no temporary left behind


# ---------------------------------------------------------------------------------- weak cases: noise

def test_cli_warnings_are_one_plain_line(tmp_path, checkpoint):
    import subprocess
    import sys

    gray = tmp_path / "gray.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40)) * 200).astype(np.uint8)).save(gray)
    # a real process: pytest's own warning capture would hide how the command line prints them
    done = subprocess.run([sys.executable, "-m", "napari_wsss_cram.cli", "predict", str(checkpoint), str(gray),
                           "--out", str(tmp_path / "out"), "--scale", "1", "--format", "png"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "warning: gray.png is grayscale" in done.stderr
    assert ".py:" not in done.stderr and "warnings.warn" not in done.stderr


def test_undefined_miou_is_explained_and_json_null(tmp_path):
    from napari_wsss_cram.core.metrics import ConfusionMatrix

    cm = ConfusionMatrix(WSSS4LUAD)
    data = cm.to_dict()
    assert data["mIoU"] is None and "no tissue-class pixel" in data["note"]
    json.dumps(data, allow_nan=False)
    assert "mIoU n/a" in cm.table()


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="SIGTERM semantics are POSIX")
def test_sigterm_during_training_saves_a_checkpoint(tmp_path, sample_data_dir):
    import signal
    import subprocess
    import sys

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_wsss_cram.cli", "train", str(sample_data_dir / "patches"), "--out", str(run),
         "--config", "sample", "--steps", "100000", "--weights", "none", "--workers", "0", "--crf-workers", "0"],
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (run / "joint" / "metrics.csv").exists():  # the recipe's first stage
            time.sleep(0.5)
        time.sleep(3)  # a few steps, fewer than checkpoint_every
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Interrupted." in err and "Traceback" not in err
    step = load_checkpoint(run / "joint" / "last.pt")[1].extra["step"]
    assert step >= 1
    assert not (run / "final.pt").exists()  # the recipe stopped in its first stage: no final model yet


def test_napari_reader_names_the_file_of_a_decompression_bomb(tmp_path, monkeypatch):
    from napari_wsss_cram._reader import read_layer

    big = tmp_path / "huge.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x64 > 2 x 100: Pillow's bomb error
    with pytest.raises(ImageReadError, match="huge.png.*too large"):
        read_layer(big)


def test_a_missing_work_dir_is_refused_before_work(tmp_path, checkpoint, capsys):
    _he_patch(tmp_path / "p.png")
    assert main(["predict", str(checkpoint), str(tmp_path / "p.png"), "--out", str(tmp_path / "out"), "--scale",
                 "1", "--work-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "--work-dir" in err and "not an existing folder" in err


def test_a_run_killed_between_renames_is_cleaned_by_the_next(tmp_path, checkpoint, capsys):
    images = tmp_path / "img"
    images.mkdir()
    _he_patch(images / "p.png")
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(images), "--out", str(out), "--scale", "1",
                 "--format", "png,geojson"]) == 0
    reference = (out / "p.png").read_bytes()
    # what kill -9 leaves: a temporary, and a set half renamed (its marker, the PNG moved, the rest not)
    (out / "p.geojson").unlink()
    (out / "p_composition.json").unlink()
    (out / ".p.renaming").write_text("p.png\np.geojson\np_composition.json\np_composition.csv", encoding="utf-8")
    (out / ".p.geojson.1234abcd.partial.geojson").write_text("{", encoding="utf-8")
    (out / SUMMARY).unlink()
    assert main(["predict", str(checkpoint), str(images), "--out", str(out), "--scale", "1",
                 "--format", "png,geojson"]) == 0
    assert "removed what an interrupted run left" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".wsss-cram")) == \
        ["p.geojson", "p.png", "p_composition.csv", "p_composition.json", SUMMARY]
    assert (out / "p.png").read_bytes() == reference


# ---------------------------------------------------------------------------------- weak cases: silent acceptance

def test_bracket_patches_beside_class_folders_are_refused(tmp_path):
    _he_patch(tmp_path / "a-[1, 0, 0].png")
    (tmp_path / "stroma").mkdir()
    _he_patch(tmp_path / "stroma" / "b.png", seed=1)
    with pytest.raises(DatasetError, match=r"both bracket-named patches and class sub-folders.*stroma"):
        discover_patches(tmp_path)


def test_identical_files_with_contradictory_labels_are_reported(tmp_path):
    _he_patch(tmp_path / "a-[1, 0, 0].png")
    _he_patch(tmp_path / "b-[0, 1, 0].png")  # the same pixels, another label
    _he_patch(tmp_path / "c-[0, 1, 0].png", seed=2)
    _he_patch(tmp_path / "d-[0, 1, 0].png", seed=2)  # a plain duplicate: no contradiction
    warnings = discover_patches(tmp_path).warnings
    found = [w for w in warnings if "same image as another but labelled differently" in w]
    assert len(found) == 1 and found[0].startswith("1 patch(es)")
    assert "b-[0, 1, 0].png {stroma} = a-[1, 0, 0].png {tumor}" in found[0]


def test_a_one_pixel_patch_is_refused(tmp_path):
    _he_patch(tmp_path / "a-[1, 0, 0].png")
    Image.fromarray(np.full((1, 1, 3), 120, np.uint8)).save(tmp_path / "dot-[0, 1, 0].png")
    with pytest.raises(DatasetError, match=r"dot-\[0, 1, 0\].png: the patch is only 1x1 px"):
        discover_patches(tmp_path)


def test_a_pickled_resume_state_is_refused_without_torchs_hint(tmp_path, sample_data_dir):
    import pickle

    from napari_wsss_cram.core.progress import drive
    from napari_wsss_cram.core.train import train_steps

    run = tmp_path / "run"
    drive(train_steps(_tiny_config(sample_data_dir, run, steps=1)))

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"model": Payload()}, run / "resume.pt", pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refusing .*resume.pt: it holds pickled Python objects") as err:
        drive(train_steps(_tiny_config(sample_data_dir, run, steps=2, resume=True)))
    assert "weights_only" not in str(err.value)


def test_a_corrupt_patch_in_a_loader_worker_gives_its_message_not_the_workers_traceback(tmp_path, sample_data_dir):
    import shutil

    from napari_wsss_cram.core.progress import drive
    from napari_wsss_cram.core.train import train_steps

    patches = tmp_path / "patches"
    shutil.copytree(sample_data_dir / "patches", patches)
    (patches / "broken-[1, 0, 0].png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ImageReadError) as err:
        drive(train_steps(_tiny_config(sample_data_dir, tmp_path / "run", data=str(patches), workers=1,
                                       steps=40, batch_size=4)))
    assert "broken-[1, 0, 0].png" in str(err.value)
    assert "Traceback" not in str(err.value) and "DataLoader worker" not in str(err.value)


def test_crf_worker_processes_leave_ctrl_c_to_the_main_process():
    import signal

    from napari_wsss_cram.core.model.config import ModelConfig
    from napari_wsss_cram.core.pseudo_labels import PseudoLabeller

    labeller = PseudoLabeller(1, ModelConfig(crf={"backend": "pydensecrf"}).__dict__, True)
    try:
        assert labeller.pool is not None
        assert labeller.pool.submit(signal.getsignal, signal.SIGINT).result(timeout=60) == signal.SIG_IGN
    finally:
        labeller.close()


def test_a_killed_runs_slide_store_is_removed_by_the_next_run(tmp_path):
    import subprocess
    import sys

    from napari_wsss_cram.core.inference import PredictSettings, predict_array
    from napari_wsss_cram.core.progress import drive

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "wsss-cram-predict-killed"
    (stale / "labels.zarr").mkdir(parents=True)
    (stale / "owner.pid").write_text(dead.stdout.strip(), encoding="utf-8")
    alive = tmp_path / "wsss-cram-predict-running"
    alive.mkdir()
    (alive / "owner.pid").write_text(str(os.getppid()), encoding="utf-8")  # a live process: kept

    class Flat(torch.nn.Module):
        def predict_with_presence(self, x):
            probs = torch.full((x.shape[0], 4, x.shape[2], x.shape[3]), 0.25)
            return probs, probs, torch.ones(x.shape[0], 3)

    rgb = np.full((40, 40, 3), 120, np.uint8)
    pred = drive(predict_array(Flat(), None, rgb, PredictSettings(scale=1.0, tile=32, overlap=8,
                                                                   stream_threshold_mp=0.0, work_dir=str(tmp_path))))
    assert not stale.exists() and alive.exists()
    assert (pred.store_dir / "owner.pid").read_text() == str(os.getpid())
    pred.cleanup()


def test_a_damaged_tiff_says_so_without_internal_error_names(tmp_path):
    import tifffile

    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 120, np.uint8), photometric="rgb", tile=(16, 16),
                     compression="zlib")
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ImageReadError) as err:
        read_rgb(path)
    assert "slide.tif" in str(err.value) and "truncated or corrupt" in str(err.value)
    assert "TypeError" not in str(err.value) and "KeyError" not in str(err.value)


def test_a_full_disk_while_writing_outputs_is_said_plainly(tmp_path, checkpoint, capsys, monkeypatch):
    import errno

    from napari_wsss_cram.core.io import qupath

    _he_patch(tmp_path / "p.png")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qupath, "write_geojson", full)
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(tmp_path / "p.png"), "--out", str(out), "--scale", "1"]) == 2
    assert "Cannot write the outputs of p into" in capsys.readouterr().err
    assert not [f for f in out.iterdir() if f.name.startswith(("p.", "p_", ".p"))]
