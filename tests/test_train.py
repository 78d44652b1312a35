"""The trainer: presets, events, run folder, cancel + resume (bit-for-bit), stage 2, pseudo-labels, CLI."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import torch

from napari_wsss_cram.cli import main
from napari_wsss_cram.core.checkpoint import load_checkpoint
from napari_wsss_cram.core.crf import CRFParams
from napari_wsss_cram.core.data import discover_patches, discover_pixel_dataset
from napari_wsss_cram.core.data.patchify import patchify
from napari_wsss_cram.core.errors import DatasetError, OutOfMemoryError, TrainingError
from napari_wsss_cram.core.model.config import ModelConfig
from napari_wsss_cram.core.progress import Cancelled, CancelToken
from napari_wsss_cram.core.pseudo_labels import PseudoLabeller
from napari_wsss_cram.core.train import RESUME, load_config, resolve_device, train
from napari_wsss_cram.core.train_config import PRESETS_DIR, TrainConfig, dumps_toml
from napari_wsss_cram.core.train_runtime import atomic_torch_save, is_oom, oom_error
from test_data import make_pixel_set

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

TINY = dict(steps=4, batch_size=4, crop=64, workers=0, crf_workers=0, threads=1, checkpoint_every=100,
            val_every_steps=None, log_every=1)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Synthetic pixel-labelled images and the image-level patches cut from them."""
    root = tmp_path_factory.mktemp("tiny")
    pixel = make_pixel_set(root / "px", n=8, size=120, seed=1)
    patchify(discover_pixel_dataset(pixel), root / "patches", size=(48, 72), overlap=0.5)
    val = make_pixel_set(root / "val", n=2, size=64, seed=7)
    return {"pixel": pixel, "patches": root / "patches", "val": val}


def tiny_config(tiny_data, out, **kw) -> TrainConfig:
    return load_config("sample", data=str(tiny_data["patches"]), out=str(out), **{**TINY, **kw})


def test_defaults_are_the_papers_and_presets_load():
    paper = TrainConfig()
    assert (paper.lr, paper.momentum, paper.weight_decay, paper.batch_size) == (1e-3, 0.9, 2e-4, 8)
    assert (paper.scale_min, paper.scale_max, paper.crop, paper.poly_power) == (2.0, 3.0, 513, 0.9)
    assert paper.mean_scale == 2.5
    preset = load_config("wsss4luad")
    for key in ("lr", "momentum", "weight_decay", "batch_size", "scale_min", "scale_max", "crop"):
        assert getattr(preset, key) == getattr(paper, key)
    assert ModelConfig.from_dict(preset.model).backbone == "resnet50"
    for name in ("cpu-small", "sample"):
        cfg = load_config(name)
        assert ModelConfig.from_dict(cfg.model).backbone == "resnet18"
        assert cfg.crop < 513
    cfg = load_config("cpu-small", backbone="resnet34", batch_size=2)
    assert cfg.model["backbone"] == "resnet34" and cfg.batch_size == 2 and cfg.crop == load_config("cpu-small").crop
    with pytest.raises(DatasetError, match="Unknown training settings"):
        TrainConfig.from_dict({"learning_rate": 1})
    assert resolve_device("cpu").type == "cpu" and resolve_device("auto").type in ("cpu", "cuda", "mps")


def test_a_preset_is_found_by_name_or_path_and_an_unknown_name_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found inside the package, wherever the user runs from
    by_name = load_config("cpu-small")
    assert by_name == load_config(PRESETS_DIR / "cpu-small.toml")
    mine = tmp_path / "mine.toml"
    mine.write_text((PRESETS_DIR / "cpu-small.toml").read_text().replace("crop = 160", "crop = 96"))
    assert load_config(str(mine)).crop == 96 and by_name.crop == 160
    with pytest.raises(DatasetError, match=r"no-such-preset.toml: training config not found.*cpu-small, sample, "
                                           r"wsss4luad"):
        load_config("no-such-preset")


