"""The objective: weighted task losses + weighted aux terms (the model's and registered ones), clamped; and the
best tracker's explicit result."""

import math

import pytest
import torch

from modsquad.tasks.weighting import build_weighting
from modsquad.train import objective as objective_module
from modsquad.train.best import BestTracker, baseline_label
from modsquad.train.objective import Objective

TASKS = ["depth_euclidean", "normal"]


class _Model(torch.nn.Module):
    def aux_losses(self):
        return {"mi": torch.tensor(-2.0), "z": torch.tensor(3.0)}


def _batch():
    g = torch.Generator().manual_seed(0)
    preds = {"depth_euclidean": torch.rand(2, 1, 8, 8, generator=g), "normal": torch.rand(2, 3, 8, 8, generator=g)}
    targets = {t: torch.rand(p.shape, generator=g) for t, p in preds.items()}
    return preds, targets


def test_total_is_weighted_tasks_plus_weighted_aux_terms(monkeypatch):
    monkeypatch.setitem(objective_module.AUX_TERMS, "pred_l2", lambda model, preds: preds["normal"].pow(2).mean())
    preds, targets = _batch()
    objective = Objective(TASKS, build_weighting("equal", TASKS), {"mi": 0.5, "z": 0.0, "pred_l2": 0.1})
    loss = objective(_Model(), preds, targets, {})
    task_sum = loss.terms["loss/depth_euclidean"] + loss.terms["loss/normal"]
    expected = task_sum + 0.5 * -2.0 + 0.1 * preds["normal"].pow(2).mean()  # z: weight 0, logged only
    assert set(loss.terms) == {"loss/depth_euclidean", "loss/normal", "aux/mi", "aux/z", "aux/pred_l2", "loss"}
    torch.testing.assert_close(loss.total, expected)
    assert loss.weights == {"depth_euclidean": 1.0, "normal": 1.0}

    clamped = Objective(TASKS, build_weighting("equal", TASKS), {"z": 1.0}, clamp=0.01)(_Model(), preds, targets, {})
    assert clamped.total.item() == pytest.approx(0.01) and clamped.terms["loss"].item() > 0.01


def test_best_tracker_returns_whether_it_improved():
    tracker = BestTracker(["normal"])
    first = tracker.update({"normal": {"mean_angle": 40.0}}, step=5)
    assert first.improved and first.score == 0.0 and first.reference == "this run's first evaluation (step 5)"
    better = tracker.update({"normal": {"mean_angle": 30.0}}, step=10)  # lower angle: +25%
    assert better.improved and better.score == pytest.approx(25.0)
    worse = tracker.update({"normal": {"mean_angle": 35.0}}, step=15)
    assert not worse.improved and tracker.best_score == pytest.approx(25.0)

    restored = BestTracker(["normal"])
    restored.load_state_dict(tracker.state_dict())
    assert restored.update({"normal": {"mean_angle": 40.0}}, 20).reference == "this run's first evaluation (step 5)"

    missing = BestTracker(["normal"], {"depth_euclidean": {"l1": 1.0}}, baseline_label("runs/base", None))
    ev = missing.update({"normal": {"mean_angle": 40.0}}, 1)
    assert math.isnan(ev.score) and ev.improved and ev.reference == "baseline runs/base"
    assert baseline_label(None, {"normal": "runs/n"}) == "task baselines normal=runs/n"


def test_non_finite_terms_names_the_term_or_the_weighting():
    from modsquad.core.devices import DistContext
    from modsquad.train.objective import non_finite_terms

    ctx = DistContext()
    assert non_finite_terms({"loss": torch.tensor(1.0), "loss/a": torch.tensor(2.0)}, ctx) == []
    assert non_finite_terms({"loss": torch.tensor(math.inf), "loss/a": torch.tensor(math.nan)}, ctx) == ["loss/a"]
    (only,) = non_finite_terms({"loss": torch.tensor(math.inf), "loss/a": torch.tensor(2.0)}, ctx)
    assert only.startswith("loss (") and "weighting" in only
