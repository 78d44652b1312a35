"""The Trainer's hooks: an ablation overrides one hook; every preset key reaches the component it configures."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_wsss_cram.core.classes import IGNORE_INDEX
from napari_wsss_cram.core.data.batch import Batch
from napari_wsss_cram.core.data.mosaic import MosaicMix
from napari_wsss_cram.core.data.synthesis import SynthesisMix
from napari_wsss_cram.core.model.config import ModelConfig
from napari_wsss_cram.core.progress import drive
from napari_wsss_cram.core.pseudo_labels import PseudoLabeller, reliable_pseudo_labels
from napari_wsss_cram.core.recipe import _stage_config, stage_minutes
from napari_wsss_cram.core.train import Trainer, load_config, train, train_steps
from napari_wsss_cram.core.train_config import PRESETS_DIR

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

FAST = dict(steps=2, batch_size=2, crop=64, workers=0, crf_workers=0, threads=1, weights="none", device="cpu",
            joint_warmup_steps=0, checkpoint_every=100, val_every_steps=None, log_every=1, minutes=None)


def _fast_config(sample_data_dir, out, **kw):
    return load_config("sample", data=str(sample_data_dir / "patches"), out=str(out), **{**FAST, **kw})


# ----------------------------------------------------------------------------------------------- ablations

class AllIgnorePseudoLabels(Trainer):
    """Ablation: the seg head gets no reliable label at all (every pixel 255)."""

    calls: list[tuple[int, tuple[int, ...]]] = []

    def pseudo_labels(self, batch: Batch, outputs):
        assert isinstance(batch, Batch) and batch.labels is not None and batch.strong_masks is not None
        assert batch.images.dtype == torch.uint8 and batch.images.shape[-1] == 3
        type(self).calls.append((self.step, tuple(outputs["cam"].shape)))
        b, h, w, _ = batch.images.shape
        return torch.full((b, h, w), IGNORE_INDEX, dtype=torch.int64)


class ExtraTerm(Trainer):
    """Ablation: one more loss term (here a small L2 on the segmentation logits)."""

    def training_step(self, batch: Batch):
        loss, terms = super().training_step(batch)
        extra = self.net(self.model.normalize(batch.images))["seg"].float().square().mean()
        terms["extra"] = float(extra.detach())
        return loss + 1e-3 * extra, terms


class CheckpointOnlyAtTheEnd(Trainer):
    """Ablation of the schedule between steps: ``last.pt`` only when the run ends, whatever checkpoint_every."""

    saved: list[int] = []

    def checkpoint_due(self) -> bool:
        return self.finished

    def save_last(self) -> None:
        type(self).saved.append(self.step)
        super().save_last()


def test_ablation_overriding_the_checkpoint_schedule(sample_data_dir, tmp_path):
    from napari_wsss_cram.core.checkpoint import load_checkpoint

    CheckpointOnlyAtTheEnd.saved = []
    run = tmp_path / "run"
    events = []
    best = train(_fast_config(sample_data_dir, run, steps=3, checkpoint_every=1), events.append,
                 trainer_class=CheckpointOnlyAtTheEnd)
    assert CheckpointOnlyAtTheEnd.saved == [3]  # the default would have saved after every step
    assert best == run / "last.pt" and load_checkpoint(best)[1].extra["step"] == 3
    assert [e.done for e in events if e.phase == "train"] == [1, 2, 3]  # log_step still ran every step


def test_each_stage_has_its_trainer_and_a_wrong_one_is_refused(sample_data_dir, tmp_path):
    from napari_wsss_cram.core.errors import TrainingError
    from napari_wsss_cram.core.train import trainer_for
    from napari_wsss_cram.core.train_stage2 import Stage2Trainer

    stage1 = _fast_config(sample_data_dir, tmp_path / "a")
    stage2 = _fast_config(sample_data_dir, tmp_path / "b", stage2=True, pseudo=str(tmp_path))
    assert trainer_for(stage1) is Trainer and trainer_for(stage2) is Stage2Trainer
    assert issubclass(Stage2Trainer, Trainer) and Stage2Trainer.stage == 2
    with pytest.raises(TrainingError, match="subclass Stage2Trainer"):
        Trainer(stage2)
    with pytest.raises(TrainingError, match="subclass Trainer"):
        Stage2Trainer(stage1)


def test_ablation_overriding_pseudo_labels_runs_in_place_of_the_default(sample_data_dir, tmp_path):
    AllIgnorePseudoLabels.calls = []
    events = []
    best = train(_fast_config(sample_data_dir, tmp_path / "run"), events.append, trainer_class=AllIgnorePseudoLabels)
    assert best.name == "last.pt" and best.is_file()
    assert [step for step, _ in AllIgnorePseudoLabels.calls] == [0, 1]  # once per step, after a 0-step warm-up
    assert all(shape[:2] == (2, 4) for _, shape in AllIgnorePseudoLabels.calls)  # (B, K+1, h, w) maps
    train_events = [e for e in events if e.phase == "train"]
    assert [e.done for e in train_events] == [1, 2]
    # the trainer used the override's labels: nothing confident, and the seg terms were computed on them
    assert all(e.info["pseudo"]["confident"] == 0.0 for e in train_events)
    assert all("ce" in e.info["losses"] and np.isfinite(e.info["losses"]["total"]) for e in train_events)


def test_ablation_adding_a_loss_term_is_logged(sample_data_dir, tmp_path):
    events = []
    run = tmp_path / "run"
    drive(train_steps(_fast_config(sample_data_dir, run), trainer_class=ExtraTerm), events.append)
    train_events = [e for e in events if e.phase == "train"]
    assert len(train_events) == 2 and all(e.info["losses"]["extra"] > 0 for e in train_events)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [float(r["loss_extra"]) > 0 for r in rows] == [True, True]


# ----------------------------------------------------------------------------------------------- no dead switch

def _poly_power(t: Trainer) -> float:
    half = t.budget.total_steps // 2
    return math.log(t.scheduler.lr_lambdas[0](half)) / math.log(1.0 - t.budget.fraction(half))


def _wrapper(t: Trainer, kind: type):
    """The dataset wrapper of type ``kind`` in the trainer's chain of wrappers (mosaics around synthesis)."""
    dataset = t.dataset
    while not isinstance(dataset, kind):
        dataset = dataset.__dict__["dataset"]  # AttributeError (test failure) when no such wrapper
    return dataset