def test_the_written_config_reads_back_the_same():
    config = load_config("sample", data="patches", out="run", val=None, classes=None)
    text = dumps_toml(config.to_dict())
    assert "val =" not in text  # unset settings are left out (TOML has no null)
    assert TrainConfig.from_dict(tomllib.loads(text)) == config


def test_train_events_run_folder_and_checkpoints(tiny_data, tmp_path):
    events = []
    config = tiny_config(tiny_data, tmp_path / "run", val=str(tiny_data["val"]), crf_workers=1, joint_warmup_steps=2)
    best = train(config, callback=events.append)
    phases = [e.phase for e in events]
    assert phases[0] == "data" and "tumor" in events[0].info["summary"]
    train_events = [e for e in events if e.phase == "train"]
    assert [e.done for e in train_events] == [1, 2, 3, 4] and all(e.total == 4 for e in train_events)
    info = train_events[-1].info
    assert set(info) >= {"epoch", "losses", "lr", "eta"} and {"total", "cls", "ce"} <= set(info["losses"])
    assert all(np.isfinite(v) for v in info["losses"].values())
    # warm-up: classification only, no pseudo-labels; then the joint terms and the label coverage appear
    assert all("ce" not in e.info["losses"] and not e.info["pseudo"] for e in train_events[:2])
    assert all(0.0 <= e.info["pseudo"]["confident"] <= 1.0 for e in train_events[2:])
    val = [e for e in events if e.phase == "val"]
    assert len(val) == 1 and 0.0 <= val[0].info["mIoU"] <= 1.0 and set(val[0].info["per_class"]) == {
        "tumor", "stroma", "normal"}
    run = tmp_path / "run"
    assert best == run / "best.pt"
    assert {p.name for p in run.iterdir()} >= {"config.toml", "metrics.csv", "last.pt", "best.pt", RESUME}
    saved = tomllib.loads((run / "config.toml").read_text())
    assert TrainConfig.from_dict(saved) == config
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["kind"] for r in rows] == ["train"] * 4 + ["val"]
    assert rows[0]["loss_ce"] == "" and float(rows[3]["loss_ce"]) >= 0.0  # the ce column appeared at step 3
    assert 0.0 <= float(rows[3]["pseudo_confident"]) <= 1.0
    assert float(rows[-1]["mIoU"]) == pytest.approx(val[0].info["mIoU"], abs=1e-4)
    model, ckpt = load_checkpoint(run / "last.pt")
    assert ckpt.classes.names == ("tumor", "stroma", "normal") and ckpt.model_config.backbone == "resnet18"
    assert ckpt.train_config["crop"] == 64 and ckpt.extra["step"] == 4
    with pytest.raises(DatasetError, match="--resume"):
        train(config)  # the folder holds a run: never overwritten silently


def test_cancel_leaves_usable_checkpoint_and_resume_is_bit_for_bit(tiny_data, tmp_path):
    straight = train(tiny_config(tiny_data, tmp_path / "a", steps=5))
    token = CancelToken()

    def stop_after_two(event):
        if event.phase == "train" and event.done == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        train(tiny_config(tiny_data, tmp_path / "b", steps=5), stop_after_two, token)
    model, info = load_checkpoint(tmp_path / "b" / "last.pt")  # usable after the cancel
    assert info.extra["step"] == 2
    with torch.no_grad():
        probs, _ = model.predict(model.normalize(np.full((1, 32, 32, 3), 128, np.uint8)))
    assert probs.shape == (1, 4, 32, 32)
    resumed = train(tiny_config(tiny_data, tmp_path / "b", steps=5, resume=True))
    a = torch.load(straight, weights_only=True)["state_dict"]
    b = torch.load(resumed, weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "b" / "metrics.csv"))]
    assert steps == sorted(steps) and steps[-1] == 5


def test_resume_state_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / RESUME
    atomic_torch_save({"step": 1}, path)

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(TrainingError, match="Cannot write the checkpoint.*previous checkpoint is untouched"):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == [RESUME]


