"""The one metric, checked against a hand-computed confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wsss_cram.core.classes import IGNORE_INDEX, WSSS4LUAD, ClassSpec
from napari_wsss_cram.core.metrics import ConfusionMatrix


def test_hand_computed_confusion_and_iou():
    # classes: 0 tumor, 1 stroma, 2 normal, 3 background
    target = np.array([[0, 0, 1, 1], [2, 3, 3, IGNORE_INDEX]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 2, 2]])
    cm = ConfusionMatrix(WSSS4LUAD)
    cm.update(pred, target)
    expected = np.zeros((4, 4), int)
    expected[0, 0] = 1  # tumor -> tumor
    expected[0, 1] = 1  # tumor -> stroma
    expected[1, 1] = 2  # stroma -> stroma
    expected[2, 0] = 1  # normal -> tumor; background and ignore pixels are not counted
    np.testing.assert_array_equal(cm.matrix, expected)
    # tumor: tp 1, fp 1 (normal->tumor), fn 1 -> 1/3; stroma: tp 2, fp 1 -> 2/3; normal: tp 0, fn 1 -> 0
    np.testing.assert_allclose(cm.iou(), [1 / 3, 2 / 3, 0.0])
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)


def test_accumulates_over_images_not_mean_of_images():
    cm = ConfusionMatrix(WSSS4LUAD)
    cm.update(np.zeros((1, 10), int), np.zeros((1, 10), int))
    cm.update(np.ones((1, 1), int), np.zeros((1, 1), int))
    assert cm.iou()[0] == pytest.approx(10 / 11)


def test_prediction_of_background_on_tissue_is_a_miss_and_255_counts_as_background():
    cm = ConfusionMatrix(WSSS4LUAD)
    cm.update(np.array([3, 255]), np.array([1, 1]))
    assert cm.matrix[1, 3] == 2
    assert cm.iou()[1] == 0.0


def test_absent_class_is_nan_and_skipped_in_miou():
    spec = ClassSpec(("a", "b"))
    cm = ConfusionMatrix(spec)
    cm.update(np.array([0, 0]), np.array([0, 0]))
    assert np.isnan(cm.iou()[1])
    assert cm.miou() == 1.0
    assert cm.to_dict()["per_class"] == {"a": 1.0, "b": None}


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(WSSS4LUAD).update(np.zeros((2, 2)), np.zeros((2, 3)))
