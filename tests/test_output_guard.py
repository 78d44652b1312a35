"""Issue 21, item 1: one output guard for every command that writes. For each command, ``--out`` = the input
and ``--out`` = a folder above the input, with and without ``--overwrite``, leave the inputs byte-identical;
``--overwrite`` replaces only the command's own outputs, by name; recovery after kill -9 reads its markers
exactly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_wsss_cram.cli import main
from napari_wsss_cram.core.checkpoint import save_checkpoint
from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.io.guard import MANIFEST_NAME
from napari_wsss_cram.core.model.config import ModelConfig
from napari_wsss_cram.core.model.cram import CRAMNet
from test_data import make_pixel_set


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = CRAMNet(WSSS4LUAD, ModelConfig(backbone="resnet18", output_stride=16, aspp_channels=16,
                                           attention_dim=16), weights=None)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", model)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (recursively) -> its SHA-256: "byte-identical" is this dict being equal."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _patch(path: Path, seed: int = 0, size: int = 40) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((size, size, 3)) * 180).astype(np.uint8)).save(path)
    return path


def _patch_set(root: Path) -> Path:
    for i, flags in enumerate(("1, 0, 0", "0, 1, 0", "1, 1, 0")):
        _patch(root / f"p{i}-[{flags}].png", seed=i)
    return root


def _runs(argv_for, out_in: Path, out_above: Path) -> list[list[str]]:
    return [argv_for(out) + extra for out in (out_in, out_above) for extra in ([], ["--overwrite"])]


# ------------------------------------------------------------------------------------------------ per command

def test_predict_never_writes_into_its_input_folder_and_spares_it_from_above(tmp_path, checkpoint, capsys):
    data = tmp_path / "base" / "data"
    for i in range(2):
        _patch(data / f"p{i}.png", seed=i)
    before = snapshot(data)
    for out, overwrite in ((data, []), (data, ["--overwrite"])):
        assert main(["predict", str(checkpoint), str(data), "--out", str(out), "--scale", "1"] + overwrite) == 2
        assert "input" in capsys.readouterr().err
        assert snapshot(data) == before
    # a folder above the input takes outputs beside it, by name; the input folder is untouched
    argv = ["predict", str(checkpoint), str(data), "--out", str(data.parent), "--scale", "1", "--format", "png"]
    for extra, code in (([], 0), ([], 2), (["--overwrite"], 0)):  # the second: the outputs exist
        assert main(argv + extra) == code
        capsys.readouterr()
        assert snapshot(data) == before
    assert (data.parent / "p0.png").is_file()


def test_patchify_overwrite_never_deletes_the_input_set(tmp_path, capsys):
    base = tmp_path / "base"
    data = make_pixel_set(base / "data", n=2, size=64)
    (base / "notes.txt").write_text("a file beside the data set", encoding="utf-8")
    before, beside = snapshot(data), snapshot(base)
    for argv in _runs(lambda out: ["patchify", str(data), "--out", str(out), "--size", "32"], data, base):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err
        assert snapshot(data) == before and snapshot(base) == beside


def test_patchify_overwrite_replaces_only_its_own_set_by_name(tmp_path, capsys):
    data = make_pixel_set(tmp_path / "data", n=2, size=64)
    out = tmp_path / "patches"
    assert main(["patchify", str(data), "--out", str(out), "--size", "32"]) == 0
    first = sorted((out / MANIFEST_NAME).read_text(encoding="utf-8").split("\n"))
    assert main(["patchify", str(data), "--out", str(out), "--size", "48", "--overwrite"]) == 0
    # the first set's files are gone (not mixed into the second), the manifest lists exactly what is there
    listed = [n for n in (out / MANIFEST_NAME).read_text(encoding="utf-8").split("\n") if n]
    assert sorted(listed) == sorted(k for k in snapshot(out) if not k.startswith(".")) and listed != first
    # a file someone else put there is never deleted: the folder is refused, even with --overwrite
    (out / "mine.png").write_bytes(b"not a patch")
    capsys.readouterr()
    assert main(["patchify", str(data), "--out", str(out), "--size", "32", "--overwrite"]) == 2
    assert "did not write (mine.png)" in capsys.readouterr().err
    assert (out / "mine.png").read_bytes() == b"not a patch"


def test_an_output_folder_that_is_a_file_is_refused_by_patchify(tmp_path, capsys):
    data = make_pixel_set(tmp_path / "data", n=1, size=64)
    blocker = tmp_path / "out"
    blocker.write_text("x", encoding="utf-8")
    assert main(["patchify", str(data), "--out", str(blocker)]) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err and blocker.read_text() == "x"


def test_pseudo_labels_overwrite_never_deletes_the_input_patches(tmp_path, checkpoint, capsys):
    base = tmp_path / "base"
    patches = _patch_set(base / "patches")
    before, beside = snapshot(patches), snapshot(base)
    for argv in _runs(lambda out: ["pseudo-labels", str(checkpoint), str(patches), "--out", str(out),
                                   "--device", "cpu", "--scale", "1"], patches, base):
        assert main(argv) == 2, argv
        assert "Traceback" not in capsys.readouterr().err
        assert snapshot(patches) == before and snapshot(base) == beside


def test_pseudo_labels_of_patches_sharing_a_file_name_never_write_into_an_input(tmp_path, checkpoint, capsys):
    patches = tmp_path / "patches"
    _patch(patches / "tumor" / "a.png", seed=1)
    _patch(patches / "stroma" / "a.png", seed=2)  # the same file name in another class folder
    before = snapshot(patches)
    assert main(["pseudo-labels", str(checkpoint), str(patches), "--out", str(tmp_path / "pl"), "--device", "cpu",
                 "--scale", "1"]) == 2
    assert "share the name 'a'" in capsys.readouterr().err
    assert snapshot(patches) == before


def test_pseudo_labels_overwrite_replaces_its_own_set_and_keeps_the_inputs(tmp_path, checkpoint, capsys):
    patches = _patch_set(tmp_path / "patches")
    before = snapshot(patches)
    out = tmp_path / "pl"
    argv = ["pseudo-labels", str(checkpoint), str(patches), "--out", str(out), "--device", "cpu", "--scale", "1"]
    assert main(argv) == 0
    assert main(argv) == 2  # an earlier set: only with --overwrite
    assert main(argv + ["--overwrite"]) == 0
    assert snapshot(patches) == before  # img/ holds hard links: replacing them never touched the inputs
    assert sorted(p.name for p in (out / "mask").iterdir()) == sorted(p.stem + ".png" for p in patches.iterdir())


def test_train_refuses_a_run_folder_inside_its_data(tmp_path, capsys):
    patches = _patch_set(tmp_path / "patches")
    before = snapshot(patches)
    for out in (patches, patches / "run"):
        assert main(["train", str(patches), "--out", str(out), "--config", "sample", "--steps", "1",
                     "--weights", "none", "--device", "cpu"]) == 2
        assert "run folder (--out)" in capsys.readouterr().err
        assert snapshot(patches) == before


def test_evaluate_never_writes_its_json_onto_or_into_an_input(tmp_path, checkpoint, capsys):
    data = make_pixel_set(tmp_path / "base" / "data", n=1, size=48)
    before, ckpt = snapshot(data), checkpoint.read_bytes()
    for target in (data / "scores.json", checkpoint):
        for overwrite in ([], ["--overwrite"]):
            assert main(["evaluate", str(checkpoint), str(data), "--json", str(target), "--device", "cpu",
                         "--scale", "1"] + overwrite) == 2
            assert "input" in capsys.readouterr().err
    assert snapshot(data) == before and checkpoint.read_bytes() == ckpt
    # a folder above the data is fine: a file by name, beside the input
    assert main(["evaluate", str(checkpoint), str(data), "--json", str(data.parent / "scores.json"), "--device",
                 "cpu", "--scale", "1"]) == 0
    assert "mIoU" in json.loads((data.parent / "scores.json").read_text()) and snapshot(data) == before


def test_geojson_to_mask_never_writes_onto_its_inputs(tmp_path, capsys):
    folder = tmp_path / "slides"
    image = _patch(folder / "image.png", size=64)
    geojson = folder / "notes.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"classification": {"name": "Tumor"}},
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [30, 0], [30, 30], [0, 30], [0, 0]]]}}]}))
    before = snapshot(folder)
    for target in (image, geojson, folder):
        for overwrite in ([], ["--overwrite"]):
            assert main(["geojson-to-mask", str(geojson), "--image", str(image), "--out", str(target)]
                        + overwrite) == 2
            assert "Traceback" not in capsys.readouterr().err
    assert snapshot(folder) == before
    assert main(["geojson-to-mask", str(geojson), "--image", str(image), "--out", str(folder / "mask.png")]) == 0
    assert snapshot(folder).items() >= before.items()


def test_geojson_to_mask_refuses_an_absurd_shape_with_a_message(tmp_path, capsys):
    geojson = tmp_path / "a.geojson"
    geojson.write_text('{"type": "FeatureCollection", "features": []}')
    for shape in ("99999999x99999999", "200000x200000"):
        assert main(["geojson-to-mask", str(geojson), "--shape", shape, "--out", str(tmp_path / "m.png")]) == 2
        err = capsys.readouterr().err
        assert ("exceeds" in err or "--downsample" in err) and "Traceback" not in err


def test_make_sample_data_never_deletes_files_it_did_not_write(tmp_path, capsys):
    data = tmp_path / "mydata"
    _patch(data / "patches" / "case1-[1, 0, 0].png")
    _patch(data / "validation" / "img" / "07.png", seed=3)
    (data / "README.md").write_text("# my project\n", encoding="utf-8")
    before = snapshot(data)
    for out in (data, data / "patches"):
        assert main(["make-sample-data", "--out", str(out), "--slide-size", "0", "--n-patches", "2",
                     "--n-validation", "1"]) == 2
        assert "did not write" in capsys.readouterr().err
        assert snapshot(data) == before
    # its own folder is regenerated in place, by name
    own = tmp_path / "sample"
    argv = ["make-sample-data", "--out", str(own), "--slide-size", "0", "--n-patches", "2", "--n-validation", "1"]
    assert main(argv) == 0
    first = snapshot(own)
    assert main(argv) == 0 and snapshot(own) == first


# ------------------------------------------------------------------------------------------- kill -9 recovery

def test_recovery_after_kill_9_with_a_space_in_an_output_name_deletes_only_that_set(tmp_path, checkpoint, capsys):
    images = tmp_path / "img"
    _patch(images / "my slide.png", seed=1)
    _patch(images / "slide.png", seed=2)
    out = tmp_path / "out"
    fmt = ["--format", "png,geojson", "--scale", "1"]
    assert main(["predict", str(checkpoint), str(images / "slide.png"), "--out", str(out)] + fmt) == 0
    finished = snapshot(out)
    # what kill -9 leaves while "my slide" is renamed into place: its marker and its PNG moved, the rest not
    names = ["my slide.png", "my slide.geojson", "my slide_composition.json"]
    (out / ".my slide.renaming").write_text("\n".join(names), encoding="utf-8")
    (out / "my slide.png").write_bytes(b"half of a set")
    (out / "predict_summary.csv").unlink()
    assert main(["predict", str(checkpoint), str(images / "my slide.png"), "--out", str(out)] + fmt) == 0
    assert "removed what an interrupted run left in" in capsys.readouterr().err
    after = snapshot(out)
    # the other input's finished result is kept, byte for byte; the leftover was removed and predicted again
    assert {k: after[k] for k in ("slide.png", "slide.geojson", "slide_composition.json")} == \
        {k: finished[k] for k in ("slide.png", "slide.geojson", "slide_composition.json")}
    assert (out / "my slide.png").read_bytes() != b"half of a set"
    assert not (out / ".my slide.renaming").exists()


def test_a_full_disk_during_patchify_is_a_message_and_keeps_the_earlier_set(tmp_path, capsys, monkeypatch):
    import errno

    data = make_pixel_set(tmp_path / "data", n=2, size=64)
    out = tmp_path / "patches"
    assert main(["patchify", str(data), "--out", str(out), "--size", "32"]) == 0
    earlier = snapshot(out)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    capsys.readouterr()
    assert main(["patchify", str(data), "--out", str(out), "--size", "48", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "Traceback" not in err
    assert snapshot(out) == earlier  # the earlier set is whole; no build folder is left


def test_export_model_never_writes_its_package_onto_the_checkpoint_it_exports(tmp_path, checkpoint, capsys):
    package = tmp_path / "shared_model.zip"  # a lab's exported package, given back as the checkpoint to export
    package.write_bytes(checkpoint.read_bytes())
    before = package.read_bytes()
    for overwrite in ([], ["--overwrite"]):
        assert main(["export-model", str(package), "--out", str(package), "--author", "A Person",
                     "--license", "MIT", *overwrite]) == 2
        assert "input" in capsys.readouterr().err
    assert package.read_bytes() == before
