"""The evaluate path (dataset -> inference engine -> THE metric) against a hand-computed confusion matrix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from napari_wsss_cram.cli import main
from napari_wsss_cram.core.checkpoint import save_checkpoint
from napari_wsss_cram.core.classes import WSSS4LUAD
from napari_wsss_cram.core.data import discover_pixel_dataset
from napari_wsss_cram.core.evaluate import evaluate_model
from napari_wsss_cram.core.io.png import write_index_png
from napari_wsss_cram.core.model.config import ModelConfig
from napari_wsss_cram.core.model.cram import CRAMNet
from napari_wsss_cram.core.progress import drive


def constant_model(predicted_class: int) -> CRAMNet:
    """A real CRAMNet whose segmentation head says ``predicted_class`` everywhere (zero weights, one bias)."""
    model = CRAMNet(WSSS4LUAD, ModelConfig(backbone="resnet18", output_stride=16, aspp_channels=16,
                                           attention_dim=16), weights=None)
    with torch.no_grad():
        model.seg_head.classifier.weight.zero_()
        model.seg_head.classifier.bias.fill_(-5.0)
        model.seg_head.classifier.bias[predicted_class] = 5.0
        # its image-level classifier agrees (the engine gates out classes the classifier calls absent)
        model.cls_head.classifier_weight.zero_()
        model.cls_head.classifier_bias.fill_(-5.0)
        model.cls_head.classifier_bias[predicted_class] = 5.0
    return model.eval()


@pytest.fixture()
def two_images(tmp_path):
    root = tmp_path / "val"
    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    # image a (32x40): rows 0-15 tumor, rows 16-31 stroma; columns 0-4 background; one unlabelled pixel
    mask_a = np.zeros((32, 40), np.uint8)
    mask_a[16:] = 1
    mask_a[:, :5] = 3
    mask_a[0, 39] = 255
    # image b (20x20): normal except a background first row
    mask_b = np.full((20, 20), 2, np.uint8)
    mask_b[0] = 3
    for name, mask in (("a", mask_a), ("b", mask_b)):
        Image.fromarray(np.full(mask.shape + (3,), 150, np.uint8)).save(root / "img" / f"{name}.png")
        write_index_png(root / "mask" / f"{name}.png", mask, WSSS4LUAD)
    return root


def test_evaluate_matches_hand_computed_confusion(two_images):
    dataset = discover_pixel_dataset(two_images)
    cm = drive(evaluate_model(constant_model(0), dataset, scale=1.0))
    # Hand count: tumor 16*35 - 1 = 559 px, stroma 16*35 = 560 px, normal 19*20 = 380 px, all predicted tumor;
    # background and unlabelled pixels are not counted.
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0], expected[1, 0], expected[2, 0] = 559, 560, 380
    assert np.array_equal(cm.matrix, expected)
    iou = cm.iou()
    assert iou[0] == pytest.approx(559 / (559 + 560 + 380))
    assert iou[1] == 0.0 and iou[2] == 0.0
    assert cm.miou() == pytest.approx(559 / 1499 / 3)


def test_evaluate_cli_writes_table_and_json(two_images, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "m.pt", constant_model(1), train_config={"scale_min": 1.0, "scale_max": 1.0})
    out = tmp_path / "scores.json"
    rc = main(["evaluate", str(ckpt), str(two_images), "--json", str(out), "--device", "cpu"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "mIoU" in table and "stroma" in table
    result = json.loads(out.read_text())
    assert result["confusion"][1][1] == 560 and result["confusion"][0][1] == 559
    assert result["per_class"]["stroma"] == pytest.approx(560 / (560 + 559 + 380))
    assert result["mIoU"] == pytest.approx(560 / 1499 / 3)
    assert result["scale"] == 1.0
