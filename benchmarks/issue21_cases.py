"""Issue 21's failure cases, run against a source tree, printed as a table row each: what happened.

    PYTHONPATH=src python benchmarks/issue21_cases.py --src src            # this tree ("after")
    python benchmarks/issue21_cases.py --src /tmp/orig/src                  # e.g. `git archive` of main ("before")

Each case runs in a fresh subprocess (a crash or a hang is observed, not suffered) on files made in a temporary
folder; the outcome is one of the issue's failure kinds: "inputs destroyed", "wrong files deleted", "crash
(signal N)", "hang", "traceback", "silent wrong result", or "handled: <the message>".
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

PRELUDE = """
import sys, json, numpy as np, tifffile
from pathlib import Path
from PIL import Image
from napari_wsss_cram.cli import main
T = Path(sys.argv[1])
def patch(p, seed=0, size=40):
    p.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(np.clip(np.array([150, 90, 160]) + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)).save(p)
    return p
def pixel_set(root):
    from napari_wsss_cram.core.classes import WSSS4LUAD
    for i in range(2):
        patch(root / "img" / f"i{i}.png", i, 64)
        m = np.zeros((64, 64), np.uint8); m[:, 32:] = 1
        im = Image.fromarray(m, "P"); im.putpalette(WSSS4LUAD.palette()); (root / "mask").mkdir(exist_ok=True)
        im.save(root / "mask" / f"i{i}.png")
    return root
