"""The one-command recipe: joint model -> pseudo-labels -> segmentation rounds -> final.pt, on the synthetic sample."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from napari_wsss_cram.cli import main
from napari_wsss_cram.core.checkpoint import load_checkpoint, resolve_checkpoint_path
from napari_wsss_cram.core.errors import CheckpointError, DatasetError
from napari_wsss_cram.core.io.png import read_index_png
from napari_wsss_cram.core.progress import Cancelled, CancelToken, drive
from napari_wsss_cram.core.recipe import is_resumable, stage_minutes, train_recipe_steps
from napari_wsss_cram.core.train_config import load_config

FAST = ["--steps", "2", "--batch-size", "4", "--crop", "64", "--device", "cpu", "--workers", "0",
        "--crf-workers", "0", "--threads", "1", "--weights", "none"]


@pytest.fixture(scope="module")
def few_patches(sample_data_dir, tmp_path_factory):
    """Twelve patches of the synthetic sample (pseudo-labelling all 240 would only make the test slower)."""
    folder = tmp_path_factory.mktemp("few")
    for path in sorted((sample_data_dir / "patches").glob("*.png"))[:12]:
        shutil.copy2(path, folder / path.name)
    return folder


@pytest.mark.slow
def test_one_command_trains_the_whole_recipe_and_predict_uses_its_final_model(few_patches, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(few_patches), "--out", str(run), "--config", "sample", "--rounds", "2",
                 "--pseudo-refine", "stain", *FAST]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(run / "final.pt")
    assert 'pseudo_refine = "stain"' in (run / "config.toml").read_text()
    for heading in ("stage 1/3: the joint model", "stage 2/3: pseudo-labels for segmentation round 1",
                    "stage 3/3: segmentation round 2"):
        assert heading in captured.err
    # the joint model, then two segmentation rounds, each on the previous model's pseudo-labels of every patch
    assert load_checkpoint(run / "joint" / "last.pt")[1].model_config.stage == 1
    for name in ("round1", "round2"):
        assert load_checkpoint(run / name / "last.pt")[1].model_config.stage == 2
        assert len(list((run / f"{name}-pseudo" / "mask").glob("*.png"))) == 12
        config = (run / name / "config.toml").read_text()
        assert f'pseudo = "{run / f"{name}-pseudo"}"' in config and "stage2 = true" in config
    log = json.loads((run / "recipe.json").read_text())
    assert list(log["finished"]) == ["joint", "round1", "round2"]
    # final.pt is the last round's model, and a run folder given as the checkpoint means it
    final = torch.load(run / "final.pt", weights_only=True)["state_dict"]
    last = torch.load(run / "round2" / "last.pt", weights_only=True)["state_dict"]
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert resolve_checkpoint_path(run) == run / "final.pt"
    image = next(few_patches.glob("*.png"))
    assert main(["predict", str(run), str(image), "--out", str(tmp_path / "by_run"), "--scale", "1"]) == 0
    assert main(["predict", str(run / "round2" / "last.pt"), str(image), "--out", str(tmp_path / "by_file"),
                 "--scale", "1"]) == 0
    by_run = read_index_png(tmp_path / "by_run" / image.name)
    by_file = read_index_png(tmp_path / "by_file" / image.name)
    assert np.array_equal(by_run, by_file)
    # a finished recipe is not resumable, and a new run into its folder is refused
    assert not is_resumable(run)
    with pytest.raises(DatasetError, match="already holds a run"):
        drive(train_recipe_steps(load_config("sample", data=str(few_patches), out=str(run), steps=2)))


@pytest.mark.slow
def test_a_stopped_recipe_resumes_after_its_finished_stages(few_patches, tmp_path):
    run = tmp_path / "run"
    config = load_config("sample", data=str(few_patches), out=str(run), steps=2, batch_size=4, crop=64,
                         device="cpu", workers=0, crf_workers=0, threads=1, weights="none", rounds=1)
    cancel = CancelToken()

    def stop_in_round1(event) -> None:
        if event.phase == "train" and event.info["recipe"]["name"] == "round1":
            cancel.cancel()

    with pytest.raises(Cancelled):
        drive(train_recipe_steps(config, cancel), stop_in_round1)
    assert not (run / "final.pt").exists() and is_resumable(run)
    joint_mtime = (run / "joint" / "last.pt").stat().st_mtime_ns
    # a stopped recipe's folder stands for its latest usable model
    assert resolve_checkpoint_path(run) == run / "round1" / "last.pt"
    events = []
    final = drive(train_recipe_steps(config.updated(resume=True)), events.append)
    assert final == run / "final.pt" and final.is_file()
    assert (run / "joint" / "last.pt").stat().st_mtime_ns == joint_mtime  # the joint model was not retrained
    assert {e.info["recipe"]["name"] for e in events if e.phase == "train"} == {"round1"}


def test_the_budget_is_split_between_stages_as_the_shares_say():
    config = load_config("cpu-small")
    assert config.minutes == 60 and config.rounds >= 1
    minutes = stage_minutes(config)
    assert len(minutes) == config.rounds + 1 and sum(minutes) == pytest.approx(60.0)
    assert stage_minutes(config.updated(minutes=10.0, rounds=1, stage_shares=[1.0, 3.0])) == [2.5, 7.5]
    with pytest.raises(DatasetError, match="one share per stage"):
        stage_minutes(config.updated(rounds=2, stage_shares=[1.0, 1.0]))
    with pytest.raises(DatasetError, match="stage_shares"):
        config.updated(stage_shares=[1.0, -1.0])


def test_a_folder_without_a_model_is_refused_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="folder without a model"):
        resolve_checkpoint_path(tmp_path)


def test_the_stain_prior_is_refused_before_training_when_the_classes_lack_its_pair(few_patches, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for path in sorted(few_patches.glob("*.png"))[:4]:  # the same crops, renamed into two other classes
        shutil.copy2(path, other / path.name)
    run = tmp_path / "run"
    config = load_config("sample", data=str(other), out=str(run), steps=2, classes="epithelium,fat,lymph",
                         pseudo_refine="stain")
    with pytest.raises(DatasetError, match="pseudo_refine 'stain' separates tumor from stroma.*epithelium, fat"):
        drive(train_recipe_steps(config))
    assert not (run / "joint").exists()  # nothing trained


def _conv_weights(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k: v.float() for k, v in state.items() if k.startswith("backbone.") and k.endswith(".weight") and v.ndim == 4}


@pytest.mark.parametrize("init", [True, False])
def test_init_starts_a_run_from_a_trained_models_network(few_patches, tmp_path, init):
    """``init``: the run begins with that model's backbone (one step at a learning rate of 1e-9 leaves it there);
    without it, from random weights."""
    from napari_wsss_cram.core.resources import demo_model_path
    from napari_wsss_cram.core.train import train

    trained = demo_model_path()
    config = load_config("sample", data=str(few_patches), out=str(tmp_path / "run"), steps=1, lr=1e-9,
                         batch_size=4, crop=64, device="cpu", workers=0, crf_workers=0, threads=1, weights="none",
                         init=str(trained) if init else None)
    events = []
    last = train(config, callback=events.append)
    start, after = _conv_weights(trained), _conv_weights(last)
    assert start.keys() == after.keys() and len(start) >= 20
    assert all(torch.allclose(start[k], after[k], atol=1e-6) for k in start) == init
    [said] = [e.info["weights"] for e in events if e.phase == "data"]
    assert (str(trained) in said) == init


@pytest.mark.slow
def test_each_segmentation_round_starts_from_the_model_that_labelled_it(few_patches, tmp_path):
    run = tmp_path / "run"
    config = load_config("sample", data=str(few_patches), out=str(run), steps=1, batch_size=4, crop=64,
                         device="cpu", workers=0, crf_workers=0, threads=1, weights="none", rounds=2,
                         init="previous")
    events = []
    drive(train_recipe_steps(config), events.append)
    said = {e.info["recipe"]["name"]: e.info["weights"] for e in events if e.phase == "data"}
    assert str(run / "joint") not in said["joint"] and "random" in said["joint"]
    assert str(run / "joint" / "last.pt") in said["round1"] and str(run / "round1" / "last.pt") in said["round2"]
    assert f'init = "{run / "round1" / "last.pt"}"' in (run / "round2" / "config.toml").read_text()
    assert 'init = "previous"' in (run / "config.toml").read_text()  # the recipe's own settings keep the rule


def test_init_is_refused_clearly_when_the_model_does_not_fit(few_patches, tmp_path):
    """Another class list or another backbone is an error naming the file, before any step; "previous" means
    the recipe's stage before, so a stage run alone with it starts from its weights instead."""
    from napari_wsss_cram.core.classes import WSSS4LUAD, class_spec_from_names
    from napari_wsss_cram.core.model.config import ModelConfig
    from napari_wsss_cram.core.model.cram import CRAMNet
    from napari_wsss_cram.core.resources import demo_model_path
    from napari_wsss_cram.core.train import load_matching_weights, train

    sample_checkpoint = demo_model_path()  # the bundled model: the sample preset's backbone, the three classes
    base = dict(data=str(few_patches), steps=1, batch_size=4, crop=64, device="cpu", workers=0, crf_workers=0,
                threads=1, weights="none")
    two = class_spec_from_names("tumor,stroma")
    with pytest.raises(CheckpointError, match=r"--init .* trained for classes tumor, stroma, normal, not tumor, str"):
        load_matching_weights(CRAMNet(two, ModelConfig(backbone="resnet18"), weights="random"), sample_checkpoint, two)
    three = WSSS4LUAD
    with pytest.raises(CheckpointError, match="another backbone"):
        load_matching_weights(CRAMNet(three, ModelConfig(backbone="resnet34"), weights="random"), sample_checkpoint,
                              three)
    # "previous" names the stage before in the recipe; a stage run alone (here a preset's) starts from `weights`
    events = []
    train(load_config("sample", **base, out=str(tmp_path / "c"), init="previous"), callback=events.append)
    [said] = [e.info["weights"] for e in events if e.phase == "data"]
    assert "random" in said and "previous" not in said
    assert load_config("sample", init="none").init is None
