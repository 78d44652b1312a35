"""`wsss-cram predict` end to end with a real (random-init resnet18) checkpoint, and sharding under torchrun."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from napari_wsss_cram.cli import main
from napari_wsss_cram.commands.predict import SUMMARY_NAME, shard


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


def make_inputs(folder, n, size=48):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"patch{i}.png"
        Image.fromarray((rng.random((size, size + 8, 3)) * 180).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def read_summary(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_writes_outputs_and_refuses_to_overwrite(tmp_path, checkpoint, capsys):
    inputs = make_inputs(tmp_path / "in", 2)
    out = tmp_path / "out"
    argv = ["predict", str(checkpoint), str(tmp_path / "in"), "--out", str(out), "--scale", "1.0",
            "--format", "png,geojson", "--crf", "--tile", "256"]
    assert main(argv) == 0
    for p in inputs:
        assert (out / f"{p.stem}.png").exists() and (out / f"{p.stem}.geojson").exists()
        assert (out / f"{p.stem}_composition.json").exists()
        with Image.open(out / f"{p.stem}.png") as im:
            assert im.mode == "P" and im.size == (56, 48)
    rows = read_summary(out / SUMMARY_NAME)
    assert [r["image"] for r in rows] == ["patch0", "patch1"] and {r["status"] for r in rows} == {"ok"}
    assert float(rows[0]["crf_seconds"]) > 0
    capsys.readouterr()
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


def test_predict_bad_input_is_a_clear_error(tmp_path, checkpoint, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = make_inputs(tmp_path / "in", 1)[0]
    code = main(["predict", str(checkpoint), str(bad), str(good), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "broken.png" in err and "Traceback" not in err
    rows = read_summary(tmp_path / "out" / SUMMARY_NAME)
    assert rows[0]["status"].startswith("error:") and rows[1]["status"] == "ok"
    assert main(["predict", str(checkpoint), str(tmp_path / "missing.png"), "--out", str(tmp_path / "o2")]) == 2
    assert main(["predict", str(checkpoint), str(good), "--out", str(tmp_path / "o3"), "--format", "jpeg"]) == 2


def test_shard_assigns_each_input_once():
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(i for part in parts for i in part) == items


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_predict_each_input_once(tmp_path, checkpoint):
    inputs = make_inputs(tmp_path / "in", 3, size=32)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "napari_wsss_cram.cli", "predict", str(checkpoint),
           *map(str, inputs), "--out", str(out), "--scale", "1.0", "--format", "png", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_summary(out / SUMMARY_NAME)
    assert sorted(r["image"] for r in rows) == ["patch0", "patch1", "patch2"]  # each exactly once
    assert {r["rank"] for r in rows} == {"0", "1"}
    assert sorted(p.name for p in out.glob("*.png")) == ["patch0.png", "patch1.png", "patch2.png"]


def test_output_rule_flags_reach_the_engine(checkpoint, tmp_path):
    """--background model / --no-gate / --tta are the paper's output rule and test-time augmentation."""
    import argparse

    from napari_wsss_cram.commands.predict import TTA_SCALES, add_arguments, settings_from_args
    from napari_wsss_cram.core.checkpoint import load_checkpoint
    from napari_wsss_cram.core.inference import PredictSettings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    _, info = load_checkpoint(checkpoint)
    default_args = parser.parse_args([str(checkpoint), "x.png", "--out", str(tmp_path)])
    default_args.formats = ("png",)
    defaults, _ = settings_from_args(default_args, info)
    assert (defaults.background, defaults.gate_classes, defaults.tta_scales) == (
        PredictSettings.background, PredictSettings.gate_classes, PredictSettings.tta_scales)
    args = parser.parse_args([str(checkpoint), "x.png", "--out", str(tmp_path), "--background", "model",
                              "--no-gate", "--tta"])
    args.formats = ("png",)
    paper, _ = settings_from_args(args, info)
    assert paper.background == "model" and paper.gate_classes is False
    assert paper.tta_scales == TTA_SCALES and paper.tta_flip
    inputs = make_inputs(tmp_path / "in", 1)
    assert main(["predict", str(checkpoint), str(inputs[0]), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--background", "model", "--no-gate", "--tta", "--format", "png"]) == 0
    assert (tmp_path / "out" / "patch0.png").is_file()