"""


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(src: str, body: str, work: Path, timeout: float = 90, stdin: str | None = None) -> tuple[int | None, str, str]:
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    code = PRELUDE + textwrap.dedent(body)
    argv = [sys.executable, "-"] if stdin is not None else [sys.executable, "-c", code, str(work)]
    try:
        done = subprocess.run(argv, input=stdin if stdin is not None else None, capture_output=True, text=True,
                              env=env, timeout=timeout, cwd=work)
        return done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired:
        return None, "", ""


def _kind(rc: int | None, out: str, err: str) -> str | None:
    if rc is None:
        return "hang (no end within the time limit)"
    if rc < 0:
        return f"crash (signal {-rc}, {signal.Signals(-rc).name})"
    if "Traceback" in err:
        last = [line for line in err.strip().splitlines() if line.strip()][-1]
        return f"traceback ({last[:70]})"
    return None


def _message(err: str, out: str = "") -> str:
    lines = [line for line in (err + out).splitlines() if line.startswith(("error:", "warning:", "note:"))]
    return (lines[0] if lines else (err + out).strip().splitlines()[-1] if (err + out).strip() else "")[:110]


def case_destroy(src: str, work: Path, command: str, where: str) -> str:
    body = f"""
    ckpt = Path(sys.argv[1]).parent / "ckpt.pt"
    base = T / "base"
    if "{command}" == "patchify":
        data = pixel_set(base / "data")
    else:
        data = base / "data"
        for i in range(3):
            patch(data / f"p{{i}}-[1, 0, 0].png", i)
    (base / "beside.txt").write_text("keep me")
    out = data if "{where}" == "input" else base
    argv = ["{command}"] + ([str(ckpt)] if "{command}" == "pseudo-labels" else []) + [str(data), "--out", str(out),
            "--overwrite"] + (["--size", "32"] if "{command}" == "patchify" else ["--device", "cpu", "--scale", "1"])
    sys.exit(main(argv))
    """
    ckpt_link = work.parent / "ckpt.pt"
    assert ckpt_link.exists()
    before_base = work / "base"
    rc, out, err = _run(src, body, work)
    # the inputs as made by the prelude, rebuilt in a clean folder for comparison
    ref = work.parent / f"ref-{command}"
    if not ref.exists():
        _run(src, body.replace('argv = [', 'sys.exit(0); argv = ['), ref.mkdir() or ref)
    lost = {k: v for k, v in _digest(ref / "base").items() if _digest(before_base).get(k) != v}
    if lost:
        return f"inputs destroyed ({len(lost)} of {len(_digest(ref / 'base'))} files gone or changed)"
    return _kind(rc, out, err) or f"handled: {_message(err, out)}"


def case_duplicate_names(src: str, work: Path) -> str:
    body = """
    ckpt = Path(sys.argv[1]).parent / "ckpt.pt"
    patch(T / "patches" / "tumor" / "a.png", 1); patch(T / "patches" / "stroma" / "a.png", 2)
    sys.exit(main(["pseudo-labels", str(ckpt), str(T / "patches"), "--out", str(T / "pl"), "--device", "cpu",
                   "--scale", "1"]))
    """
    rc, out, err = _run(src, body, work)
    a, b = (work / "patches" / "tumor" / "a.png").read_bytes(), (work / "patches" / "stroma" / "a.png").read_bytes()
    if a == b:
        return "inputs destroyed (tumor/a.png now holds stroma/a.png's pixels)"
    return _kind(rc, out, err) or f"handled: {_message(err, out)}"


def case_recovery_space(src: str, work: Path) -> str:
    body = """
    ckpt = Path(sys.argv[1]).parent / "ckpt.pt"
    patch(T / "img" / "slide.png", 2); patch(T / "img" / "my slide.png", 1)
    out = T / "out"
    fmt = ["--format", "png,geojson", "--scale", "1"]
    assert main(["predict", str(ckpt), str(T / "img" / "slide.png"), "--out", str(out)] + fmt) == 0
    names = ["my slide.png", "my slide.geojson", "my slide_composition.json"]
    (out / ".my slide.renaming").write_text("\\n".join(names))
    (out / "my slide.png").write_bytes(b"half")
    (out / "predict_summary.csv").unlink()
    sys.exit(main(["predict", str(ckpt), str(T / "img" / "slide.png"), "--out", str(T / "other")] + fmt)
             or main(["predict", str(ckpt), str(T / "img" / "slide.png"), "--out", str(out), "--overwrite"] + fmt))
    """
    rc, out, err = _run(src, body, work)
    kind = _kind(rc, out, err)
    if kind:
        return kind
    gone = not (work / "out" / "slide.png").exists() or not (work / "out" / "slide.geojson").exists()
    kept = (work / "out" / "my slide.png").exists() and (work / "out" / "my slide.png").read_bytes() == b"half"
    if gone or kept:
        return "wrong files deleted" + (" (a finished result)" if gone else "") + (" (the leftover kept)" if kept else "")
    return "handled: the leftover set removed, the finished result kept"


def case_cli(src: str, work: Path, argv_py: str, check: str = "", timeout: float = 90) -> str:
    body = f"""
    ckpt = Path(sys.argv[1]).parent / "ckpt.pt"
    img = patch(T / "p.png", 0, 48)
    rc = main({argv_py})
    {check}
    sys.exit(rc)
    """
    rc, out, err = _run(src, body, work, timeout)
    kind = _kind(rc, out, err)
    if kind:
        return kind
    if "SILENT" in out:
        return "silent wrong result (" + out.split("SILENT", 1)[1].strip().splitlines()[0][:80] + ")"
    return f"handled: {_message(err, out)}" if rc else f"accepted (rc 0) {_message(err, out)}"


def case_sigterm_crf(src: str, work: Path) -> str:
    body = """
    import time
    from napari_wsss_cram.cli import _stop_on_sigterm
    from napari_wsss_cram.core.crf import CRFParams, dense_crf
    _stop_on_sigterm()
    from napari_wsss_cram.core.sample import make_patch
    rng = np.random.default_rng(0)
    image = np.ascontiguousarray(make_patch(0, 512, (0, 1))[0][..., :3], dtype=np.uint8)  # H&E-like, not noise
    probs = rng.dirichlet([1.0, 1.0, 1.0], (512, 512)).transpose(2, 0, 1).astype(np.float32)
    try:
        params = CRFParams(iterations=100000, backend="pydensecrf")
    except Exception:
        params = CRFParams(iterations=100, backend="pydensecrf")
    print("ready", flush=True)
    dense_crf(image, probs, params)
    """
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(body), str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    proc.stdout.readline()
    time.sleep(1.0)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return "hang (SIGTERM not acted on within 20 s)"
    return f"handled: stopped {time.perf_counter() - sent:.2f} s after SIGTERM"


def case_stdin_helper(src: str, work: Path) -> str:
    script = """
