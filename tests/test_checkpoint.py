"""Checkpoints: round trip, atomic write, refusal of pickled objects, plain messages on mismatches."""

from __future__ import annotations

import os

import pytest
import torch

from napari_wsss_cram.core.checkpoint import load_checkpoint, save_checkpoint
from napari_wsss_cram.core.classes import WSSS4LUAD, class_spec_from_names
from napari_wsss_cram.core.errors import CheckpointError
from napari_wsss_cram.core.model import CRAMNet, ModelConfig


def _model(**overrides) -> CRAMNet:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", aspp_channels=32, attention_dim=32, **overrides)
    return CRAMNet(WSSS4LUAD, cfg, weights=None)


def test_round_trip_restores_weights_config_and_metadata(tmp_path):
    model = _model(mpp=0.5, train_scale=0.25, use_attention=False)
    path = save_checkpoint(tmp_path / "sub" / "model.pt", model, extra={"miou": 0.5, "step": 10},
                           train_config={"lr": 0.01, "data": tmp_path})
    assert sorted(os.listdir(path.parent)) == ["model.pt"]  # no temp file left
    loaded, info = load_checkpoint(path, expect_classes=WSSS4LUAD)
    assert not loaded.training
    assert info.classes == WSSS4LUAD and info.model_config == model.config
    assert info.model_config.mpp == 0.5 and info.model_config.train_scale == 0.25
    assert info.extra == {"miou": 0.5, "step": 10}
    assert info.train_config == {"lr": 0.01, "data": str(tmp_path)}
    assert info.format_version == 1 and info.package_version
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.segment(x), model.segment(x))
        torch.testing.assert_close(loaded.predict(x)[1], model.predict(x)[1])


def test_stage2_round_trip(tmp_path):
    model = _model(stage=2)
    loaded, info = load_checkpoint(save_checkpoint(tmp_path / "s2.pt", model))
    assert info.model_config.stage == 2 and not loaded.has_pseudo_branch


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "napari-wsss-cram", "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="Refusing to load .*evil.pt.*pickled"):
        load_checkpoint(path)


def test_plain_messages_for_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save(_model().state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="not a napari-wsss-cram checkpoint"):
        load_checkpoint(tmp_path / "bare.pt")


def test_class_and_architecture_mismatch(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", _model())
    with pytest.raises(CheckpointError, match="trained for classes tumor, stroma, normal.*a, b were requested"):
        load_checkpoint(path, expect_classes=class_spec_from_names("a,b"))
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["backbone"] = "resnet34"
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_checkpoint(tmp_path / "edited.pt")


def test_model_card_says_what_the_model_knows(tmp_path):
    from napari_wsss_cram.core.checkpoint import model_card

    path = save_checkpoint(tmp_path / "m.pt", CRAMNet(WSSS4LUAD, ModelConfig(backbone="resnet18"), weights=None),
                           extra={"val_mIoU": 0.38, "per_class": {"tumor": 0.46, "stroma": 0.67, "normal": 0.0},
                                  "demo_model": "trained on synthetic sample data only"},
                           train_config={"data": "sample_data/patches", "steps": 300})
    _, info = load_checkpoint(path)
    card = dict(model_card(info))
    assert card["model"] == "resnet18, classes tumor, stroma, normal"
    assert card["data"] == "trained on sample_data/patches (300 steps)"
    assert card["validation"] == "validation mIoU 0.38 (tumor 0.46, stroma 0.67, normal 0.00)"
    assert card["warning"].startswith("never got normal right")
    assert card["note"] == "trained on synthetic sample data only"
    # the recipe's final model is a segmentation round: its card says what it learnt from and started from
    path = save_checkpoint(tmp_path / "round.pt", CRAMNet(WSSS4LUAD, ModelConfig(backbone="resnet18"), weights=None),
                           train_config={"data": "", "stage2": True, "pseudo": str(tmp_path / "run" / "round1-pseudo"),
                                         "init": str(tmp_path / "run" / "joint" / "last.pt"), "epochs": 10,
                                         "minutes": 28.6},
                           extra={"step": 754})  # a time budget ended it at step 754: the card says so, not "10 epochs"
    card = dict(model_card(load_checkpoint(path)[1]))
    assert card["data"] == ("trained on the pseudo-labels in run/round1-pseudo (754 steps), started from the network "
                            "of joint/last.pt")