def _head_lr_mult(t: Trainer) -> float:
    (mult,) = {g["lr_mult"] for g in t.optimizer.param_groups if g.get("name") != "backbone"}
    return mult


#: top-level preset key -> where the built trainer holds it (the component it configures). A key missing here
#: fails the test: wire it to its component, then add it.
def _round_init(config) -> str:
    """"previous" when the recipe starts its first segmentation round from the joint model's checkpoint."""
    given = _stage_config(config, "round1", None, Path("pseudo"), False, Path("joint.pt")).init
    return "previous" if given == "joint.pt" else f"the round was given init {given!r}"


CONSUMERS = {
    # schedule
    "epochs": lambda t: t.total_steps // t.steps_per_epoch,  # only counts without `steps` / `minutes`
    "steps": lambda t: t.total_steps,
    "minutes": lambda t: t.budget.seconds / 60.0,
    "batch_size": lambda t: t.loader.batch_size,
    "optimizer": lambda t: type(t.optimizer).__name__.lower(),
    "lr": lambda t: t.optimizer.defaults["lr"],
    "head_lr_mult": _head_lr_mult,
    "momentum": lambda t: t.optimizer.defaults["momentum"],
    "weight_decay": lambda t: t.optimizer.defaults["weight_decay"],
    "poly_power": _poly_power,
    # augmentation
    "scale_min": lambda t: t.dataset.augment_config.scale_min,
    "scale_max": lambda t: t.dataset.augment_config.scale_max,
    "crop": lambda t: t.dataset.augment_config.crop,
    "flip": lambda t: t.dataset.augment_config.flip,
    "rot90": lambda t: t.dataset.augment_config.rot90,
    "jitter": lambda t: t.dataset.augment_config.jitter,
    "stain": lambda t: t.dataset.augment_config.stain,
    "mosaic_share": lambda t: t.dataset.share if isinstance(t.dataset, MosaicMix) else 0.0,
    "synthesis_share": lambda t: _wrapper(t, SynthesisMix).share,
    "synthesis_region": lambda t: _wrapper(t, SynthesisMix).bank.cell,
    "synthesis_classes": lambda t: ",".join(t.classes.names[k] for k in sorted(_wrapper(t, SynthesisMix).bank.cells)),
    "mosaic_cell": lambda t: t.dataset.bank.cell,
    # stage 2's cell bank (stage 1 takes single-label patches whole): read by Trainer.build_mosaic_bank
    "mosaic_purity": lambda t: t.config.mosaic_purity,
    # pseudo-labels
    "pseudo_label_scale": lambda t: t.pseudo_size / t.dataset.augment_config.crop,
    "crf_workers": lambda t: t.labeller.workers,
    # runtime
    "workers": lambda t: t.loader.num_workers,
    "threads": lambda t: torch.get_num_threads(),
    "seed": lambda t: t.dataset.seed,
    "amp": lambda t: t.scaler.is_enabled() if t.device.type == "cuda" else t.config.amp,  # CUDA only, by design
    # read by Trainer.fit / Trainer.pseudo_labels from trainer.config at each step
    "joint_warmup_steps": lambda t: t.config.joint_warmup_steps,
    "log_every": lambda t: t.config.log_every,
    "checkpoint_every": lambda t: t.config.checkpoint_every,
    "val_every": lambda t: t.config.val_every,
    "val_every_steps": lambda t: t.config.val_every_steps,
    "val_scale": lambda t: t.config.val_scale,
    # the recipe (core/recipe.py): its stages, and each stage's share of the budget as stage_minutes splits it
    "rounds": lambda t: len(stage_minutes(t.config)) - 1,
    "stage_shares": lambda t: [m * sum(t.config.stage_shares) / t.config.minutes for m in stage_minutes(t.config)],
    # the recipe hands it to make_pseudo_labels(refine=...) between its stages (tests/test_recipe.py runs "stain")
    "pseudo_refine": lambda t: t.config.pseudo_refine,
    # the recipe turns "previous" into the stage before's checkpoint for each segmentation round (a stage run
    # alone starts from `weights`: tests/test_recipe.py)
    "init": lambda t: _round_init(t.config),
}

