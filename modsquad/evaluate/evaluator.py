"""Evaluation: per-task metrics of a model on a split, metrics.json, and delta_m against baselines.

    result = modsquad.evaluate.evaluate("runs/tiny", split="val", baseline="runs/tiny_dense")
    result["metrics"]["depth_euclidean"]["l1"], result["delta_m"]["mean"]

`evaluate_model` is the loop the trainer also uses: one forward for all tasks per batch, metrics streamed into
`MultiTaskMetrics` and summed over DDP ranks (each rank scores a contiguous, unpadded shard, so no image is
counted twice).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from omegaconf import DictConfig
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..checkpoint import load_model, read_metadata, resolve_checkpoint
from ..core.atomic import atomic_write, ensure_dir
from ..core.devices import DistContext, resolve_device, shard_range
from ..core.errors import CheckpointError, DataError, UserError
from ..data.from_config import eval_dataset
from ..run import Run, metrics_file
from ..tasks import get_task
from ..tasks.metrics import MultiTaskMetrics, delta_m
from ..tasks.visualize import make_grid


def metric_kwargs(cfg: DictConfig | None, tasks: Sequence[str]) -> dict[str, dict]:
    """Per-task metric options from the config (edge tolerance)."""
    tol = cfg.eval.edge_tolerance_px if cfg is not None else None
    return {t: {"tolerance_px": tol} for t in tasks if tol is not None and get_task(t).kind == "edge"}


# --- the loop -------------------------------------------------------------------------------------------

def batch_to_device(batch: Mapping, device: torch.device) -> tuple[torch.Tensor, dict, dict]:
    """A loader batch -> (images [B, 3, H, W], targets {task: t}, masks {task: m}) on `device`."""
    non_blocking = device.type == "cuda"
    images = batch["image"].to(device, non_blocking=non_blocking)
    targets = {t: v.to(device, non_blocking=non_blocking) for t, v in batch["targets"].items()}
    masks = {t: v.to(device, non_blocking=non_blocking) for t, v in batch.get("masks", {}).items()}
    return images, targets, masks


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Dataset, *, batch_size: int = 8, workers: int = 0,
                   device: torch.device | str | None = None, amp: str = "none", ctx: DistContext | None = None,
                   metric_kwargs: Mapping[str, Mapping] | None = None, visualize: int = 0,
                   vis_dir: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Per-task metrics {task: {metric: value}} of `model` over `dataset` (summed over ranks under DDP).

    The model runs in eval mode (its previous mode is restored) with one forward for all its tasks per batch.
    With `visualize` > 0, the first that many samples are drawn as input | prediction | target grids into
    `vis_dir/<id>.png` (main process only).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    tasks = list(model.tasks)
    if ctx is not None and ctx.distributed:
        dataset = Subset(dataset, shard_range(len(dataset), ctx.rank, ctx.world_size))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    metrics = MultiTaskMetrics(tasks, metric_kwargs)
    drawn, draw = 0, visualize > 0 and vis_dir is not None and (ctx is None or ctx.is_main)
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            images, targets, masks = batch_to_device(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                preds = model(images)
            preds = {t: p.float() for t, p in preds.items()}
            metrics.update(preds, {"targets": targets, "masks": masks})
            if draw and drawn < visualize:
                for i in range(min(visualize - drawn, images.shape[0])):
                    grid = make_grid(images[i], {t: p[i] for t, p in preds.items()},
                                     {t: v[i] for t, v in targets.items()}, {t: v[i] for t, v in masks.items()})
                    _write_png(Path(vis_dir) / f"{_sample_name(batch, i, drawn)}.png", grid)
                    drawn += 1
    finally:
        model.train(was_training)
    metrics.sync()
    return metrics.compute()


def _write_png(path: Path, image) -> Path:
    """uint8 RGB [H, W, 3] (or grey [H, W]) as a PNG, written atomically."""
    arr = np.ascontiguousarray(image)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr)
    if not ok:
        raise DataError(f"cannot encode a PNG for {path}")
    return atomic_write(path, lambda tmp: tmp.write_bytes(buf.tobytes()))


def _sample_name(batch: Mapping, i: int, n: int) -> str:
    ids = batch.get("id")
    name = str(ids[i]) if ids is not None and i < len(ids) else f"sample_{n:04d}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# --- metrics files and baselines -----------------------------------------------------------------------

def _json_safe(value):
    """NaN/inf -> None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_metrics(path: str | Path, result: Mapping) -> Path:
    """Write an evaluation result as indented JSON, atomically."""
    text = json.dumps(_json_safe(result), indent=2) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_metrics(path: str | Path, split: str = "val", role: str = "baseline") -> dict[str, dict[str, float]]:
    """Per-task metrics {task: {metric: value}} from a run directory (its metrics file of `split`) or a JSON
    file: a `modsquad eval` result, or a plain {task: {metric: value}} mapping. `role` names the file in errors."""
    path = Path(path)
    file = Run(path).metrics_path(split) if path.is_dir() else path
    if not file.is_file():
        if role == "run" and path.is_dir():
            raise UserError(f"{path}: no {file.name}; run `modsquad eval {path}"
                            f"{'' if split == 'val' else f' --split {split}'}` first")
        hint = f"; run `modsquad eval {path} --split {split}` first" if path.is_dir() else ""
        raise UserError(f"{role} {file} not found{hint}")
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{role} {file}: not a readable JSON file ({e})") from None
    metrics = data.get("metrics", data) if isinstance(data, dict) else None
    if not isinstance(metrics, dict):
        raise UserError(f"{role} {file}: expected {{task: {{metric: value}}}} or a `modsquad eval` metrics.json")
    return metrics


