"""Write a benchmark result (see `modsquad.bench.benchmark`) as bench.json, bench.md and bench.png.

bench.md is a Markdown table to paste in a paper (per task: full, extracted with extracted/full ratios, and when
it was measured the dense timm baseline with the ratios extracted/dense and full/dense); bench.png shows grouped
bars per task for params, FLOPs, latency, throughput and peak memory (full, extracted, dense timm) and the change
of the primary metric of extracted vs full in % (bars that all sit at 100 would say nothing); `summary_table`
renders the same numbers as a rich table for the terminal. Results without a dense baseline render without its
rows/bars. Results read from bench.json files written before the extracted model had that name (ratio key
"pruned_vs_dense" instead of "extracted_vs_dense") render the same.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich import box
from rich.table import Table

from ..core.atomic import atomic_write, ensure_dir
from ..tasks import TASKS

FIELD_KEYS = ("params", "flops", "latency_ms", "throughput", "peak_mem_mb")
DENSE_LABEL = "dense timm"
DENSE_NOTE = ("dense timm: the baseline, a single-task dense timm VisionTransformer of the checkpoint's shape "
              "(no MoE, no task embedding) with the task's head and random weights, timed interleaved with full "
              "and extracted in this run; it has no metrics.")


def human(n: float | None, digits: int = 3) -> str:
    """12345678 -> '12.3M'; small numbers keep `digits` significant digits."""
    if n is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}g}{suffix}"
    return f"{n:.{digits}g}"


def _fixed(value: float | None, decimals: int = 2) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f" ({value:.2f}x)"


def primary_metric(task: str, metrics: dict) -> tuple[str | None, float | None]:
    """(name, value) of the metric that summarises `task` (its TaskSpec's primary, else the first one)."""
    if not metrics:
        return None, None
    spec = TASKS.get(task)
    name = spec.primary if spec is not None and spec.primary in metrics else next(iter(metrics))
    return name, metrics[name]


def _metric_cell(task: str, metrics: dict) -> str:
    name, value = primary_metric(task, metrics)
    return "-" if name is None else f"{name} {value:#.4g}"


def _columns(result: dict) -> list[str]:
    b_lat, b_thr = result["batch_sizes"]["latency"], result["batch_sizes"]["throughput"]
    return ["Params", "FLOPs", f"Latency ms (b={b_lat})", f"Throughput img/s (b={b_thr})", "Peak mem MB"]


def _has_dense(result: dict) -> bool:
    return any("dense_timm" in entry for entry in result["tasks"].values())


def _extracted_vs_dense(ratios: dict) -> dict | None:
    """A task's extracted / dense ratios (key "pruned_vs_dense" in bench.json files written before the rename)."""
    return ratios.get("extracted_vs_dense", ratios.get("pruned_vs_dense"))


def _ratio_cells(ratios: dict | None) -> list[str]:
    r = ratios or {}
    return [_times(r.get(k)) for k in FIELD_KEYS]


def _cells(entry: dict, ratios: dict | None = None) -> list[str]:
    r = ratios or {}
    return [human(entry["params"]) + _ratio(r.get("params")),
            human(entry["flops"]) + _ratio(r.get("flops")),
            _fixed(entry["latency_ms"]) + _ratio(r.get("latency_ms")),
            _fixed(entry["throughput"], 1) + _ratio(r.get("throughput")),
            _fixed(entry["peak_mem_mb"]) + _ratio(r.get("peak_mem_mb"))]


def markdown(result: dict) -> str:
    """bench.md: the header; per task a full and an extracted row (+ dense timm, extracted / dense and full / dense rows
    when the baseline was measured); the full model on all tasks; notes."""
    dense = _has_dense(result)
    cols = ["Task", "Model", *_columns(result), "Primary metric", "max abs diff"]
    timed = "full, extracted and dense timm" if dense else "full and extracted"
    lines = [
        "# modsquad bench: extracted vs full" + (" vs dense timm" if dense else ""),
        "",
        f"Checkpoint `{result.get('checkpoint', '?')}`, extracted models `{result.get('extracted', '?')}`.",
        f"Device {result['device']} ({result.get('device_name', '')}), torch {result['torch']}, "
        f"{result.get('threads', '?')} CPU threads; median of {result['repeats']} timed runs after "
        f"{result['warmup']} warm-up runs, {timed} interleaved in one process.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join([":--", ":--"] + ["--:"] * (len(cols) - 2)) + "|",
    ]
    for task, entry in result["tasks"].items():
        lines.append("| " + " | ".join([task, "full", *_cells(entry["full"]),
                                         _metric_cell(task, entry["full"]["metrics"]), ""]) + " |")
        diff = entry.get("max_abs_diff")
        lines.append("| " + " | ".join(["", "extracted", *_cells(entry, entry.get("ratios")),
                                         _metric_cell(task, entry["metrics"]),
                                         "-" if diff is None else f"{diff:.2e}"]) + " |")
        if "dense_timm" in entry:
            r = entry.get("ratios") or {}
            lines.append("| " + " | ".join(["", DENSE_LABEL, *_cells(entry["dense_timm"]), "-", ""]) + " |")
            vs_dense = (("extracted / dense", _extracted_vs_dense(r)), ("full / dense", r.get("full_vs_dense")))
            for label, values in vs_dense:
                lines.append("| " + " | ".join(["", label, *_ratio_cells(values), "", ""]) + " |")
    full = result["full"]
    lines.append("| " + " | ".join([f"all {len(full.get('tasks', result['tasks']))} tasks", "full (one forward)",
                                     *_cells(full), "", ""]) + " |")
    data = result.get("data") or {}
    lines += ["", "Ratios in parentheses are extracted / full, from figures measured in this run."]
    if dense:
        lines.append(DENSE_NOTE + " The extracted / dense and full / dense rows divide by its figures.")
    if data:
        lines.append(f"Metrics on {data.get('images', '?')} images of the `{data.get('split', 'val')}` split of "
                     f"`{data.get('root', '?')}`.")
    cover = {t: e["heldout_coverage"] for t, e in result["tasks"].items()
             if (e.get("heldout_coverage") or {}).get("coverage") is not None}
    if cover:
        held = all(c.get("held_out") for c in cover.values())
        where = ("held out: usage was counted on another split" if held
                 else "not all held out: some usage was counted on this split")
        lines.append("Routing coverage on these images (share of the full model's top-k choices inside the kept "
                     f"experts; {where}): " + ", ".join(f"{t} {c['coverage']:.1%}" for t, c in cover.items()) + ".")
    lines += ["", "Definitions:", ""]
    lines += [f"- **{k}**: {v}" for k, v in result.get("definitions", {}).items()]
    return "\n".join(lines) + "\n"


def summary_table(result: dict, title: str | None = None) -> Table:
    """A compact rich table (fits 80 columns): per task a full row, an extracted row and an extracted/full row, and
    with the dense timm baseline a dense row and extracted/dense, full/dense rows."""
    b_lat, b_thr = result["batch_sizes"]["latency"], result["batch_sizes"]["throughput"]
    dense = _has_dense(result)
    title = title or ("extracted vs full vs dense timm" if dense else "extracted vs full")
    caption = (f"ms: latency at batch {b_lat}; img/s: throughput at batch {b_thr}; MB: peak memory; "
               f"diff: max |extracted - full|")
    if dense:
        caption += f"; {DENSE_LABEL}: same-shape single-task timm ViT + head, random weights"
    table = Table(title=title, caption=caption,
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    table.add_column("task / model", no_wrap=True)
    for col in ("params", "FLOPs", "ms", "img/s", "MB", "metric", "diff"):
        table.add_column(col, justify="right", no_wrap=True)

    def row(label: str, entry: dict, metric: str | None, diff: str = "", style: str | None = None) -> None:
        value = entry.get("metrics", {}).get(metric) if metric else None
        table.add_row(label, human(entry["params"]), human(entry["flops"]), _short(entry["latency_ms"]),
                      _short(entry["throughput"]), _short(entry["peak_mem_mb"]),
                      "" if value is None else f"{value:#.4g}", diff, style=style)

    for task, entry in result["tasks"].items():
        metric = primary_metric(task, entry["full"]["metrics"])[0]
        table.add_row(f"[bold]{task}[/]", *[""] * 5, metric or "")
        row("  full", entry["full"], metric)
        diff = entry.get("max_abs_diff")
        row("  extracted", entry, metric, "-" if diff is None else f"{diff:.0e}", style="green")
        r = entry.get("ratios") or {}
        ratio_rows = [("  extracted/full", r, _metric_ratio(entry, metric))]
        if "dense_timm" in entry:
            row(f"  {DENSE_LABEL}", entry["dense_timm"], None, style="blue")
            ratio_rows += [("  extracted/dense", _extracted_vs_dense(r), ""),
                           ("  full/dense", r.get("full_vs_dense"), "")]
        for i, (label, values, metric_ratio) in enumerate(ratio_rows):
            table.add_row(label, *_ratio_cells(values), metric_ratio, "", style="dim",
                          end_section=i == len(ratio_rows) - 1)
    row(f"all {len(result['full'].get('tasks', result['tasks']))} tasks, full", result["full"], None)
    return table


def _short(value: float | None) -> str:
    """At most 3 decimals and 5 characters below 1000: 0.123, 1.23, 12.3, 123."""
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _times(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _metric_ratio(entry: dict, metric: str | None) -> str:
    full = entry["full"]["metrics"].get(metric) if metric else None
    extracted = entry["metrics"].get(metric) if metric else None
    return _times(extracted / full) if full and extracted is not None else ""


def metric_change(task: str, entry: dict) -> tuple[str | None, float | None, float | None, float | None]:
    """(metric, full value, extracted value, change in %) of a task's primary metric: (extracted - full) / |full|
    x 100, sign-flipped for lower-is-better metrics so that a positive change always means extracted is better."""
    name, full = primary_metric(task, entry["full"]["metrics"])
    extracted = entry["metrics"].get(name) if name else None
    if name is None or extracted is None or full is None or not full or not math.isfinite(full + extracted):
        return name, full, extracted, None
    spec = TASKS.get(task)
    sign = -1.0 if spec is not None and spec.lower_is_better(name) else 1.0
    return name, full, extracted, sign * 100.0 * (extracted - full) / abs(full)


def plot(result: dict, path: str | Path) -> Path:
    """bench.png: a 2 x 3 grid of panels - params, FLOPs, latency, throughput, peak memory (bars per task: full,
    extracted and, when measured, the dense timm baseline; dashed: the full model on all tasks) and the primary
    metric's change of extracted vs full in % (positive = better, absolute values annotated). One unit per axis;
    the legend sits above the panels, never over ticks."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import EngFormatter

    tasks = list(result["tasks"])
    b = result["batch_sizes"]
    panels = [("params", "Parameters", "count"), ("flops", "FLOPs / image", "FLOPs"),
              ("latency_ms", f"Latency, batch {b['latency']} (lower is better)", "ms"),
              ("throughput", f"Throughput, batch {b['throughput']} (higher is better)", "images / s"),
              ("peak_mem_mb", "Peak memory (lower is better)", "MB")]
    fig, axes = plt.subplots(2, 3, figsize=(13.5, 7.6), squeeze=False)
    x = np.arange(len(tasks))
    dense = [result["tasks"][t].get("dense_timm") for t in tasks]
    has_dense = any(d is not None for d in dense)
    w = 0.27 if has_dense else 0.38
    offsets = (-w, 0.0, w) if has_dense else (-w / 2, w / 2)

    def task_ticks(ax, labels):
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)

    for ax, (key, title, unit) in zip(axes.flat, panels, strict=False):
        full = [result["tasks"][t]["full"].get(key) for t in tasks]
        extracted = [result["tasks"][t].get(key) for t in tasks]
        as_float = [[np.nan if v is None else float(v) for v in vals] for vals in (full, extracted)]
        ax.bar(x + offsets[0], as_float[0], w, label="full", color="#9e9e9e")
        ax.bar(x + offsets[1], as_float[1], w, label="extracted", color="#2e7d32")
        if has_dense:
            ax.bar(x + offsets[2], [np.nan if d is None or d.get(key) is None else d[key] for d in dense], w,
                   label=DENSE_LABEL, color="#1565c0")
        if result["full"].get(key) is not None:
            ax.axhline(result["full"][key], color="#616161", linestyle="--", linewidth=1, label="full, all tasks")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=9)
        if key in ("params", "flops"):
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))
        task_ticks(ax, tasks)
    ax = axes.flat[5]
    changes = [metric_change(t, result["tasks"][t]) for t in tasks]
    if any(c[3] is not None for c in changes):
        values = np.array([np.nan if c[3] is None else c[3] for c in changes])
        colors = ["#2e7d32" if v >= 0 else "#c62828" for v in np.nan_to_num(values)]
        ax.bar(x, values, 0.5, color=colors)
        ax.axhline(0.0, color="black", linewidth=0.8)
        span = max(1.0, float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0)
        ax.set_ylim(-1.45 * span, 1.45 * span)
        for i, (_, full, extracted, change) in enumerate(changes):
            if change is None:
                ax.annotate("n/a", (i, 0.0), ha="center", va="bottom", fontsize=7)
                continue
            label = "\u00b10.0%" if abs(change) < 0.05 else f"{change:+.1f}%"
            ax.annotate(f"{label}\n{extracted:.3g} vs {full:.3g}", (i, change),
                        xytext=(0, 3 if change >= 0 else -3), textcoords="offset points", ha="center",
                        va="bottom" if change >= 0 else "top", fontsize=7)
        ax.set_title("Primary metric, extracted vs full (+ = better)", fontsize=10)
        ax.set_ylabel("change vs full (%)", fontsize=9)
        task_ticks(ax, [f"{t}\n({c[0]})" if c[0] else t for t, c in zip(tasks, changes, strict=True)])
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no metrics measured", ha="center", va="center", fontsize=9, transform=ax.transAxes)
    handles, legend_labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(f"modsquad bench ({result['device']}, torch {result['torch']})", fontsize=11, y=0.995)
    fig.legend(handles, legend_labels, loc="upper center", bbox_to_anchor=(0.5, 0.955), fontsize=9,
               ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def _json_safe(value):
    """NaN / inf -> None, recursively (JSON has no NaN; a metric can be undefined on a small val set)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(result: dict, out: str | Path) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png under `out`; returns {"json", "md", "png"} -> path."""
    out = ensure_dir(out, "bench --out")
    text, md = json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n", markdown(result)
    # each file atomically: a kill leaves the previous report's file or the new one, never a torn one
    return {"json": atomic_write(out / "bench.json", lambda p: p.write_text(text)),
            "md": atomic_write(out / "bench.md", lambda p: p.write_text(md)),
            "png": atomic_write(out / "bench.png", lambda p: plot(result, p))}
