"""Compare trained runs side by side: every task's metrics, delta_m, params, active FLOPs and usage sparsity.

    result = compare_runs(["runs/dense", "runs/per_task", "runs/task_level"], baseline="runs/dense")
    paths = write_compare(result, "compare_out")        # compare.md, compare.json, compare.png

Each run directory must hold a checkpoint (best, else last) and its config.yaml. Metrics come from the metrics
file of the split when there is one (`modsquad eval RUN` writes metrics.json), else from the evaluation training
already recorded in metrics.jsonl (the one at the checkpoint's step, else the last; training evaluates on
data.val_split). Nothing is evaluated here, so a comparison is cheap and repeatable. A run given twice (the same
folder by another path, or a checkpoint file inside it) is compared once.

Columns (also written into compare.json under "definitions"):
    params        parameters of the whole multi-task model
    flops         active forward FLOPs for one image with all tasks in one forward (torch.utils.flop_counter,
                  multiply-add = 2; MoE layers count only the top-k experts each token runs through)
    usage share   mean over tasks and MoE layers of the fraction of a layer's experts that carry 90% of the
                  task's top-k selections (lower = sparser; a top-k layer can never go below about k / E)
    usage MI      mean over MoE layers of the mutual information I(task; expert) of the selection counts
                  (nats; 0 when every task uses the experts alike), with a uniform P(task)
    delta_m       mean over tasks of the signed relative gain of each task's primary metric over the baseline
                  run, in percent (positive = better), on the tasks both runs have
Usage comes from the run's usage.json (`modsquad usage RUN`: an evaluation pass) when there is one, else from
the usage counters saved in the checkpoint (every training and evaluation forward since the start).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from rich.table import Table

from ..checkpoint import load_model, read_metadata, resolve_checkpoint
from ..core.atomic import atomic_write
from ..core.errors import ConfigError, UserError
from ..evaluate.evaluator import run_metrics
from ..extract.usage import check_usage_matches, load_usage
from ..moe import experts_for_mass_count, router_class, router_names
from ..run import USAGE_FILE, Run
from ..tasks import get_task
from ..tasks.metrics import delta_m
from .bench import count_flops
from .report import human

USAGE_MASS = 0.9
DEFINITIONS = {
    "params": "parameters of the whole multi-task model",
    "flops": "active forward FLOPs per image, all tasks in one forward (torch.utils.flop_counter, multiply-add "
             "= 2; MoE layers count only the top-k experts each token uses)",
    "usage_share": f"mean over tasks and MoE layers of the fraction of experts carrying {USAGE_MASS:.0%} of the "
                   "task's top-k selections (lower = sparser)",
    "usage_mi": "mean over MoE layers of I(task; expert) of the selection counts, nats, uniform P(task)",
    "delta_m": "mean over the tasks shared with the baseline of (-1)^lower_is_better (M - M_base) / M_base x 100",
}


# --- per run ----------------------------------------------------------------------------------------------

def _run_dir(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.is_file() else path


def _router_label(model_config: Mapping, aux: Mapping | None) -> tuple[str, str]:
    """('task_level/gumbel_st', 'task_level/gumbel_st +MI') from the model config and the aux loss weights."""
    router = model_config.get("router", "?")
    if router in router_names():  # each router names its own variants (`Router.label`)
        router = router_class(router).label(model_config.get("router_kwargs") or {})
    extras = [] if aux is None or router == "dense" else [
        label for key, label in (("mi", "MI"), ("balance", "bal"), ("z", "z")) if float(aux.get(key) or 0) > 0]
    return router, router + (f" +{'+'.join(extras)}" if extras else "")


def usage_stats(counts: Mapping[str, Mapping[str, Sequence[int]]], mass: float = USAGE_MASS) -> dict | None:
    """Sparsity of {task: {layer: [E] selection counts}}: {"share", "mi", "per_task": {task: share}}; None
    when nothing was counted (a dense model, or no forward yet)."""
    tasks = [t for t, rows in counts.items() if any(sum(r) > 0 for r in rows.values())]
    if not tasks:
        return None
    layers = list(counts[tasks[0]])
    per_task = {}
    for task in tasks:
        shares = [experts_for_mass_count(torch.tensor(counts[task][name]), mass) / len(counts[task][name])
                  for name in layers if sum(counts[task][name]) > 0]
        per_task[task] = sum(shares) / len(shares)
    mis = []
    for name in layers:
        joint = torch.tensor([counts[t][name] for t in tasks], dtype=torch.float64)  # [tasks, E]
        p_e_t = joint / joint.sum(1, keepdim=True).clamp_min(1)
        p_e = p_e_t.mean(0, keepdim=True)
        ratio = torch.where(p_e_t > 0, p_e_t / p_e.clamp_min(1e-300), torch.ones_like(p_e_t))
        mis.append(float((p_e_t * ratio.log()).sum() / len(tasks)))
    return {"share": sum(per_task.values()) / len(per_task), "mi": sum(mis) / len(mis), "per_task": per_task}


def _usage_counts(run: Path, model) -> tuple[dict, str]:
    """Selection counts from the run's usage.json (if it matches the model), else from the checkpoint."""
    path = run / USAGE_FILE
    if path.is_file():
        report = load_usage(path)
        check_usage_matches(report, model, str(path))
        return report["counts"], USAGE_FILE
    return model.expert_usage(), "checkpoint"


