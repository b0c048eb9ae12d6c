import math

import pytest
import torch

from modsquad.core.errors import UnknownNameError
from modsquad.tasks.weighting import (
    WEIGHTINGS,
    DynamicWeightAverage,
    EqualWeighting,
    UncertaintyWeighting,
    Weighting,
    build_weighting,
)

TASKS = ["depth_euclidean", "normal"]


def _losses(a=2.0, b=3.0):
    return {"depth_euclidean": torch.tensor(a, requires_grad=True), "normal": torch.tensor(b, requires_grad=True)}


def test_equal_weighting_sums():
    total, weights = EqualWeighting(TASKS)(_losses())
    assert total.item() == pytest.approx(5.0) and weights == {"depth_euclidean": 1.0, "normal": 1.0}


def test_uncertainty_hand_case_and_gradients():
    w = UncertaintyWeighting(TASKS)
    assert [n for n, _ in w.named_parameters()] == ["log_vars"]  # the optimiser sees it
    total, weights = w(_losses())
    assert total.item() == pytest.approx(5.0) and weights["normal"] == pytest.approx(1.0)  # s = 0
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([math.log(2.0), 0.0]))
    losses = _losses()
    total, weights = w(losses)
    assert total.item() == pytest.approx(2.0 / 2 + math.log(2.0) + 3.0)  # exp(-s) L + s
    assert weights["depth_euclidean"] == pytest.approx(0.5)
    total.backward()
    # d/ds (e^-s L + s) = 1 - e^-s L: 1 - 1 = 0 for depth, 1 - 3 = -2 for normal
    assert w.log_vars.grad.tolist() == pytest.approx([0.0, -2.0])
    assert losses["normal"].grad.item() == pytest.approx(1.0)


def test_uncertainty_accepts_a_subset_of_tasks():
    w = UncertaintyWeighting(TASKS, init=math.log(4.0))
    total, weights = w({"normal": torch.tensor(8.0)})
    assert total.item() == pytest.approx(2.0 + math.log(4.0)) and list(weights) == ["normal"]


def test_dwa_hand_case():
    w = DynamicWeightAverage(TASKS, temperature=2.0)
    for epoch in range(2):  # equal weights for the first two epochs
        total, weights = w(_losses())
        assert total.item() == pytest.approx(5.0) and set(weights.values()) == {1.0}
        w.end_epoch({"depth_euclidean": 1.0 if epoch == 0 else 0.5, "normal": 1.0})
    # r = L(e-1) / L(e-2) = [0.5, 1]; lambda = 2 softmax(r / 2) = 2 [e^.25, e^.5] / (e^.25 + e^.5)
    e1, e2 = math.exp(0.25), math.exp(0.5)
    expected = [2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)]
    total, weights = w(_losses())
    assert list(weights.values()) == pytest.approx(expected)
    assert total.item() == pytest.approx(2.0 * expected[0] + 3.0 * expected[1])


def test_dwa_history_survives_state_dict():
    w = DynamicWeightAverage(TASKS)
    w.end_epoch({"depth_euclidean": 2.0, "normal": 1.0})
    w.end_epoch({"depth_euclidean": 1.0, "normal": 1.0})
    restored = DynamicWeightAverage(TASKS)
    restored.load_state_dict(w.state_dict())
    assert restored(_losses())[1] == w(_losses())[1]
    with pytest.raises(KeyError, match="normal"):
        restored.end_epoch({"depth_euclidean": 1.0})


def test_registry_and_builder():
    assert {"equal", "uncertainty", "dwa"} <= set(WEIGHTINGS)
    assert all(issubclass(cls, Weighting) for cls in WEIGHTINGS.values())
    assert isinstance(build_weighting("dwa", TASKS, temperature=1.0), DynamicWeightAverage)
    assert build_weighting("dwa", TASKS, temperature=1.0).temperature == 1.0
    with pytest.raises(UnknownNameError, match="gradnorm"):
        build_weighting("gradnorm", TASKS)


def test_unknown_task_loss_is_an_error():
    with pytest.raises(KeyError, match="semseg"):
        EqualWeighting(TASKS)({"semseg": torch.tensor(1.0)})


def test_official_uncertainty_weighting_formula():
    from modsquad.tasks.weighting import build_weighting

    w = build_weighting("uncertainty_official", ["a", "b"])
    with torch.no_grad():
        w.params.copy_(torch.tensor([1.0, 2.0]))
    losses = {"a": torch.tensor(3.0), "b": torch.tensor(5.0)}
    total, weights = w(losses)
    expected = 0.5 / 1 * 3 + math.log(2.0) + 0.5 / 4 * 5 + math.log(5.0)
    assert total.item() == pytest.approx(expected)
    assert weights == pytest.approx({"a": 0.5, "b": 0.125})
    total.backward()
    assert w.params.grad is not None
