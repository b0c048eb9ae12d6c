"""Which evaluation is the best so far: one score per evaluation, delta_m against a named reference.

The score is delta_m (mean relative change of each task's primary metric, in %, signed so that higher is
better; `tasks.metrics.delta_m`) against eval.baseline / eval.task_baselines when set, else against the run's
own first evaluation. Tasks whose reference value is 0 (an untrained model's first mIoU / F) have no relative
change: they are left out of the mean and named in `skips`; until some task has a score, every evaluation
counts as the best, so best.safetensors exists after the first evaluation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..core.errors import UserError
from ..tasks.metrics import delta_m, zero_baseline_tasks


@dataclass(frozen=True)
class Evaluation:
    """One scored evaluation. `score` is NaN when it is undefined (a task missing from the reference)."""

    step: int
    metrics: dict
    score: float
    improved: bool
    reference: str  # what the score compares with, e.g. "this run's first evaluation (step 12)"
    skips: list[str] = field(default_factory=list)

    @property
    def has_score(self) -> bool:
        return math.isfinite(self.score)


def baseline_label(baseline: str | None, task_baselines: Mapping[str, str] | None) -> str | None:
    """How the configured reference is named in the log ("baseline runs/a", "task baselines normal=runs/b")."""
    parts = [f"baseline {baseline}"] if baseline else []
    if task_baselines:
        parts.append("task baselines " + ", ".join(f"{t}={p}" for t, p in task_baselines.items()))
    return "; ".join(parts) or None


class BestTracker:
    """Scores evaluations and remembers the best; `reference` None means: the first evaluation becomes it."""

    def __init__(self, tasks: Sequence[str], reference: dict | None = None, reference_label: str | None = None):
        self.tasks = list(tasks)
        self.reference, self.reference_label = reference, reference_label
        self.best_score: float | None = None
        self.last_metrics: dict | None = None
        self.last_step: int | None = None  # the step of the latest evaluation (None: none yet)

    def update(self, metrics: dict, step: int) -> Evaluation:
        """Score `metrics` (taken at `step`) and return the evaluation, `improved` when it is a new best."""
        if self.reference is None:
            self.reference, self.reference_label = metrics, f"this run's first evaluation (step {step})"
        try:
            score = delta_m(metrics, self.reference, self.tasks, skip_zero_baselines=True)["mean"]
            skips = zero_baseline_tasks(self.reference, self.tasks)
        except UserError:  # a task missing from the reference
            score, skips = math.nan, list(self.tasks)
        if math.isfinite(score):
            improved = self.best_score is None or score > self.best_score
            if improved:
                self.best_score = score
        else:
            improved = self.best_score is None
        self.last_metrics, self.last_step = metrics, step
        return Evaluation(step, metrics, score, improved, self.reference_label or "the reference", skips)

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "reference": json.dumps(self.reference),
                "last_metrics": json.dumps(self.last_metrics), "reference_label": self.reference_label or "",
                "last_eval_step": -1 if self.last_step is None else self.last_step}

    def load_state_dict(self, state: Mapping) -> None:
        """A configured reference (eval.baseline) wins over the saved one, as when the run started."""
        self.best_score = state["best_score"]
        if self.reference is None:
            self.reference = json.loads(state["reference"])
            self.reference_label = state.get("reference_label") or "this run's first evaluation"
        self.last_metrics = json.loads(state["last_metrics"])
        # a state.pt of an older modsquad has no last_eval_step: its own step counts as evaluated, as resume took it
        step = int(state.get("last_eval_step", state.get("step", -1)))
        self.last_step = None if step < 0 else step


__all__ = ["BestTracker", "Evaluation", "baseline_label"]