def test_out_of_memory_says_what_to_lower():
    err = oom_error(TrainConfig(batch_size=8, crop=513), RuntimeError("CUDA out of memory. Tried to allocate"))
    assert isinstance(err, OutOfMemoryError)
    assert "--batch-size" in str(err) and "--crop" in str(err) and "513" in str(err)
    assert is_oom(RuntimeError("CUDA out of memory")) and not is_oom(RuntimeError("shape mismatch"))


def test_pseudo_labeller_pool_matches_in_process():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 4, 24, 24)).astype(np.float32)
    maps[:, :3] *= 1.2
    images = rng.integers(0, 255, (3, 24, 24, 3), dtype=np.uint8)
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1]], np.uint8)
    cfg = ModelConfig().__dict__
    in_step = {**cfg, "crf": CRFParams(backend="torch")}
    # torch backend: in this process whatever crf_workers says; pydensecrf ("auto" on the CPU): a pool
    local, pooled = PseudoLabeller(2, in_step, True), PseudoLabeller(2, cfg, True, "cpu")
    assert PseudoLabeller(2, cfg, True, "cuda").backend == "torch"  # no pool on a GPU (nothing is started)
    try:
        assert local.pool is None and pooled.pool is not None
        a = local.result(local.submit(maps, images, labels))
        b = pooled.result(pooled.submit(maps, images, labels))
        on_tensors = local.label(torch.from_numpy(maps), torch.from_numpy(images), torch.from_numpy(labels))
    finally:
        pooled.close()
    assert a.shape == (3, 24, 24) and a.dtype == np.uint8
    assert np.array_equal(a, on_tensors.numpy())
    assert (a == b).mean() > 0.99  # the two CRF backends (same lattice) agree
    assert not np.isin(a[0], [1, 2]).any()  # absent classes never appear


def test_pseudo_labels_then_stage2_through_cli(tiny_data, tmp_path, capsys):
    stage1 = train(tiny_config(tiny_data, tmp_path / "s1", steps=2))
    patches = tmp_path / "few"
    patches.mkdir()
    for p in discover_patches(tiny_data["patches"]).paths[:6]:
        (patches / p.name).write_bytes(p.read_bytes())
    assert main(["pseudo-labels", str(stage1), str(patches), "--out", str(tmp_path / "pl"), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip().endswith("pl")
    pseudo = discover_pixel_dataset(tmp_path / "pl")
    assert len(pseudo) == 6
    # the paper's labels of the activation maps are one option away
    assert main(["pseudo-labels", str(stage1), str(patches), "--out", str(tmp_path / "pl_maps"), "--device", "cpu",
                 "--source", "maps"]) == 0
    assert len(discover_pixel_dataset(tmp_path / "pl_maps")) == 6
    capsys.readouterr()
    from napari_wsss_cram.core.data import load_pixel_sample

    rgb, mask = load_pixel_sample(pseudo.samples[0], pseudo.classes)
    assert mask.shape == rgb.shape[:2] and set(np.unique(mask)) <= {0, 1, 2, 3, 255}
    rc = main(["train", "--stage2", "--pseudo", str(tmp_path / "pl"), "--pixel-labels", str(tiny_data["val"]),
               "--pixel-weight", "2", "--out", str(tmp_path / "s2"), "--config", "sample", "--steps", "2",
               "--batch-size", "4", "--crop", "64", "--workers", "0", "--threads", "1"])
    assert rc == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    model, info = load_checkpoint(path)
    assert info.model_config.stage == 2 and not model.has_pseudo_branch


def test_cli_train_end_to_end_on_synthetic_patches(tiny_data, tmp_path, capsys, caplog):
    out = tmp_path / "cli"
    rc = main(["train", str(tiny_data["patches"]), "--out", str(out), "--val", str(tiny_data["val"]),
               "--config", "sample", "--stage", "1", "--backbone", "resnet18", "--steps", "3", "--batch-size", "4",
               "--crop", "64", "--device", "cpu", "--workers", "1", "--crf-workers", "1", "--threads", "1"])
    assert rc == 0
    captured = capsys.readouterr()
    printed = captured.out.strip().splitlines()[-1]
    assert printed == str(out / "best.pt")
    assert "starting from resnet18: " in captured.err  # which weights the run starts from
    # the three steps ran (logged: the first, every log_every, the last) and the checkpoints hold the last
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r["kind"] == "train"] == [1, 3]
    assert [int(r["step"]) for r in rows if r["kind"] == "val"][-1] == 3  # validated at the end (best.pt)
    assert load_checkpoint(out / "last.pt")[1].extra["step"] == 3
    assert load_checkpoint(out / "best.pt")[1].extra["step"] == 3
    last_bytes = (out / "last.pt").read_bytes()
    # --resume alone continues with the run's own config.toml; a finished run has nothing left to do, and says so
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="napari_wsss_cram.core.train"):
        rc = main(["train", str(tiny_data["patches"]), "--out", str(out), "--resume", "--steps", "3"])
    assert rc == 0
    assert "already finished (step 3 of 3); nothing left to train" in caplog.text
    assert (out / "last.pt").read_bytes() == last_bytes  # nothing was trained or rewritten
    assert [int(r["step"]) for r in csv.DictReader(open(out / "metrics.csv")) if r["kind"] == "train"] == [1, 3]