import numpy as np, time
from napari_wsss_cram.core.crf import dense_crf_isolated, CRFParams
img = np.zeros((64, 64, 3), np.uint8); p = np.full((2, 64, 64), 0.5, np.float32)
print(dense_crf_isolated(img, p, CRFParams(backend="pydensecrf")).shape)
"""
    rc, out, err = _run(src, "", work, 60, stdin=script)
    notes = [line for line in err.splitlines() if "helper process could not start" in line]
    if rc == 0 and notes and "(2, 64, 64)" in out:  # (the spawned child still prints its own traceback)
        return f"handled: result computed in-process; {notes[0][:90]}"
    return _kind(rc, out, err) or f"rc {rc}: {_message(err, out)}"


CASES = {
    "patchify --overwrite, --out = input": lambda s, w: case_destroy(s, w, "patchify", "input"),
    "patchify --overwrite, --out = parent": lambda s, w: case_destroy(s, w, "patchify", "parent"),
    "pseudo-labels --overwrite, --out = input": lambda s, w: case_destroy(s, w, "pseudo-labels", "input"),
    "pseudo-labels --overwrite, --out = parent": lambda s, w: case_destroy(s, w, "pseudo-labels", "parent"),
    "pseudo-labels, same file name in 2 class folders": case_duplicate_names,
    "kill -9 mid-rename, output name with a space": case_recovery_space,
    "--crf-params bilateral_sxy=nan": lambda s, w: case_cli(s, w, '["predict", str(ckpt), str(img), "--out", '
                                                            'str(T/"o"), "--scale", "1", "--crf", "--crf-params", '
                                                            '"bilateral_sxy=nan,backend=pydensecrf"]'),
    "--crf-params gaussian_sxy=0": lambda s, w: case_cli(s, w, '["predict", str(ckpt), str(img), "--out", '
                                                         'str(T/"o"), "--scale", "1", "--crf", "--crf-params", '
                                                         '"gaussian_sxy=0,bilateral_sxy=0,backend=pydensecrf"]'),
    "--crf-params iterations=-1": lambda s, w: case_cli(s, w, '["predict", str(ckpt), str(img), "--out", '
                                                        'str(T/"o"), "--scale", "1", "--crf", "--crf-params", '
                                                        '"iterations=-1"]', 'print("SILENT: CRF skipped, rc", rc) '
                                                        'if rc == 0 else None'),
    "SIGTERM during a huge CRF": case_sigterm_crf,
    "--tissue-threshold -5": lambda s, w: case_cli(s, w, '["predict", str(ckpt), str(img), "--out", str(T/"o"), '
                                                   '"--scale", "1", "--tissue-threshold", "-5", "--format", "png"]',
                                                   'm = np.array(Image.open(T/"o"/"p.png")) if rc == 0 else None\n'
                                                   '    print("SILENT: all background") if m is not None and '
                                                   '(m == 3).all() else None'),
    "patchify --min-frac -0.1": lambda s, w: case_cli(s, w, '["patchify", str(pixel_set(T/"d")), "--out", '
                                                      'str(T/"o"), "--size", "32", "--min-frac", "-0.1"]',
                                                      'print("SILENT: every class in every patch") if rc == 0 '
                                                      'else None'),
    "pseudo-labels --scale nan": lambda s, w: case_cli(s, w, '["pseudo-labels", str(ckpt), str(patch(T/"ps"/'
                                                       '"a-[1, 0, 0].png").parent), "--out", str(T/"o"), "--scale",'
                                                       ' "nan", "--device", "cpu"]'),
    "pseudo-labels --scale -1": lambda s, w: case_cli(s, w, '["pseudo-labels", str(ckpt), str(patch(T/"ps"/'
                                                      '"a-[1, 0, 0].png").parent), "--out", str(T/"o"), "--scale",'
                                                      ' "-1", "--device", "cpu"]',
                                                      'print("SILENT: written at scale -1") if rc == 0 else None'),
    "a file claiming 0.0001 µm/px": lambda s, w: case_tiny_mpp(s, w),
    "--mpp implying 80x up-sampling": lambda s, w: case_cli(
        s, w, '["predict", str(ckpt), str(tifffile.imwrite(T/"c.ome.tif", np.full((48, 48, 3), 120, np.uint8), '
              'photometric="rgb", ome=True, metadata={"PhysicalSizeX": 4.0, "PhysicalSizeY": 4.0}) or T/"c.ome.tif"),'
              ' "--out", str(T/"o"), "--mpp", "0.05", "--format", "png"]',
        'print("SILENT: up-sampled", np.array(Image.open(T/"o"/"c.png")).shape) if rc == 0 else None', timeout=120),
    "palette mask with reordered palette": lambda s, w: case_palette(s, w),
    "patchify --out that is a file": lambda s, w: case_cli(s, w, '["patchify", str(pixel_set(T/"d")), "--out", '
                                                           'str((T/"f").write_text("x") and T/"f")]'),
    "pseudo-labels --out that is a file": lambda s, w: case_cli(s, w, '["pseudo-labels", str(ckpt), str(patch(T/'
                                                                '"ps"/"a-[1, 0, 0].png").parent), "--out", '
                                                                'str((T/"f").write_text("x") and T/"f"), "--device",'
                                                                ' "cpu", "--scale", "1"]'),
    "geojson-to-mask --shape 200000x200000": lambda s, w: case_cli(s, w, '["geojson-to-mask", str((T/"a.geojson")'
                                                                   '.write_text(\'{"type": "FeatureCollection", '
                                                                   '"features": []}\') and T/"a.geojson"), "--shape",'
                                                                   ' "200000x200000", "--out", str(T/"m.png")]'),
    "--device meta": lambda s, w: case_cli(s, w, '["predict", str(ckpt), str(img), "--out", str(T/"o"), "--scale",'
                                           ' "1", "--device", "meta"]'),
    "CRF helper, script on standard input": case_stdin_helper,
}


def case_palette(src: str, work: Path) -> str:
    body = """
    from napari_wsss_cram.core.classes import WSSS4LUAD
    from napari_wsss_cram.core.data.pixel import PixelSample, load_mask
    idx = np.zeros((4, 4), np.uint8); idx[:, 2:] = 1
    im = Image.fromarray(idx, "P")
    im.putpalette(list(WSSS4LUAD.all_colors[1]) + list(WSSS4LUAD.all_colors[0]) + [0] * 762)
    im.save(T / "m.png")
    got = load_mask(PixelSample(T / "i.png", T / "m.png"), WSSS4LUAD)
    print("SILENT: stroma-coloured pixels read as tumor" if got[0, 0] == 0 else "ok: read by colour")
    """
    rc, out, err = _run(src, body, work)
    kind = _kind(rc, out, err)
    if kind:
        return kind
    return ("silent wrong result (" + out.split("SILENT: ")[1].strip() + ")") if "SILENT" in out \
        else f"handled: {out.strip()}"


def case_tiny_mpp(src: str, work: Path) -> str:
    body = """
    import warnings
    from napari_wsss_cram.core.io.images import ImageSource
    tifffile.imwrite(T / "t.ome.tif", np.full((32, 32, 3), 120, np.uint8), photometric="rgb", ome=True,
                     metadata={"PhysicalSizeX": 0.0001, "PhysicalSizeY": 0.0001})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ImageSource.open(T / "t.ome.tif") as s:
            mpp = s.mpp
    if mpp is not None:
        print(f"SILENT: used as {mpp} µm/px")
    else:
        print("ok:", [str(w.message) for w in caught][:1])
    """
    rc, out, err = _run(src, body, work)
    kind = _kind(rc, out, err)
    if kind:
        return kind
    return ("silent wrong result (" + out.split("SILENT: ")[1].strip() + ")") if "SILENT" in out \
        else f"handled: warning {out.strip()[4:110]}"



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="the src/ folder of the tree to test")
    parser.add_argument("--only", default="", help="run the cases whose name holds this text")
    args = parser.parse_args(argv)
    src = str(Path(args.src).resolve())
    with tempfile.TemporaryDirectory() as root_name:
        root = Path(root_name)
        # one tiny checkpoint, written by the tree under test
        _run(src, """
        import torch
        from napari_wsss_cram.core.checkpoint import save_checkpoint
        from napari_wsss_cram.core.classes import WSSS4LUAD
        from napari_wsss_cram.core.model.config import ModelConfig
        from napari_wsss_cram.core.model.cram import CRAMNet
        torch.manual_seed(0)
        save_checkpoint(T.parent / "ckpt.pt", CRAMNet(WSSS4LUAD, ModelConfig(backbone="resnet18", output_stride=16,
                        aspp_channels=8, attention_dim=8), weights=None))
        """, (root / "setup").mkdir() or root / "setup")
        print("| case | outcome |\n|---|---|")
        for i, (name, case) in enumerate(CASES.items()):
            if args.only and args.only not in name:
                continue
            work = root / f"case{i}"
            work.mkdir()
            t0 = time.perf_counter()
            outcome = case(src, work)
            print(f"| {name} | {outcome} ({time.perf_counter() - t0:.0f} s) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
