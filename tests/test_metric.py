"""ConfusionMatrix and format_table against hand-computed cases."""

import json
import math

import numpy as np
import pytest
import torch

from maskclip_apro.evaluation import ConfusionMatrix, format_table


def brute_matrix(pred, gt, k, ignore=255):
    m = np.zeros((k, k), dtype=np.int64)
    for p, g in zip(np.ravel(pred), np.ravel(gt)):
        if g != ignore:
            m[g, p] += 1
    return m


def test_hand_computed_case():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 1, 0]])
    cm = ConfusionMatrix(4).update(pred, gt)
    # rows gt, cols pred: gt0 -> pred 0,1,0,2 ; gt1 -> pred 1,1,1 ; ignore pixel skipped
    expected = np.array([[2, 1, 1, 0], [0, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(cm.matrix, expected)
    res = cm.compute()
    # IoU0 = 2/(4+2-2)=0.5 ; IoU1 = 3/(3+4-3)=0.75 ; class 2 only predicted: 0/1 = 0 ; class 3 absent: nan
    assert res["IoU"][:3] == pytest.approx([0.5, 0.75, 0.0])
    assert math.isnan(res["IoU"][3])
    assert res["mIoU"] == pytest.approx((0.5 + 0.75 + 0.0) / 3)
    assert res["aAcc"] == pytest.approx(5 / 7)
    assert res["Acc"][:2] == pytest.approx([0.5, 1.0])
    assert math.isnan(res["Acc"][2]) and math.isnan(res["Acc"][3])
    assert res["mAcc"] == pytest.approx(0.75)
    assert res["num_pixels"] == 7


def test_perfect_prediction_and_empty():
    gt = np.array([[0, 1], [2, 255]])
    res = ConfusionMatrix(5).update(np.where(gt == 255, 0, gt), gt).compute()
    assert res["mIoU"] == 1.0 and res["aAcc"] == 1.0 and res["mAcc"] == 1.0
    assert all(math.isnan(v) for v in res["IoU"][3:])
    empty = ConfusionMatrix(3).compute()
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["aAcc"]) and empty["num_pixels"] == 0


def test_all_ignore_adds_nothing():
    cm = ConfusionMatrix(3).update(np.full((2, 2), 7), np.full((2, 2), 255))
    assert cm.matrix.sum() == 0


def test_random_against_brute_force_batches_and_merge():
    rng = np.random.default_rng(0)
    k = 6
    pred = rng.integers(0, k, size=(5, 9, 11))
    gt = rng.integers(0, k, size=(5, 9, 11))
    gt[rng.random(gt.shape) < 0.1] = 255
    single = ConfusionMatrix(k).update(pred, gt)
    np.testing.assert_array_equal(single.matrix, brute_matrix(pred, gt, k))
    parts = [ConfusionMatrix(k).update(pred[i], gt[i]) for i in range(5)]
    merged = ConfusionMatrix(k)
    for p in parts:
        merged.merge(p)
    np.testing.assert_array_equal(merged.matrix, single.matrix)
    summed = parts[0] + parts[1] + parts[2] + parts[3] + parts[4]
    np.testing.assert_array_equal(summed.matrix, single.matrix)
    assert parts[0].matrix.sum() < single.matrix.sum()  # + made a new matrix, parts untouched
    seq = ConfusionMatrix(k)
    for i in range(5):
        seq.update(pred[i], gt[i])
    np.testing.assert_array_equal(seq.matrix, single.matrix)


def test_torch_input_and_dtypes():
    gt = torch.tensor([[0, 1], [1, 255]], dtype=torch.uint8)
    pred = torch.tensor([[0, 1], [0, 1]], dtype=torch.int64)
    cm = ConfusionMatrix(2).update(pred, gt)
    np.testing.assert_array_equal(cm.matrix, [[1, 0], [1, 1]])


@pytest.mark.parametrize(
    "pred, gt, match",
    [
        (np.array([[0, 3]]), np.array([[0, 1]]), "pred values"),
        (np.array([[0, -1]]), np.array([[0, 1]]), "pred values"),
        (np.array([[0, 1]]), np.array([[0, 7]]), "gt values"),
        (np.array([[0, 1]]), np.array([[0, 1, 1]]), "shape"),
        (np.array([[0.0, 1.0]]), np.array([[0, 1]]), "integer"),
        (np.zeros((1, 1, 2, 2), int), np.zeros((1, 1, 2, 2), int), r"\(H, W\)"),
    ],
)
def test_bad_inputs(pred, gt, match):
    with pytest.raises(ValueError, match=match):
        ConfusionMatrix(3).update(pred, gt)


def test_pred_out_of_range_on_ignored_pixel_is_fine():
    ConfusionMatrix(3).update(np.array([[9, 0]]), np.array([[255, 0]]))


def test_merge_mismatch_and_dict_round_trip():
    a = ConfusionMatrix(3).update(np.array([[0, 1, 2]]), np.array([[0, 2, 2]]))
    with pytest.raises(ValueError, match="3 classes"):
        ConfusionMatrix(4).merge(a)
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)
    state = json.loads(json.dumps(a.to_dict()))
    b = ConfusionMatrix.from_dict(state)
    np.testing.assert_array_equal(a.matrix, b.matrix)
    assert b.matrix.dtype == np.int64
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix.from_dict({"num_classes": 2, "matrix": [[1, 2, 3]]})
    with pytest.raises(ValueError, match="not a ConfusionMatrix"):
        ConfusionMatrix.from_dict({"matrix": [[1]]})


def test_format_table():
    res = ConfusionMatrix(3).update(np.array([[0, 1]]), np.array([[0, 1]])).compute()
    text = format_table(res, ["background", "person, man", "cat"])
    assert "| person | 100.00 | 100.00 |" in text
    assert "| cat | - | - |" in text
    assert "| 100.00 | 100.00 | 100.00 |" in text
    with pytest.raises(ValueError, match="2 class names"):
        format_table(res, ["a", "b"])