def test_cli_train_few_steps_on_the_sample_data(sample_data_dir, tmp_path, capsys):
    rc = main(["train", str(sample_data_dir / "patches"), "--out", str(tmp_path / "run"),
               "--config", "sample", "--stage", "1", "--steps", "2", "--batch-size", "4", "--crop", "64", "--device", "cpu",
               "--workers", "0", "--crf-workers", "0", "--threads", "1"])
    assert rc == 0
    last = tmp_path / "run" / "last.pt"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(last)
    # the two steps ran (one metrics row each) and the checkpoint is the model after the second
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [(r["kind"], int(r["step"])) for r in rows] == [("train", 1), ("train", 2)]
    model, info = load_checkpoint(last)
    assert info.extra["step"] == 2 and info.model_config.stage == 1
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_corrected_masks_are_strong_labels_in_joint_training(tmp_path):
    """patchify(strong_masks=True) crops reach the trainer as pixel labels that override the pseudo-labels;
    the _masks/ crops kept for checking are never trained on."""
    from PIL import Image

    from napari_wsss_cram.core.classes import IGNORE_INDEX, WSSS4LUAD
    from napari_wsss_cram.core.data.augment import AugmentConfig
    from napari_wsss_cram.core.data.patches import PatchDataset
    from napari_wsss_cram.core.io.png import write_index_png
    from napari_wsss_cram.core.pseudo_labels import merge_strong_labels

    root = tmp_path / "corrected"
    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    rgb = np.full((64, 64, 3), 150, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 1
    Image.fromarray(rgb).save(root / "img" / "a.png")
    write_index_png(root / "mask" / "a.png", mask, WSSS4LUAD)
    pixel = discover_pixel_dataset(root, WSSS4LUAD)
    aug = AugmentConfig(1.0, 1.0, 32, False, False, 0.0)

    checked = patchify(pixel, tmp_path / "checked", size=(32, 32), keep_masks=True)
    weak = PatchDataset(discover_patches(checked.out_dir, WSSS4LUAD), aug)
    assert weak.n_strong == 0 and all((item["strong_mask"] == IGNORE_INDEX).all() for item in weak)

    strong = patchify(pixel, tmp_path / "strong", size=(32, 32), strong_masks=True)
    dataset = PatchDataset(discover_patches(strong.out_dir, WSSS4LUAD), aug)
    assert dataset.n_strong == len(dataset) == 4
    for item in dataset:
        labels, i, strong_mask = item["labels"], item["index"], item["strong_mask"]
        name = dataset.index.paths[i].name
        x = int(name.split("-")[2])
        assert (strong_mask == (0 if x < 32 else 1)).all()
        assert labels[0 if x < 32 else 1] == 1
    pseudo = torch.full((2, 4, 4), 3)
    strong_batch = torch.full((2, 4, 4), IGNORE_INDEX)
    strong_batch[0] = 1
    merged = merge_strong_labels(pseudo, strong_batch)
    assert (merged[0] == 1).all() and (merged[1] == 3).all()
