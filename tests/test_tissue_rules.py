"""Outputs take background from the tissue mask, absent classes are gated, and the label-constrained loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.inference import PredictSettings, predict_array
from napari_wsss_cram.core.losses import label_constrained_loss
from napari_wsss_cram.core.progress import drive
from napari_wsss_cram.core.tissue import near_white_mask, restrict_to_tissue
from napari_wsss_cram.core.train import TrainingBudget

TUMOR, STROMA, NORMAL = 0, 1, 2
BACKGROUND = WSSS4LUAD.background_index


class BackgroundLovingNet(nn.Module):
    """Calls every pixel background (0.7) over stroma (0.2) and tumor (0.1), as a DA model does on pale normal
    lung; its image-level classifier says tumor is present and stroma absent."""

    classes = WSSS4LUAD

    def __init__(self, presence: tuple[float, ...] = (0.9, 0.1, 0.2)) -> None:
        super().__init__()
        self.presence = torch.tensor(presence)
        self.dummy = nn.Parameter(torch.zeros(1))

    def predict_with_presence(self, x: torch.Tensor):
        b, _, h, w = x.shape
        probs = torch.tensor([0.1, 0.2, 0.0, 0.7]).view(1, 4, 1, 1).expand(b, 4, h, w).clone()
        return probs, None, self.presence.expand(b, -1)


def _pale_tissue_image() -> np.ndarray:
    """Left half: pale pink tissue (gray ~190, thin alveolar walls); right half: glass (gray ~245)."""
    img = np.zeros((96, 128, 3), np.uint8)
    img[:, :64] = (214, 178, 200)
    img[:, 64:] = (246, 244, 245)
    rng = np.random.default_rng(0)
    img[10:20, 80:82] = (200, 160, 190)  # a 10x2 px speck of stain on the glass: cleaned up as not tissue
    img[40, 20] = (250, 250, 250)        # one bright pixel inside tissue: stays tissue
    return np.clip(img.astype(int) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)


def test_pale_tissue_is_not_background_and_glass_is():
    img = _pale_tissue_image()
    labels = np.asarray(drive(predict_array(BackgroundLovingNet(), None, img,
                                            PredictSettings(scale=1.0, device="cpu", gate_classes=False))).labels)
    assert (labels[:, :60] != BACKGROUND).all()          # the model said background; the tissue mask decides
    assert (labels[:, :60] == STROMA).all()              # arg-max over tissue classes only
    assert (labels[:, 70:] == BACKGROUND).all()          # glass, including the speck
    # the paper's rule keeps the model's background channel: pale tissue becomes background
    paper = np.asarray(drive(predict_array(BackgroundLovingNet(), None, img, PredictSettings(
        scale=1.0, device="cpu", background="model", gate_classes=False))).labels)
    assert (paper[:, :60] == BACKGROUND).all()


def test_class_gating_zeroes_absent_classes():
    img = _pale_tissue_image()
    gated = np.asarray(drive(predict_array(BackgroundLovingNet(), None, img,
                                           PredictSettings(scale=1.0, device="cpu", gate_classes=True))).labels)
    # stroma (0.2) beats tumor (0.1) until the classifier calls stroma absent (0.1 < 0.3)
    assert (gated[:, :60] == TUMOR).all()
    # nothing present at all: the most present class is kept, so tissue still gets a tissue class
    none_present = BackgroundLovingNet(presence=(0.2, 0.3, 0.1))
    labels = np.asarray(drive(predict_array(none_present, None, img, PredictSettings(
        scale=1.0, device="cpu", gate_classes=True, gate_threshold=0.5))).labels)
    assert (labels[:, :60] == STROMA).all()


def test_restrict_to_tissue_is_a_distribution():
    probs = torch.rand(2, 4, 8, 8)
    probs = probs / probs.sum(1, keepdim=True)
    white = torch.zeros(2, 8, 8, dtype=torch.bool)
    white[:, :, :3] = True
    out = restrict_to_tissue(probs, white, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.9]]))
    assert torch.allclose(out.sum(1), torch.ones(2, 8, 8))
    assert (out[:, 3][white] == 1).all() and (out[:, 3][~white] == 0).all()
    assert (out[0, 1] == 0).all()                         # stroma gated off in image 0
    assert (out[1, :2][:, ~white[1]] == 0).all()          # only normal left in image 1
    assert torch.allclose(out[1, 2][~white[1]], torch.ones(()))


def test_near_white_mask_threshold_and_cleanup():
    rgb = torch.full((1, 20, 20, 3), 250.0)
    rgb[0, 5:15, 5:15] = 150.0
    rgb[0, 2, 2] = 100.0                                  # isolated dark pixel on glass
    mask = near_white_mask(rgb, 200)
    assert mask[0, 2, 2] and not mask[0, 10, 10] and mask[0, 18, 18]
    assert not near_white_mask(rgb, 200, cleanup=1)[0, 2, 2]


def _logits_for(classes_map: torch.Tensor, strength: float = 8.0) -> torch.Tensor:
    """Logits (B, K+1, H, W) that put ``strength`` on the class of each pixel."""
    return nn.functional.one_hot(classes_map, 4).permute(0, 3, 1, 2).float() * strength


def test_label_constrained_loss_rewards_a_labelling_that_fits_the_labels():
    image = torch.full((1, 3, 16, 16), 150.0)             # all tissue
    tumor_only = torch.tensor([[1.0, 0.0, 0.0]])
    right = label_constrained_loss(_logits_for(torch.zeros(1, 16, 16, dtype=torch.long)), tumor_only, image)
    wrong = label_constrained_loss(_logits_for(torch.ones(1, 16, 16, dtype=torch.long)), tumor_only, image)
    background = label_constrained_loss(_logits_for(torch.full((1, 16, 16), 3, dtype=torch.long)), tumor_only, image)
    assert right < 0.01 and wrong > 5 and background > 5

    both = torch.tensor([[1.0, 1.0, 0.0]])
    half = torch.zeros(1, 16, 16, dtype=torch.long)
    half[:, :, 8:] = STROMA
    all_stroma = torch.ones(1, 16, 16, dtype=torch.long)
    sliver = all_stroma.clone()
    sliver[:, :2, :2] = TUMOR                             # tumor in ~1.6% of the tissue: present, but a sliver
    assert label_constrained_loss(_logits_for(half), both, image) < 0.01
    assert label_constrained_loss(_logits_for(sliver), both, image) > \
        label_constrained_loss(_logits_for(half), both, image) + 2.0  # the share prior (>= 30% each)
    assert label_constrained_loss(_logits_for(all_stroma), both, image) > 5  # tumor missing entirely


def test_label_constrained_loss_gradient_moves_mass_to_present_classes():
    image = torch.full((2, 3, 12, 12), 140.0)
    image[:, :, :, :4] = 250.0                            # glass on the left: background wanted there
    logits = torch.zeros(2, 4, 12, 12, requires_grad=True)
    labels = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    label_constrained_loss(logits, labels, image).backward()
    g = logits.grad
    tissue = (slice(None), slice(4, None))
    assert (g[0, STROMA][tissue] < 0).all() and (g[0, TUMOR][tissue] > 0).all()
    assert (g[1, NORMAL][tissue] < 0).all() and (g[1, STROMA][tissue] > 0).all()
    assert (g[:, BACKGROUND][:, :, :4] < 0).all()         # glass pulls towards background
    assert (g[:, BACKGROUND][:, :, 4:] > 0).all()         # tissue pushes background away


@pytest.mark.parametrize("minutes", [None, 0.001])
def test_training_budget(minutes):
    budget = TrainingBudget(total_steps=100, minutes=minutes)
    assert budget.fraction(50) >= 0.5
    if minutes is None:
        assert not budget.done(99) and budget.done(100) and budget.estimated_total(10) == 100
    else:
        import time

        time.sleep(0.1)                                   # 0.06 s budget spent
        assert budget.done(1) and budget.estimated_total(5) == 5
    resumed = TrainingBudget(total_steps=100, minutes=10, spent_seconds=300)
    assert 0.49 < resumed.fraction(0) < 0.6


class CountingNet(BackgroundLovingNet):
    """Records the input sizes it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def predict_with_presence(self, x: torch.Tensor):
        self.sizes.append(tuple(x.shape[-2:]))
        return super().predict_with_presence(x)


def test_test_time_augmentation_runs_each_scale_and_flip_and_keeps_the_answer():
    img = _pale_tissue_image()
    net = CountingNet()
    labels = np.asarray(drive(predict_array(net, None, img, PredictSettings(
        scale=1.0, device="cpu", tile=128, overlap=0, batch=4, gate_classes=False, tta_scales=(0.75, 1.0),
        tta_flip=True))).labels)
    small, full = sorted(set(net.sizes))
    assert len(net.sizes) == 4 and small[1] == round(0.75 * full[1])
    assert (labels[:, :60] == STROMA).all() and (labels[:, 70:] == BACKGROUND).all()
