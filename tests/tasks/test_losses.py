import math

import pytest
import torch

from modsquad.core.errors import UnknownNameError
from modsquad.tasks.losses import (
    EDGE_POS_WEIGHT,
    TASK_LOSSES,
    bce_loss,
    cosine_loss,
    cross_entropy_loss,
    l1_loss,
    soft_cross_entropy_loss,
    task_loss,
)
from modsquad.tasks.registry import IGNORE_INDEX, TASKS, TaskSpec, get_task

LN2 = math.log(2.0)


def test_l1_hand_case_masks_pixels():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    mask = torch.tensor([[True, True], [True, False]]).view(1, 2, 2)
    # |1| + |2| + |3| over 3 valid pixels; the 4 at the masked pixel is ignored
    assert l1_loss(pred, torch.zeros_like(pred), mask).item() == pytest.approx(2.0)


def test_l1_averages_over_channels():
    pred = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[1.0, 1.0], [3.0, 3.0]]).view(1, 2, 1, 2)
    # channel 0 errors 1, 1; channel 1 errors 3, 3 -> mean 2
    assert l1_loss(pred, target).item() == pytest.approx(2.0)


def test_prediction_is_resized_to_target_not_the_labels():
    pred = torch.ones(2, 1, 2, 2)  # bilinear upsampling of a constant stays 1
    assert l1_loss(pred, torch.zeros(2, 1, 8, 8), torch.ones(2, 8, 8, dtype=torch.bool)).item() == pytest.approx(1.0)
    logits = torch.zeros(1, 3, 2, 2)
    assert cross_entropy_loss(logits, torch.zeros(1, 8, 8, dtype=torch.long)).item() == pytest.approx(math.log(3))


def test_cosine_loss_hand_cases():
    z = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    x = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert cosine_loss(5 * z, z).item() == pytest.approx(0.0, abs=1e-6)  # scale of the prediction ignored
    assert cosine_loss(-z, z).item() == pytest.approx(2.0)
    assert cosine_loss(x, z).item() == pytest.approx(1.0)
    both_p, both_t = torch.cat([z, x], dim=3), torch.cat([z, z], dim=3)
    assert cosine_loss(both_p, both_t).item() == pytest.approx(0.5)  # (0 + 1) / 2
    assert cosine_loss(both_p, both_t, torch.tensor([[[True, False]]])).item() == pytest.approx(0.0, abs=1e-6)


def test_cross_entropy_ignores_unlabelled_and_masked_pixels():
    logits = torch.zeros(1, 2, 1, 3)
    logits[0, 1, 0, 2] = 100.0  # confident (and wrong: label 0) on the last pixel
    target = torch.tensor([[[0, IGNORE_INDEX, 0]]])
    # pixel 0: ln 2; pixel 1 ignored; pixel 2: ~100
    assert cross_entropy_loss(logits, target).item() == pytest.approx((LN2 + 100.0) / 2, rel=1e-4)
    mask = torch.tensor([[[True, True, False]]])
    assert cross_entropy_loss(logits, target, mask).item() == pytest.approx(LN2)


def test_soft_cross_entropy_hand_cases():
    logits = torch.zeros(3, 4)  # uniform prediction: -sum t log(1/4) = ln 4 for any soft target
    target = torch.tensor([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0, 0, 0, 1.0]])
    assert soft_cross_entropy_loss(logits, target).item() == pytest.approx(math.log(4))
    logits[2, 3] = 50.0  # sample 2 now right with certainty
    mask = torch.tensor([False, False, True])
    assert soft_cross_entropy_loss(logits, target, mask).item() == pytest.approx(0.0, abs=1e-5)


def test_bce_plain_and_class_balanced():
    logits = torch.zeros(1, 1, 1, 4)  # every pixel: -log sigmoid(0) = ln 2
    target = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)
    assert bce_loss(logits, target).item() == pytest.approx(LN2)
    # fixed w: (0.95 ln2 + 3 * 0.05 ln2) / 4
    assert bce_loss(logits, target, pos_weight=0.95).item() == pytest.approx((0.95 + 3 * 0.05) * LN2 / 4)
    # auto: w = share of negatives = 3/4 -> (0.75 + 3 * 0.25) ln2 / 4
    assert bce_loss(logits, target, pos_weight="auto").item() == pytest.approx(1.5 * LN2 / 4)


def test_edge_task_uses_balanced_bce_by_default():
    spec = get_task("edge")
    logits, target = torch.zeros(1, 1, 1, 2), torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    expected = (EDGE_POS_WEIGHT + (1 - EDGE_POS_WEIGHT)) * LN2 / 2
    assert task_loss(spec, logits, target).item() == pytest.approx(expected)
    assert task_loss(spec, logits, target, pos_weight=None).item() == pytest.approx(LN2)


@pytest.mark.parametrize("name", ["l1", "cosine", "ce", "bce"])
def test_all_invalid_batch_gives_zero_with_grad(name):
    pred = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), IGNORE_INDEX) if name == "ce" else torch.full((2, 3, 4, 4), float("nan"))
    loss = TASK_LOSSES[name](pred, target, torch.zeros(2, 4, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() == 0


def test_soft_ce_all_masked_gives_zero_with_grad():
    pred = torch.randn(2, 5, requires_grad=True)
    loss = soft_cross_entropy_loss(pred, torch.full((2, 5), 0.2), torch.zeros(2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(pred.grad).all()


def _random_batch(spec: TaskSpec, b=2, h=8, w=8):
    if spec.kind == "classification":
        return torch.randn(b, spec.channels), torch.softmax(torch.randn(b, spec.channels), -1), torch.ones(b) > 0
    mask = torch.rand(b, h, w) > 0.2
    if spec.kind == "segmentation":
        target = torch.randint(0, spec.channels, (b, h, w))
    elif spec.kind in ("saliency", "edge"):
        target = (torch.rand(b, 1, h, w) > 0.8).float()
    else:
        target = torch.randn(b, spec.channels, h, w)
    return torch.randn(b, spec.channels, h // 2, w // 2), target, mask


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_registered_task_has_a_finite_differentiable_loss(name):
    spec = get_task(name)
    assert spec.loss in TASK_LOSSES
    pred, target, mask = _random_batch(spec)
    pred.requires_grad_(True)
    loss = task_loss(spec, pred, target, mask)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_unknown_loss_names_the_task():
    spec = TaskSpec("mystery", 1, "regression", "huber", ("l1",))
    with pytest.raises(UnknownNameError, match="mystery.*huber"):
        task_loss(spec, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
