"""Evaluation: per-task metrics of a checkpoint on a split, metrics files and delta_m against baselines.

    from modsquad.evaluate import evaluate
    result = evaluate("runs/tiny", split="val", baseline="runs/tiny_dense")
"""

from .evaluator import evaluate, evaluate_model, load_baseline, read_metrics

__all__ = ["evaluate", "evaluate_model", "load_baseline", "read_metrics"]
