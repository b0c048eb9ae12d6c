"""Write a benchmark result (see `modsquad.bench.benchmark`) as bench.json, bench.md and bench.png.

bench.md is a Markdown table to paste in a paper (per task: full, pruned with pruned/full ratios, and when it
was measured the dense timm baseline with the ratios pruned/dense and full/dense), bench.png shows grouped bars
per task (params, FLOPs, latency: full, pruned, dense timm; primary metric: full vs pruned), and `summary_table`
renders the same numbers as a rich table for the terminal. Results without a dense baseline render as before.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich import box
from rich.table import Table

from ..tasks import TASKS

FIELD_KEYS = ("params", "flops", "latency_ms", "throughput", "peak_mem_mb")
DENSE_LABEL = "dense timm"
DENSE_NOTE = ("dense timm: the baseline, a single-task dense timm VisionTransformer of the checkpoint's shape "
              "(no MoE, no task embedding) with the task's head and random weights, timed interleaved with full "
              "and pruned in this run; it has no metrics.")
PLOT_FIELDS = (("params", "Parameters"), ("flops", "FLOPs / image"), ("latency_ms", "Latency (ms, batch {b})"))


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
    """bench.md: the header; per task a full and a pruned row (+ dense timm, pruned / dense and full / dense rows
    when the baseline was measured); the full model on all tasks; notes."""
    dense = _has_dense(result)
    cols = ["Task", "Model", *_columns(result), "Primary metric", "max abs diff"]
    timed = "full, pruned and dense timm" if dense else "full and pruned"
    lines = [
        "# modsquad bench: pruned vs full" + (" vs dense timm" if dense else ""),
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
        lines.append("| " + " | ".join(["", "pruned", *_cells(entry, entry.get("ratios")),
                                         _metric_cell(task, entry["metrics"]),
                                         "-" if diff is None else f"{diff:.2e}"]) + " |")
        if "dense_timm" in entry:
            r = entry.get("ratios") or {}
            lines.append("| " + " | ".join(["", DENSE_LABEL, *_cells(entry["dense_timm"]), "-", ""]) + " |")
            for label, key in (("pruned / dense", "pruned_vs_dense"), ("full / dense", "full_vs_dense")):
                lines.append("| " + " | ".join(["", label, *_ratio_cells(r.get(key)), "", ""]) + " |")
    full = result["full"]
    lines.append("| " + " | ".join([f"all {len(full.get('tasks', result['tasks']))} tasks", "full (one forward)",
                                     *_cells(full), "", ""]) + " |")
    data = result.get("data") or {}
    lines += ["", "Ratios in parentheses are pruned / full, from figures measured in this run."]
    if dense:
        lines.append(DENSE_NOTE + " The pruned / dense and full / dense rows divide by its figures.")
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
    """A compact rich table (fits 80 columns): per task a full row, a pruned row and a pruned/full row, and with
    the dense timm baseline a dense row and pruned/dense, full/dense rows."""
    b_lat, b_thr = result["batch_sizes"]["latency"], result["batch_sizes"]["throughput"]
    dense = _has_dense(result)
    title = title or ("pruned vs full vs dense timm" if dense else "pruned vs full")
    caption = (f"ms: latency at batch {b_lat}; img/s: throughput at batch {b_thr}; MB: peak memory; "
               f"diff: max |pruned - full|")
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
        row("  pruned", entry, metric, "-" if diff is None else f"{diff:.0e}", style="green")
        r = entry.get("ratios") or {}
        ratio_rows = [("  pruned/full", r, _metric_ratio(entry, metric))]
        if "dense_timm" in entry:
            row(f"  {DENSE_LABEL}", entry["dense_timm"], None, style="blue")
            ratio_rows += [("  pruned/dense", r.get("pruned_vs_dense"), ""), ("  full/dense", r.get("full_vs_dense"), "")]
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
    pruned = entry["metrics"].get(metric) if metric else None
    return _times(pruned / full) if full and pruned is not None else ""


def plot(result: dict, path: str | Path) -> Path:
    """bench.png: one panel per figure (params, FLOPs, latency, primary metric); bars per task: full, pruned and
    (params, FLOPs, latency; when measured) the dense timm baseline."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import EngFormatter

    tasks = list(result["tasks"])
    panels = [(k, t.format(b=result["batch_sizes"]["latency"])) for k, t in PLOT_FIELDS]
    has_metrics = any(result["tasks"][t]["metrics"] for t in tasks)
    fig, axes = plt.subplots(1, len(panels) + has_metrics, figsize=(3.6 * (len(panels) + has_metrics), 3.6),
                             squeeze=False)
    x = np.arange(len(tasks))
    width = 0.38
    dense = [result["tasks"][t].get("dense_timm") for t in tasks]
    has_dense = any(d is not None for d in dense)

    def bars(ax, full, pruned, title, baseline=None):
        w = width if baseline is None else 0.27
        offsets = (-w / 2, w / 2) if baseline is None else (-w, 0.0)
        ax.bar(x + offsets[0], full, w, label="full", color="#9e9e9e")
        ax.bar(x + offsets[1], pruned, w, label="pruned", color="#2e7d32")
        if baseline is not None:
            ax.bar(x + w, baseline, w, label=DENSE_LABEL, color="#1565c0")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x)
        ax.tick_params(axis="x", labelsize=7, rotation=30)
        ax.grid(axis="y", alpha=0.3)

    for ax, (key, title) in zip(axes[0], panels, strict=False):
        baseline = [np.nan if d is None else d[key] for d in dense] if has_dense else None
        bars(ax, [result["tasks"][t]["full"][key] for t in tasks], [result["tasks"][t][key] for t in tasks], title,
             baseline)
        ax.axhline(result["full"][key], color="#616161", linestyle="--", linewidth=1, label="full, all tasks")
        ax.set_xticklabels(tasks, ha="right")
        if key != "latency_ms":
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    if has_metrics:
        # Metrics differ in scale between tasks: bars are relative to the full model (= 100), labels absolute.
        ax = axes[0][-1]
        names, rel_full, rel_pruned, labels = [], [], [], []
        for t in tasks:
            name, full = primary_metric(t, result["tasks"][t]["full"]["metrics"])
            pruned = result["tasks"][t]["metrics"].get(name) if name else None
            names.append(f"{t}\n({name})")
            ok = full not in (None, 0) and pruned is not None
            rel_full.append(100.0 if ok else np.nan)
            rel_pruned.append(100.0 * pruned / full if ok else np.nan)
            labels.append((full, pruned))
        bars(ax, rel_full, rel_pruned, "Primary metric (val, full = 100)")
        ax.set_xticklabels(names, ha="right")
        for i, (full, pruned) in enumerate(labels):
            for dx, value, height in ((-width / 2, full, rel_full[i]), (width / 2, pruned, rel_pruned[i])):
                if value is not None:
                    y = 0.0 if np.isnan(height) else height
                    ax.annotate(f"{value:.3g}", (i + dx, y), xytext=(0, 2), textcoords="offset points",
                                ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_ylim(0, 1.3 * max([100.0, *[v for v in rel_pruned if not np.isnan(v)]]))
    handles, legend_labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, legend_labels, loc="upper right", fontsize=8, ncol=len(handles))
    fig.suptitle(f"modsquad bench ({result['device']}, torch {result['torch']})", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, format="png")
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
    from ..core.atomic import atomic_write, ensure_dir

    out = ensure_dir(out, "bench --out")
    text, md = json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n", markdown(result)
    # each file atomically: a kill leaves the previous report's file or the new one, never a torn one
    return {"json": atomic_write(out / "bench.json", lambda p: p.write_text(text)),
            "md": atomic_write(out / "bench.md", lambda p: p.write_text(md)),
            "png": atomic_write(out / "bench.png", lambda p: plot(result, p))}