def active_flops(model, img_size: int | Sequence[int] | None = None) -> int:
    """Forward FLOPs of one image with all the model's tasks (see the module docstring)."""
    size = img_size if img_size is not None else model.config["img_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.rand(1, model.in_chans, h, w, generator=torch.Generator().manual_seed(0))
    was_training, tracking = model.training, [(m, m.track_usage) for _, m in model.moe_layers()]
    model.eval()
    for m, _ in tracking:
        m.track_usage = False  # keep the loaded counters as they are
    x = x.to(next(model.parameters()).device)
    try:
        with torch.inference_mode():
            model(x)  # first call probes grouped_mm support (a few matmuls) outside the counter
        return count_flops(model, x)
    finally:
        model.train(was_training)
        for m, flag in tracking:
            m.track_usage = flag


def describe_run(path: str | Path, split: str = "val", flops: bool = True) -> dict:
    """Everything `compare_runs` shows about one run directory (see the module docstring)."""
    run = _run_dir(path)
    ckpt = resolve_checkpoint(run)
    step = read_metadata(ckpt).get("step")
    metrics, metrics_source = run_metrics(run, split, int(step) if step is not None else None)
    model = load_model(ckpt)
    aux = None
    cfg = Run(run).config_or_none()
    if cfg is not None:
        aux = dict(cfg.aux)
    router, label = _router_label(model.config, aux)
    counts, usage_source = _usage_counts(run, model) if model.moe_layers() else ({}, None)
    usage = usage_stats(counts) if counts else None
    if usage is not None:
        usage["source"] = usage_source
    return {
        "name": run.name, "path": str(run), "checkpoint": ckpt.name, "step": int(step) if step else None,
        "model": model.config.get("name"), "router": router, "label": label,
        "aux": {k: float(v) for k, v in aux.items() if k != "task_prior"} if aux else None,
        "tasks": list(model.tasks), "primary": {t: get_task(t).primary for t in model.tasks},
        "metrics": {t: metrics[t] for t in model.tasks if t in metrics}, "metrics_source": metrics_source,
        "params": sum(p.numel() for p in model.parameters()),
        "flops": active_flops(model) if flops else None,
        "usage": usage,
    }


def _delta(run: Mapping, base: Mapping) -> dict | None:
    out = {}
    for task in run["tasks"]:
        try:
            out.update({task: delta_m(run["metrics"], base, [task])[task]})
        except (UserError, TypeError, ValueError):  # task missing from either, or a None (NaN) value
            continue
    if not out:
        return None
    out["mean"] = sum(out.values()) / len(out)
    return out


# --- all runs ---------------------------------------------------------------------------------------------

def unique_runs(runs: Sequence[str | Path]) -> list[Path]:
    """`runs` as run folders, each once (first spelling kept): `runs/a`, `./runs/a/` and
    `runs/a/best.safetensors` are one run; a folder `compare` wrote (compare.json, no config.yaml) is left out."""
    seen, out = set(), []
    for r in runs:
        folder = _run_dir(r)
        key = folder.resolve()
        if (folder / "compare.json").is_file() and not Run(folder).has_config:
            continue  # an earlier comparison's folder caught by a glob (`compare runs/*`), not a run
        if key not in seen:
            seen.add(key)
            out.append(folder)
    return out


def default_compare_out(result: Mapping) -> Path:
    """Where `modsquad compare` writes without --out: compare/ in the folder holding all the runs (runs/compare
    for runs/a runs/b), else compare/ inside the first run; never the current folder by surprise."""
    folders = [Path(r["path"]) for r in result["runs"]]
    parents = {f.resolve().parent for f in folders}
    if len(folders) > 1 and len(parents) == 1:
        return folders[0].parent / "compare"
    return folders[0] / "compare"

def compare_runs(runs: Sequence[str | Path], baseline: str | Path | None = None, *, split: str = "val",
                 flops: bool = True) -> dict:
    """Describe every run and its delta_m against `baseline` (a run dir; default: the first dense run among
    `runs`, else none). Returns {"split", "baseline", "tasks", "runs": [describe_run(...) + "delta_m"],
    "definitions"}."""
    if not runs:
        raise ConfigError("compare: give at least one run directory")
    rows = [describe_run(r, split, flops) for r in unique_runs(runs)]
    names = [r["name"] for r in rows]
    for row in rows:  # same directory names in different places: use parent/name
        if names.count(row["name"]) > 1:
            row["name"] = f"{Path(row['path']).parent.name}/{row['name']}"
    base_row = None
    if baseline is not None:
        target = _run_dir(baseline).resolve()
        base_row = next((r for r in rows if Path(r["path"]).resolve() == target), None)
        if base_row is None:
            base_row = describe_run(baseline, split, flops=False)
    else:
        base_row = next((r for r in rows if r["router"] == "dense"), None)
    for row in rows:
        row["delta_m"] = _delta(row, base_row["metrics"]) if base_row is not None else None
    tasks = []
    for row in rows:
        tasks += [t for t in row["tasks"] if t not in tasks]
    return {"split": split, "baseline": base_row["name"] if base_row else None,
            "baseline_path": base_row["path"] if base_row else None, "tasks": tasks, "runs": rows,
            "definitions": DEFINITIONS}


# --- rendering ----------------------------------------------------------------------------------------------

def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _human(n: float | None) -> str:
    return human(n)


def _arrow(task: str) -> str:
    return "↓" if get_task(task).lower_is_better() else "↑"


def _summary_rows(result: Mapping) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the main table: one row per run."""
    tasks = result["tasks"]
    header = ["run", "router", "params", "FLOPs/img", "usage share", "usage MI",
              f"Δm % vs {result['baseline']}" if result["baseline"] else "Δm %",
              *(f"{t} {get_task(t).primary} {_arrow(t)}" for t in tasks)]
    rows = []
    for r in result["runs"]:
        usage = r["usage"] or {}
        star = "*" if usage.get("source") == "checkpoint" else ""
        delta = r["delta_m"]["mean"] if r["delta_m"] else None
        cells = [r["name"], r["label"], _human(r["params"]),
                 _human(r["flops"]),
                 "-" if not usage else f"{usage['share']:.3f}{star}",
                 "-" if not usage else f"{usage['mi']:.3f}{star}",
                 _signed(delta)]
        for t in tasks:
            value = r["metrics"].get(t, {}).get(get_task(t).primary) if t in r["metrics"] else None
            cells.append(_fmt(value))
        rows.append(cells)
    return header, rows


def compare_table(result: Mapping):
    """The summary as a rich Table, one row per run: router, size, compute, usage sparsity and delta_m.
    Task metrics are in `task_metrics_table`, so that both stay readable at 100 columns."""
    header, rows = _summary_rows(result)
    n = 7  # run, router, params, FLOPs, usage share, usage MI, delta_m; then one column per task
    titles = ["run", "router", "params", "FLOPs\n/image", "usage\nshare", "usage MI\nnats",
              f"Δm %\nvs {result['baseline']}" if result["baseline"] else "Δm %"]
    table = Table(title=f"Runs compared on {result['split']}", title_justify="left")
    for i, col in enumerate(titles):
        table.add_column(col, justify="left" if i < 2 else "right", overflow="fold",
                         min_width=min(12, max(len(r[i]) for r in rows)) if i < 2 else None)
    for cells in rows:
        table.add_row(*cells[:n])
    if any((r["usage"] or {}).get("source") == "checkpoint" for r in result["runs"]):
        table.caption = "* usage from the checkpoint's training counters (no usage.json in the run)"
    return table


def task_metrics_table(result: Mapping):
    """Each task's primary metric (rows) for every run (columns): stays narrow however many tasks there are."""
    runs = result["runs"]
    table = Table(title=f"Primary metric per task ({result['split']}; ↓ lower / ↑ higher is better)",
                  title_justify="left")
    table.add_column("task", overflow="fold")
    table.add_column("metric", overflow="fold")
    for r in runs:
        table.add_column(r["name"], justify="right", overflow="fold")
    for t in result["tasks"]:
        primary = get_task(t).primary
        table.add_row(t, f"{primary} {_arrow(t)}",
                      *(_fmt(r["metrics"].get(t, {}).get(primary)) if t in r["metrics"] else "-" for r in runs))
    sources = sorted({r.get("metrics_source") or "?" for r in runs})
    table.caption = f"metrics from {', '.join(sources)}"
    return table


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_markdown(result: Mapping) -> str:
    """The main table of `compare_markdown` alone (one row per run)."""
    return _md_table(*_summary_rows(result))


def compare_markdown(result: Mapping) -> str:
    """compare.md: the main table, every metric of every task, per-task delta and the definitions."""
    header, rows = _summary_rows(result)
    parts = [f"# Run comparison ({result['split']} split)", "",
             f"Baseline for Δm: {result['baseline'] or 'none (give --baseline or include a dense run)'}.", "",
             _md_table(header, rows), ""]
    if any((r["usage"] or {}).get("source") == "checkpoint" for r in result["runs"]):
        parts += ["\\* usage from the checkpoint's training counters (no usage.json in the run).", ""]
    metric_cols = [(t, m) for t in result["tasks"] for m in _metric_names(result, t)]
    parts += ["## All metrics", "",
              _md_table(["run", "router", *(f"{t} {m}" for t, m in metric_cols)],
                        [[r["name"], r["label"], *(_fmt(r["metrics"].get(t, {}).get(m)) for t, m in metric_cols)]
                         for r in result["runs"]]), ""]
    if result["baseline"]:
        parts += [f"## Per-task Δ % vs {result['baseline']}", "",
                  _md_table(["run", "router", *result["tasks"], "mean"],
                            [[r["name"], r["label"],
                              *(_signed((r["delta_m"] or {}).get(t)) for t in [*result["tasks"], "mean"])]
                             for r in result["runs"]]), ""]
    parts += ["## Definitions", "", *(f"- **{k}**: {v}" for k, v in result["definitions"].items()), ""]
    return "\n".join(parts)


def _signed(value) -> str:
    return "-" if value is None else f"{value + 0.0 if abs(value) >= 0.005 else 0.0:+.2f}"


def _metric_names(result: Mapping, task: str) -> list[str]:
    names: list[str] = []
    for r in result["runs"]:
        names += [m for m in r["metrics"].get(task, {}) if m not in names]
    return names


def _barh(ax, y, values, names, xlabel: str, title: str, fmt: str = "{:.3g}", ref: float | None = None) -> None:
    """One horizontal bar per run with its value written at the bar's end; a missing value reads "n/a".
    One quantity per axis, labelled with its unit on the x axis (no legend to collide with the ticks)."""
    import numpy as np

    vals = np.array([np.nan if v is None else float(v) for v in values])
    finite = np.isfinite(vals)
    colors = ["tab:blue"] * len(vals)
    if ref == 0.0:  # signed quantity: green above the baseline, red below
        colors = ["tab:green" if v >= 0 else "tab:red" for v in np.nan_to_num(vals)]
    ax.barh(y, np.where(finite, vals, 0.0), color=colors, height=0.6)
    span = float(np.nanmax(np.abs(vals))) if finite.any() else 1.0
    for yi, v in zip(y, vals, strict=True):
        text, x = ("n/a", 0.0) if not np.isfinite(v) else (fmt.format(v), v)
        ax.text(x + (0.01 * span if x >= 0 else -0.01 * span), yi, f" {text} ", va="center",
                ha="left" if x >= 0 else "right", fontsize=7)
    if ref is not None:
        ax.axvline(ref, color="k", lw=0.8)
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo - 0.15 * (hi - lo) if lo < 0 else lo, hi + 0.15 * (hi - lo))  # room for the value labels
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=10)