def _logged_eval(run: Run, step: int | None) -> dict | None:
    """The eval record of metrics.jsonl at `step`, else the last one (None when training logged none)."""
    if not run.log_path.is_file():
        return None
    records = []
    for line in run.log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a torn last line of a killed run
            continue
        if isinstance(record, dict) and record.get("kind") == "eval" and isinstance(record.get("metrics"), dict):
            records.append(record)
    return next((r for r in records if r.get("step") == step), records[-1] if records else None)


def run_metrics(path: str | Path, split: str = "val", step: int | None = None) -> tuple[dict, str]:
    """({task: {metric: value}}, where they came from) of a run: its metrics file of `split`, else the
    evaluation training recorded in metrics.jsonl (when `split` is the run's data.val_split)."""
    path = Path(path)
    run = Run(path.parent if path.is_file() else path)
    if run.metrics_path(split).is_file():
        return read_metrics(run.path, split, role="run"), run.metrics_path(split).name
    cfg = run.config_or_none()
    logged = _logged_eval(run, step) if cfg is None or cfg.data.val_split == split else None
    if logged is None:
        raise UserError(f"{run.path}: no {run.metrics_path(split).name} and no {split} evaluation in "
                        f"{run.log_path.name}; run `modsquad eval {run.path}"
                        f"{'' if split == 'val' else f' --split {split}'}` first")
    return logged["metrics"], f"{run.log_path.name} step {logged.get('step')}"


def _baseline_metrics(path: str | Path, split: str) -> dict[str, dict[str, float]]:
    """A baseline's {task: {metric: value}}: a metrics JSON file, or a run's metrics file of `split`, else the
    evaluation its training logged for its checkpoint's step (a baseline that was trained but not evaluated)."""
    path = Path(path)
    if not path.is_dir() or Run(path).metrics_path(split).is_file() or not Run(path).has_checkpoint:
        return read_metrics(path, split)
    step = read_metadata(path).get("step")
    try:
        return run_metrics(path, split, int(step) if step is not None else None)[0]
    except UserError:
        return read_metrics(path, split)  # its message says what to run


def load_baseline(baseline: str | Path | Sequence[str | Path] | None = None,
                  task_baselines: Mapping[str, str | Path] | None = None,
                  split: str = "val") -> dict[str, dict[str, float]] | None:
    """One baseline mapping for `delta_m`: the union of multi-task baselines (later ones win per task) and
    single-task baselines (task -> run dir or metrics JSON, only that task taken from each)."""
    paths = [baseline] if isinstance(baseline, (str, Path)) else list(baseline or [])
    if not paths and not task_baselines:
        return None
    merged: dict[str, dict[str, float]] = {}
    for p in paths:
        merged.update(_baseline_metrics(p, split))
    for task, p in (task_baselines or {}).items():
        metrics = _baseline_metrics(p, split)
        if task not in metrics:
            raise UserError(f"single-task baseline {p} has no results for task {task!r}")
        merged[task] = metrics[task]
    return merged


# --- evaluate a checkpoint ------------------------------------------------------------------------------