ABLATION_PRESET = """
description = "not a shipped preset: every switch the shipped ones leave at the default"
steps = 7
batch_size = 4
optimizer = "adam"
lr = 0.002
head_lr_mult = 3.0
weight_decay = 0.0001
poly_power = 1.5
scale_min = 0.7
scale_max = 1.1
crop = 96
flip = false
rot90 = false
jitter = 0.0
stain = 0.1
mosaic_share = 0.5
mosaic_cell = 16
mosaic_purity = 0.8
synthesis_share = 0.3
synthesis_region = 24
synthesis_classes = "tumor,stroma"
pseudo_label_scale = 0.75
crf_workers = 0
workers = 0
threads = 1
seed = 5
joint_warmup_steps = 3

[model]
backbone = "resnet18"
output_stride = 16
use_attention = false
alpha = 0.2
beta = 0.7
tissue_threshold = 180
background_needs_white = false
use_crf = true
map_presence_weight = 0.5
constrained_weight = 0.5

[model.crf]
gaussian_sxy = 2.0
bilateral_sxy = 40.0
bilateral_srgb = 7.0
iterations = 3
"""


def _rule_input(k: int):
    """Two images' random maps on a gray ramp from stained tissue to glass: every rule setting changes labels."""
    rng = np.random.default_rng(0)
    maps = rng.random((2, k + 1, 48, 48)).astype(np.float32)
    ramp = np.linspace(120, 255, 48, dtype=np.float32)[None, :, None].repeat(48, 0)
    image = np.clip(ramp + rng.normal(0, 5, (48, 48, 3)), 0, 255).astype(np.uint8)
    labels = np.ones((2, k), np.uint8)
    labels[1, 0] = 0
    return maps, image, labels


