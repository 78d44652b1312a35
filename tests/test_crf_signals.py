"""Issue 21, item 3: signals reach the CRF. Cancel and SIGTERM stop it within a second on both backends; a CRF
helper process that cannot start is reported with the reason and the work runs in-process; CRF settings that
crashed (NaN or 0 widths: SIGSEGV) or were silently ignored (negative iterations) are refused by name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from napari_wsss_cram.core.crf import CRFParams, dense_crf, dense_crf_isolated
from napari_wsss_cram.core.errors import WsssCramError
from napari_wsss_cram.core.progress import Cancelled, CancelToken

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _inputs(side: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic H&E image (real images build the CRF's lattice in ~0.1 s; white noise takes seconds, and
    that build is one C++ call) and random class probabilities."""
    from napari_wsss_cram.core.sample import make_patch

    rng = np.random.default_rng(0)
    image = np.ascontiguousarray(make_patch(0, side, (0, 1))[0][..., :3], dtype=np.uint8)
    probs = rng.dirichlet([1.0, 1.0, 1.0], (side, side)).transpose(2, 0, 1).astype(np.float32)
    return image, probs


@pytest.mark.parametrize("backend", ["pydensecrf", "torch"])
@pytest.mark.parametrize("isolated", [False, True])
def test_cancel_stops_a_long_crf_within_a_second(backend, isolated):
    image, probs = _inputs(384)
    params = CRFParams(iterations=100, backend=backend)  # ~5 s of work per call on one core
    token = CancelToken()
    run = dense_crf_isolated if isolated else dense_crf
    # the kernels' lattice is built in one call before the iterations (torch on a loaded CPU: ~1-2 s for 384²);
    # what must stop within a second is the iterating, so the cancel comes after a build's time (and starts the
    # helper process before the timing)
    t0 = time.perf_counter()
    run(image, probs, CRFParams(iterations=1, backend=backend))
    build = time.perf_counter() - t0
    cancelled_at: list[float] = []

    def cancel_soon() -> None:
        time.sleep(build + 0.5)
        cancelled_at.append(time.perf_counter())
        token.cancel()

    threading.Thread(target=cancel_soon, daemon=True).start()
    with pytest.raises(Cancelled):
        run(image, probs, params, cancel=token)
    assert time.perf_counter() - cancelled_at[0] < 1.0


@pytest.mark.parametrize("backend", ["pydensecrf", "torch"])
def test_sigterm_stops_a_long_crf_within_a_second(backend):
    script = f"""
import sys, time
import numpy as np
from napari_wsss_cram.cli import _stop_on_sigterm
from napari_wsss_cram.core.crf import CRFParams, dense_crf
_stop_on_sigterm()
from napari_wsss_cram.core.sample import make_patch
rng = np.random.default_rng(0)
image = np.ascontiguousarray(make_patch(0, 384, (0, 1))[0][..., :3], dtype=np.uint8)
probs = rng.dirichlet([1.0, 1.0, 1.0], (384, 384)).transpose(2, 0, 1).astype(np.float32)
t0 = time.perf_counter()
dense_crf(image, probs, CRFParams(iterations=1, backend="{backend}"))  # the lattice build's time (one call)
print("ready", time.perf_counter() - t0, flush=True)
try:
    while True:  # never ends by itself: 100 iterations at a time
        dense_crf(image, probs, CRFParams(iterations=100, backend="{backend}"))
except KeyboardInterrupt:
    print("stopped", flush=True)
    sys.exit(130)
print("finished", flush=True)
"""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        word, build = proc.stdout.readline().split()
        assert word == "ready"
        time.sleep(float(build) + 0.5)  # SIGTERM while iterating (the lattice build is one uninterruptible call)
        sent = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        elapsed = time.perf_counter() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "stopped" in out, err
    # within a second of iterating, plus the interpreter's exit; the signal may land in a lattice build (one call)
    assert elapsed < 1.5 + (float(build) if backend == "torch" else 0.0)


def test_a_crf_helper_that_cannot_start_is_reported_and_the_crf_runs_in_process(tmp_path):
    # a script fed to python on standard input: spawn cannot re-import its main module (the helper dies at once)
    script = """
import logging, numpy as np
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from napari_wsss_cram.core.crf import CRFParams, dense_crf, dense_crf_isolated
rng = np.random.default_rng(0)
image = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
probs = rng.dirichlet([1.0, 1.0], (48, 48)).transpose(2, 0, 1).astype(np.float32)
params = CRFParams(backend="pydensecrf")
same = np.allclose(dense_crf_isolated(image, probs, params), dense_crf(image, probs, params), atol=1e-6)
print("same result" if same else "different result")
"""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "same result" in done.stdout
    assert "The CRF helper process could not start (the main script '<stdin>'" in done.stderr
    assert "runs in this process instead" in done.stderr


@pytest.mark.parametrize("setting", ["bilateral_sxy=nan", "gaussian_sxy=0", "bilateral_srgb=0", "iterations=-1",
                                     "iterations=1000000000", "bilateral_compat=inf", "gaussian_compat=-3"])
def test_crf_settings_that_crashed_or_were_ignored_are_refused(setting):
    from napari_wsss_cram.commands.predict import _parse_crf_params

    name = setting.split("=")[0]
    with pytest.raises(WsssCramError, match=rf"{name} must be"):
        _parse_crf_params(setting)


def test_crf_params_with_nan_widths_on_the_command_line_give_a_message(tmp_path, capsys):
    from PIL import Image

    from napari_wsss_cram.cli import main

    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(tmp_path / "p.png")
    ckpt = tmp_path / "missing.pt"  # the settings are refused before the checkpoint is even read
    for bad in ("bilateral_sxy=nan", "gaussian_sxy=0", "iterations=-1"):
        assert main(["predict", str(ckpt), str(tmp_path / "p.png"), "--out", str(tmp_path / "out"), "--crf",
                     "--crf-params", bad, "--scale", "1"]) == 2
        assert "must be" in capsys.readouterr().err
