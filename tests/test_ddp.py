"""Distributed training: `wsss-cram train` under torchrun, 2 CPU processes with gloo, for a few steps."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from napari_wsss_cram.core.data import discover_pixel_dataset
from napari_wsss_cram.core.data.patchify import patchify
from test_data import make_pixel_set


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_gloo_processes_stay_in_sync(tmp_path):
    pixel = make_pixel_set(tmp_path / "px", n=6, size=96, seed=3)
    patchify(discover_pixel_dataset(pixel), tmp_path / "patches", size=(48, 64), overlap=0.5)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "napari_wsss_cram.cli", "train", str(tmp_path / "patches"), "--out", str(out),
           "--config", "sample", "--stage", "1", "--backbone", "resnet18", "--steps", "3", "--batch-size", "2", "--crop", "64",
           "--device", "cpu", "--workers", "0", "--crf-workers", "0", "--threads", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out / "last.pt")  # printed once, by rank 0
    assert proc.stdout.count("last.pt") == 1
    ckpt = torch.load(out / "last.pt", weights_only=True)
    extra = ckpt["extra"]
    assert extra["world_size"] == 2 and extra["step"] == 3
    # every parameter tensor's checksums, all-gathered from both ranks, agree exactly
    assert extra["ranks_param_max_difference"] == 0.0
    steps = [row.split(",")[1] for row in (out / "metrics.csv").read_text().strip().splitlines()[1:]]
    assert steps == ["1", "3"]  # first and last step (log_every 10), written by rank 0 only