def _rule(maps, image, labels, settings: dict) -> np.ndarray:
    return np.stack([reliable_pseudo_labels(m, image, lab, **settings) for m, lab in zip(maps, labels, strict=True)])


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _same(observed, expected) -> bool:
    if isinstance(expected, list):
        expected = tuple(expected)
    if isinstance(observed, list):
        observed = tuple(observed)
    if isinstance(expected, float) or isinstance(observed, float):
        return observed == pytest.approx(expected, rel=1e-3)
    return observed == expected


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.toml")) + ["ablation"])
def test_every_preset_key_reaches_its_component(preset, sample_data_dir, tmp_path, keep_torch_threads):
    path = PRESETS_DIR / f"{preset}.toml"
    if preset == "ablation":
        path = tmp_path / "ablation.toml"
        path.write_text(ABLATION_PRESET, encoding="utf-8")
    table = tomllib.loads(path.read_text(encoding="utf-8"))
    table.pop("description", None)
    model_table = dict(table.pop("model", {}))
    crf_table = dict(model_table.pop("crf", {}))
    config = load_config(path, data=str(sample_data_dir / "patches"), out=str(tmp_path / "run"), weights="none",
                         device="cpu")
    trainer = Trainer(config)
    try:
        trainer.setup()
        trainer.build_data()
        trainer.build_model()
        trainer.build_optimizer()
        dead = []
        for key, value in table.items():
            assert _same(getattr(config, key), value), key
            if key not in CONSUMERS:
                dead.append(f"{key} (no consumer known to this test)")
            elif not _same(CONSUMERS[key](trainer), value):
                dead.append(f"{key}: preset {value!r}, component {CONSUMERS[key](trainer)!r}")
        model_config = trainer.model.config
        for key, value in model_table.items():
            if not hasattr(model_config, key) or not _same(getattr(model_config, key), value):
                dead.append(f"[model] {key}: preset {value!r}, model {getattr(model_config, key, '<missing>')!r}")
        for key, value in crf_table.items():
            if not hasattr(model_config.crf, key) or not _same(getattr(model_config.crf, key), value):
                dead.append(f"[model.crf] {key}: preset {value!r}, model {getattr(model_config.crf, key, '<missing>')!r}")
        # the rule's settings reach the pseudo-labeller (the processes get exactly these)
        labeller = trainer.labeller
        assert isinstance(labeller, PseudoLabeller)  # every preset trains jointly
        assert labeller.use_crf == model_config.use_crf
        for key in PseudoLabeller.SETTINGS:
            expected = model_config.crf.to_dict() if key == "crf" else getattr(model_config, key)
            if labeller.model_config[key] != expected:
                dead.append(f"labeller {key}: {labeller.model_config[key]!r} != model {expected!r}")
        for key, value in crf_table.items():
            if labeller.model_config["crf"].get(key) != value:
                dead.append(f"labeller [model.crf] {key}: {labeller.model_config['crf'].get(key)!r}")
        # ... and are what the worker processes apply: the labeller's labels are the rule's with these settings
        maps, image, labels = _rule_input(trainer.classes.num_classes)
        made = labeller.result(labeller.submit(maps, np.stack([image, image]), labels))
        settings = {k: getattr(model_config, k) for k in PseudoLabeller.SETTINGS}
        if not model_config.use_crf:
            settings["crf"] = None
        assert np.array_equal(made, _rule(maps, image, labels, settings)), "the labeller ignores a setting"
        if preset == "ablation":  # the input tells each (non-default) setting from the default
            for key in PseudoLabeller.SETTINGS:
                changed = {**settings, key: getattr(ModelConfig(), key)}
                assert not np.array_equal(made, _rule(maps, image, labels, changed)), key
        assert not dead, f"{path.name}: settings that do not reach their component:\n  " + "\n  ".join(dead)
    finally:
        trainer.close()