def plot_compare(result: Mapping, path: str | Path) -> None:
    """compare.png, one quantity per panel: delta_m, per-task delta heatmap, usage share, usage MI, params and
    active FLOPs (both relative to the baseline run, else the first)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    runs = result["runs"]
    names = [r["name"] for r in runs]
    y = np.arange(len(runs))
    tasks = result["tasks"]
    fig, axes = plt.subplots(3, 2, figsize=(12, 2.2 + 3 * (0.8 + 0.32 * len(runs))), layout="constrained")
    base = result["baseline"]

    ax = axes[0, 0]
    deltas = [(r["delta_m"] or {}).get("mean") for r in runs]
    if any(d is not None for d in deltas):
        _barh(ax, y, deltas, names, f"Δm, % vs {base} (higher is better)", "multi-task gain Δm", "{:+.2f}", ref=0.0)
    else:
        ax.text(0.5, 0.5, "no baseline: give --baseline or include a dense run", ha="center", va="center",
                transform=ax.transAxes, fontsize=8)
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title("multi-task gain Δm", fontsize=10)

    ax = axes[0, 1]
    grid = np.array([[np.nan if (r["delta_m"] or {}).get(t) is None else r["delta_m"][t] for t in tasks]
                     for r in runs], dtype=float)
    if np.isfinite(grid).any():
        lim = max(float(np.nanmax(np.abs(grid))), 1e-6)
        im = ax.imshow(grid, cmap="RdYlGn", vmin=-lim, vmax=lim, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v + 0.0:+.1f}", ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=ax, shrink=0.8).set_label(f"Δ % vs {base}", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_title("per-task Δ of the primary metric", fontsize=10)

    _barh(axes[1, 0], y, [(r["usage"] or {}).get("share") for r in runs], names,
          f"share of experts carrying {USAGE_MASS:.0%} of a task's selections (lower = sparser)",
          "expert usage share", "{:.3f}")
    axes[1, 0].set_xlim(0, 1.15)
    _barh(axes[1, 1], y, [(r["usage"] or {}).get("mi") for r in runs], names,
          "I(task; expert), nats (0 = all tasks use the experts alike)", "task-expert mutual information", "{:.3f}")

    ref = next((r for r in runs if r["name"] == base), runs[0])
    _barh(axes[2, 0], y, [r["params"] / ref["params"] for r in runs], names,
          f"parameters, x {ref['name']} ({_human(ref['params'])})", "model size", "{:.2f}x", ref=1.0)
    flops = [None if r["flops"] is None or not ref["flops"] else r["flops"] / ref["flops"] for r in runs]
    _barh(axes[2, 1], y, flops, names,
          f"active FLOPs per image, all tasks, x {ref['name']} ({_human(ref['flops'])})", "compute", "{:.2f}x",
          ref=1.0 if any(f is not None for f in flops) else None)
    fig.suptitle(f"modsquad compare ({result['split']} split)", fontsize=11)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_compare(result: Mapping, out: str | Path) -> dict[str, Path]:
    """Write compare.md, compare.json and compare.png into `out` (atomically); returns their paths."""
    out = Path(out)
    text = json.dumps(result, indent=1, default=lambda v: None) + "\n"
    return {
        "md": atomic_write(out / "compare.md", lambda p: p.write_text(compare_markdown(result))),
        "json": atomic_write(out / "compare.json", lambda p: p.write_text(text)),
        "png": atomic_write(out / "compare.png", lambda p: plot_compare(result, p)),
    }


__all__ = ["DEFINITIONS", "active_flops", "compare_markdown", "compare_runs", "compare_table",
           "default_compare_out", "describe_run", "plot_compare", "run_metrics", "summary_markdown",
           "task_metrics_table", "unique_runs", "usage_stats", "write_compare"]