def evaluate(checkpoint: str | Path, split: str | None = None,
             baseline: str | Path | Sequence[str | Path] | None = None, *, data_root: str | Path | None = None,
             out: str | Path | None = None, task_baselines: Mapping[str, str | Path] | None = None,
             batch_size: int | None = None, max_images: int | None = None, device: str = "auto",
             workers: int | None = None, visualize: int = 0) -> dict:
    """Evaluate a checkpoint (file or run directory: best, else last) on a split and write its metrics file.

    Data settings come from the run's config.yaml (`data_root` replaces data.root). With `baseline` (run
    dirs or metrics JSON files; defaults to the config's eval.baseline / eval.task_baselines) the result
    also holds delta_m. Writes `metrics.json` (or `metrics_<split>.json`) to `out` (default: the run
    directory) and returns the result dict: {"checkpoint", "step", "split", "num_images", "metrics",
    "primary", ["delta_m", "baseline"], "file"}.
    """
    for name, value in (("batch_size", batch_size), ("max_images", max_images)):
        if value is not None and value < 1:
            raise UserError(f"evaluate: {name} must be at least 1, got {value}")
    if out is not None:
        ensure_dir(out, "--out")
    ckpt = resolve_checkpoint(checkpoint)
    read_metadata(ckpt)  # a file that is no modsquad checkpoint says so before its missing config.yaml does
    run = Run.of(ckpt)
    cfg = run.config()
    if data_root is not None:
        cfg.data.root = str(Path(data_root).absolute())
    split = split or cfg.eval.split
    dev = resolve_device(device)
    model = load_model(ckpt, map_location=dev)
    tasks = list(model.tasks)
    if tasks != list(cfg.model.tasks):
        raise CheckpointError(f"{ckpt} has tasks {tasks} but its {run.config_path} lists "
                              f"{list(cfg.model.tasks)}; the checkpoint belongs to another run")
    dataset, _ = eval_dataset(cfg, split, max_images=max_images)
    out_dir = Path(out) if out is not None else ckpt.parent
    metrics = evaluate_model(model, dataset, batch_size=batch_size or cfg.eval.batch_size or cfg.data.batch_size,
                             workers=cfg.data.workers if workers is None else workers, device=dev,
                             amp=cfg.train.amp if dev.type == "cuda" else "none",
                             metric_kwargs=metric_kwargs(cfg, tasks), visualize=visualize,
                             vis_dir=out_dir / "predictions")
    step = read_metadata(ckpt).get("step")
    result = {"checkpoint": str(ckpt), "step": int(step) if step is not None else None, "split": split,
              "num_images": len(dataset), "metrics": metrics, "primary": {t: get_task(t).primary for t in tasks}}
    if baseline is None and not task_baselines:
        baseline, task_baselines = cfg.eval.baseline, dict(cfg.eval.task_baselines)
    base = load_baseline(baseline, task_baselines, split)
    if base is not None:
        result["delta_m"] = delta_m(metrics, base, tasks)
        result["baseline"] = [str(b) for b in ([baseline] if isinstance(baseline, (str, Path)) else baseline or [])]
        result["baseline"] += [f"{t}={p}" for t, p in (task_baselines or {}).items()]
    result["file"] = str(write_metrics(out_dir / metrics_file(split), result))
    return result


def metrics_table(result: Mapping):
    """A rich Table of an evaluation result: one row per task, primary metric first, delta vs baseline."""
    deltas = result.get("delta_m") or {}
    table = Table(title=f"{result.get('split', '')} metrics (step {result.get('step')})")
    table.add_column("task")
    table.add_column("primary")
    table.add_column("value", justify="right")
    if deltas:
        table.add_column("delta %", justify="right")
    table.add_column("other metrics")

    def fmt(v) -> str:
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"

    for task, values in result["metrics"].items():
        primary = result.get("primary", {}).get(task) or next(iter(values))
        row = [task, primary, fmt(values.get(primary))]
        if deltas:
            row.append(f"{deltas[task]:+.2f}" if task in deltas else "")
        row.append(", ".join(f"{k} {fmt(v)}" for k, v in values.items() if k != primary))
        table.add_row(*row)
    if deltas:
        table.caption = f"delta_m (mean over tasks): {deltas['mean']:+.2f}% vs {', '.join(result.get('baseline', []))}"
    return table
