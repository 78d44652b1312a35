"""Losses: the dense energy against a brute-force O(N^2) reference, confident CE, and the joint total's switches."""

from __future__ import annotations

import pytest
import torch

from napari_wsss_cram.core.losses import (
    background_prior_loss,
    confident_ce,
    dense_energy_loss,
    dense_gaussian_filter,
    energy_gate,
    joint_loss,
)
from napari_wsss_cram.core.model import ModelConfig


def _brute_force_energy(logits, image, pseudo, sigma_xy, sigma_rgb):
    """-sum_ij S_i.S_j W_ij / (B N^2), with the full N x N kernel written out pixel pair by pixel pair."""
    b, c, h, w = logits.shape
    probs = logits.softmax(1)
    gate = (1 - probs.amax(1)).clamp(min=0).detach()
    gate[pseudo == 255] = 1.0
    s = (probs * gate[:, None]).reshape(b, c, h * w)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).double()
    total = 0.0
    for n in range(b):
        rgb = image[n].reshape(3, -1).T.double()
        d_pos = ((pos[:, None] - pos[None]) ** 2).sum(-1)
        d_rgb = ((rgb[:, None] - rgb[None]) ** 2).sum(-1)
        kernel = torch.exp(-d_pos / (2 * sigma_xy ** 2) - d_rgb / (2 * sigma_rgb ** 2))
        total = total + torch.einsum("ci,ij,cj->", s[n], kernel, s[n])
    return -total / (b * (h * w) ** 2)


def test_dense_energy_matches_brute_force_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 9, 11, dtype=torch.float64, requires_grad=True)
    image = torch.rand(2, 3, 9, 11) * 255
    image[:, :, :, 6:] = torch.tensor([60.0, 40.0, 160.0])[:, None, None]  # a flat region: large kernel
    pseudo = torch.randint(0, 4, (2, 9, 11))
    pseudo[:, :3] = 255
    loss = dense_energy_loss(logits, image, pseudo, sigma_xy=6.0, sigma_rgb=30.0, scale=1.0)
    (grad,) = torch.autograd.grad(loss, logits)
    reference = _brute_force_energy(logits, image, pseudo, 6.0, 30.0)
    (grad_ref,) = torch.autograd.grad(reference, logits)
    assert loss.item() < 0
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-9)


def test_dense_filter_chunking_is_exact():
    torch.manual_seed(0)
    values, features = torch.rand(2, 50, 3), torch.rand(2, 50, 5) * 3
    whole = dense_gaussian_filter(values, features, chunk_elements=10 ** 6)
    chunked = dense_gaussian_filter(values, features, chunk_elements=7 * 50)
    kernel = torch.exp(-0.5 * torch.cdist(features, features) ** 2)
    torch.testing.assert_close(whole, kernel @ values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked, whole)


def test_energy_prefers_predictions_that_follow_colour():
    image = torch.zeros(1, 3, 16, 16)
    image[:, :, :, 8:] = 200.0
    follows = torch.full((1, 2, 16, 16), -3.0)
    follows[:, 0, :, :8] = 3.0
    follows[:, 1, :, 8:] = 3.0
    crosses = follows.transpose(-1, -2).contiguous()  # boundary across the colour edge
    e_follow = dense_energy_loss(follows, image, None, sigma_xy=20, sigma_rgb=15, scale=1.0)
    e_cross = dense_energy_loss(crosses, image, None, sigma_xy=20, sigma_rgb=15, scale=1.0)
    assert e_follow < e_cross


def test_gate_is_one_on_ignored_pixels_and_small_on_confident_ones():
    probs = torch.tensor([[0.98, 0.6], [0.02, 0.4]]).view(1, 2, 1, 2)
    pseudo = torch.tensor([[[0, 255]]])
    gate = energy_gate(probs, pseudo)
    torch.testing.assert_close(gate.flatten(), torch.tensor([0.02, 1.0]))


def test_background_prior_loss_targets_the_white_share():
    image = torch.full((1, 3, 8, 8), 120.0)
    image[:, :, :, 4:] = 250.0  # glass on the right half
    right = torch.zeros(1, 2, 2, 2)
    right[:, 1, :, 1] = 1.0     # background map on the right column of a 2x2 map
    right[:, 0, :, 0] = 1.0
    wrong = right.flip(-1)
    assert background_prior_loss(right, image) < 0.01 < background_prior_loss(wrong, image)


def test_confident_ce_ignores_255():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    pseudo = torch.full((1, 4, 4), 255)
    zero = confident_ce(logits, pseudo)
    assert zero.item() == 0.0
    zero.backward()  # still differentiable
    pseudo[0, 0, 0] = 2
    expected = torch.nn.functional.cross_entropy(logits[:, :, 0, 0], torch.tensor([2]))
    torch.testing.assert_close(confident_ce(logits, pseudo), expected)


def _outputs(requires_grad=True):
    torch.manual_seed(0)
    return {"logits": torch.randn(2, 3, requires_grad=requires_grad),
            "seg": torch.randn(2, 4, 16, 16, requires_grad=requires_grad),
            "cam": torch.rand(2, 4, 2, 2)}


@pytest.mark.parametrize(
    "switches, expected_terms",
    [
        (dict(use_da=False, use_joint=False, use_crf=False), {"cls", "total"}),   # CAM only
        (dict(use_joint=False), {"cls", "bg", "presence", "total"}),               # +DA
        (dict(use_joint=True), {"cls", "bg", "presence", "ce", "energy", "total"}),  # +joint (+CRF)
        (dict(use_joint=True, energy_weight=0.0, background_prior_weight=0.0, map_presence_weight=0.0),
         {"cls", "ce", "total"}),
        (dict(stage=2), {"ce", "energy", "total"}),
    ],
)
def test_joint_loss_switches(switches, expected_terms):
    cfg = ModelConfig(backbone="resnet18", **switches)
    outputs = _outputs()
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    pseudo = torch.randint(0, 4, (2, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    total, terms = joint_loss(outputs, labels if cfg.stage == 1 else None, pseudo, x, cfg)
    assert set(terms) == expected_terms
    expected = terms.get("cls", 0.0) + cfg.background_prior_weight * terms.get("bg", 0.0) + \
        cfg.map_presence_weight * terms.get("presence", 0.0) + (cfg.lambda_seg if cfg.stage == 1 else 1.0) * (
        terms.get("ce", 0.0) + cfg.energy_weight * terms.get("energy", 0.0))
    assert total.item() == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert (outputs["seg"].grad is not None) == ("ce" in terms)


def test_stage2_needs_labels():
    with pytest.raises(ValueError, match="pixel labels"):
        joint_loss(_outputs(), None, None, torch.randn(2, 3, 16, 16), ModelConfig(stage=2))


def test_map_presence_loss_prefers_localised_maps_for_present_classes_and_empty_maps_for_absent():
    from napari_wsss_cram.core.losses import map_presence_loss

    labels = torch.tensor([[1.0, 0.0, 0.0]])
    flat = torch.full((1, 4, 8, 8), 0.5)
    localised = torch.zeros(1, 4, 8, 8)
    localised[0, 0, :4] = 1.0  # class 0 high on a part of the image, absent classes empty
    localised[0, 3, 4:] = 1.0
    assert map_presence_loss(localised, labels) < 0.01 < map_presence_loss(flat, labels)
    maps = flat.clone().requires_grad_(True)
    map_presence_loss(maps, labels).backward()
    assert maps.grad[0, 1].sum() > 0 and maps.grad[0, 0].sum() < 0  # absent down, present up
