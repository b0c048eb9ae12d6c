#!/usr/bin/env python
"""A small routing study on the built-in synthetic suite, end to end on CPU (about 10-15 minutes on 2 cores).

What it runs, all on one rendered suite and one seed:
  1. routers: the dense baseline and every router of the packaged synthetic_tiny*.yaml configs (per_task, task_conditioned,
     shared, task_level softmax / gumbel / gumbel_st), each with and without the MI loss, on 4 tasks
     (depth_euclidean, normal, edge_texture, keypoints2d); each run is evaluated and its expert usage
     counted on the val split, then `modsquad compare` puts them side by side (delta_m vs dense).
  2. add a task: `reshading` is added to the per_task + MI run with --freeze experts (router started from
     `normal`), --freeze backbone and no freezing; old-task metrics before/after, and a check that the old
     tasks' outputs stay bit-identical with frozen experts.
  3. few-shot transfer: reshading with N training images (data.max_images=N), frozen experts vs a single-task
     model of the same architecture trained from scratch on the same N images.
It writes OUT/report/study_synthetic.md (tables, as measured) and PNGs beside it; every run directory stays in
OUT, and a rerun reuses the runs that are already evaluated.

    .venv/bin/python tools/study_synthetic.py --out study_out                 # default size
    .venv/bin/python tools/study_synthetic.py --out study_out --steps 400 --images 768 --size 64
    .venv/bin/python tools/study_synthetic.py --quick --out /tmp/study        # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console

from modsquad.bench.compare import compare_runs, summary_markdown, write_compare
from modsquad.checkpoint import load_model
from modsquad.config import CONFIG_DIR, load_config
from modsquad.core.atomic import atomic_write
from modsquad.data import synthesize
from modsquad.evaluate import evaluate
from modsquad.extract.usage import compute_usage, save_usage
from modsquad.tasks import get_task
from modsquad.train import train
from modsquad.train.transfer import train_add_tasks

CONFIGS = CONFIG_DIR
#: Two 3-D and two 2-D tasks. segment_semantic is not among them: at 32 px and 300 steps every model of a first
#: try predicted only the background class (miou 5.4 % in all 13 runs), which cannot tell routers apart.
TASKS = ["depth_euclidean", "normal", "edge_texture", "keypoints2d"]
NEW_TASK, RELATED_TASK = "reshading", "normal"
#: (run name, config file): the MI-off / MI-on pairs of every router, and the dense baseline
ROUTER_RUNS = [
    ("dense", "synthetic_tiny_dense"),
    ("per_task", "synthetic_tiny_no_mi"), ("per_task_mi", "synthetic_tiny"),
    ("task_conditioned", "synthetic_tiny_task_conditioned"), ("task_conditioned_mi", "synthetic_tiny_task_conditioned_mi"),
    ("shared", "synthetic_tiny_shared"), ("shared_mi", "synthetic_tiny_shared_mi"),
    ("task_level_softmax", "synthetic_tiny_task_level_softmax"),
    ("task_level_softmax_mi", "synthetic_tiny_task_level_softmax_mi"),
    ("task_level_gumbel", "synthetic_tiny_task_level_gumbel"), ("task_level_gumbel_mi", "synthetic_tiny_task_level_gumbel_mi"),
    ("task_level_gumbel_st", "synthetic_tiny_task_level_gumbel_st"),
    ("task_level_gumbel_st_mi", "synthetic_tiny_task_level_gumbel_st_mi"),
]
QUICK_RUNS = ["dense", "per_task", "per_task_mi"]
QUICK_MODEL = ["model.overrides.embed_dim=32", "model.overrides.depth=2", "model.overrides.num_heads=2",
               "model.overrides.attn_head_dim=16", "model.overrides.mlp_expert_hidden=32",
               "model.overrides.attn_experts=4", "model.overrides.mlp_experts=4"]
SOURCE_RUN = "per_task_mi"

console = Console()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("study_out"), help="run directories, data and the report")
    p.add_argument("--report-dir", type=Path, default=None, help="where the markdown + PNGs go (default OUT/report)")
    p.add_argument("--images", type=int, default=384, help="synthetic images (split 6/1/1 by building)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (model img_size)")
    p.add_argument("--steps", type=int, default=300, help="training steps of each router run")
    p.add_argument("--add-steps", type=int, default=150, help="training steps of each add-a-task / few-shot run")
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--shots", default="8,16,32,64", help="training images of the few-shot runs (plus 'all')")
    p.add_argument("--runs", default=None, help="comma-separated subset of the router runs")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"tasks of the router runs (the new task is {NEW_TASK})")
    p.add_argument("--mi-weight", type=float, default=None, help="MI loss weight of the +MI runs (default: "
                   "the configs' 0.005)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny everything: a smoke test of the whole pipeline")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if NEW_TASK in args.tasks or RELATED_TASK not in args.tasks:
        p.error(f"--tasks must include {RELATED_TASK} and not {NEW_TASK} (the task that gets added)")
    if args.quick:
        args.images, args.size, args.steps, args.add_steps, args.batch, args.shots = 32, 32, 2, 2, 4, "4"
        args.runs = args.runs or ",".join(QUICK_RUNS)
    return args


# --- runs ---------------------------------------------------------------------------------------------------

def base_overrides(args, root: Path) -> list[str]:
    """Settings every run shares: data, size, schedule. No evaluation during training (val_split empty) and one
    checkpoint at the end (few-shot runs have one-step epochs); each run is evaluated once on the val split."""
    out = [f"data.root={root}", f"data.batch_size={args.batch}", "data.workers=0", "data.val_split=",
           f"model.img_size={args.size}", f"train.seed={args.seed}", "train.device=cpu",
           f"train.warmup_steps={max(1, args.steps // 15)}", f"train.log_every={max(1, args.steps // 5)}",
           "train.eval_every=1000000", "output.visualize=0", "output.save_every=1000000"]
    return out + (QUICK_MODEL if args.quick else [])


def evaluated(run: Path) -> bool:
    return (run / "metrics.json").is_file()


def finish_run(run: Path, moe: bool, seconds: float) -> None:
    """Count expert usage on the val split (usage.json), evaluate on it (metrics.json, written last: it marks
    the run as done) and record how long the run took (study_seconds.txt, so a rerun reports the same times)."""
    t0 = time.perf_counter()
    if moe:
        save_usage(compute_usage(run, split="val", device="cpu"), run)
    evaluate(run, "val", device="cpu")
    text = f"{seconds + time.perf_counter() - t0:.1f}\n"
    atomic_write(run / "study_seconds.txt", lambda p: p.write_text(text))


def run_seconds(run: Path) -> float:
    """Training + evaluation time of a run as measured when it was made (0 if not recorded)."""
    path = run / "study_seconds.txt"
    return float(path.read_text()) if path.is_file() else 0.0


def train_router_runs(args, root: Path, names: list[str]) -> dict[str, Path]:
    runs = {}
    for name, config in ROUTER_RUNS:
        if name not in names:
            continue
        run = args.out / "runs" / name
        runs[name] = run
        if evaluated(run):
            console.print(f"[dim]{name}: already evaluated, reused[/]")
            continue
        shutil.rmtree(run, ignore_errors=True)
        mi = [f"aux.mi={args.mi_weight}"] if args.mi_weight is not None and name.endswith("_mi") else []
        cfg = load_config(CONFIGS / f"{config}.yaml", [*base_overrides(args, root), f"train.steps={args.steps}",
                                                       f"model.tasks=[{','.join(args.tasks)}]", *mi])
        t0 = time.perf_counter()
        train(cfg, run, progress=False, console=Console(quiet=True))
        finish_run(run, moe=not cfg.model.name.startswith("dense_"), seconds=time.perf_counter() - t0)
        console.print(f"{name}: trained {args.steps} steps and evaluated in {run_seconds(run):.0f} s")
    return runs


def add_task_run(args, root: Path, source: Path, name: str, freeze: str, router_init: str | None,
                 shots: int | None = None) -> Path:
    run = args.out / "runs" / name
    if evaluated(run):
        return run
    shutil.rmtree(run, ignore_errors=True)
    batch = min(args.batch, shots) if shots else args.batch
    overrides = [o for o in base_overrides(args, root) if not o.startswith(("model.", "data.root"))]
    overrides += [f"train.steps={args.add_steps}", f"data.batch_size={batch}",
                  f"train.warmup_steps={max(1, args.add_steps // 15)}", f"train.log_every={max(1, args.add_steps // 5)}"]
    if shots:
        overrides.append(f"data.max_images={shots}")
    t0 = time.perf_counter()
    train_add_tasks(source, [NEW_TASK], run, freeze=freeze, router_init_from=router_init, overrides=overrides,
                    progress=False, console=Console(quiet=True))
    finish_run(run, moe=True, seconds=time.perf_counter() - t0)
    console.print(f"{name}: trained {args.add_steps} steps and evaluated in {run_seconds(run):.0f} s")
    return run


def scratch_run(args, root: Path, source_config: Path, name: str, shots: int | None) -> Path:
    """Single-task reshading model, same architecture as the source run, trained from scratch."""
    run = args.out / "runs" / name
    if evaluated(run):
        return run
    shutil.rmtree(run, ignore_errors=True)
    batch = min(args.batch, shots) if shots else args.batch
    cfg = load_config(source_config, [*base_overrides(args, root), f"model.tasks=[{NEW_TASK}]",
                                      f"train.steps={args.add_steps}", f"data.batch_size={batch}", "aux.mi=0",
                                      f"train.warmup_steps={max(1, args.add_steps // 15)}",
                                      *([f"data.max_images={shots}"] if shots else [])])
    t0 = time.perf_counter()
    train(cfg, run, progress=False, console=Console(quiet=True))
    finish_run(run, moe=True, seconds=time.perf_counter() - t0)
    console.print(f"{name}: trained {args.add_steps} steps and evaluated in {run_seconds(run):.0f} s")
    return run


# --- measurements -----------------------------------------------------------------------------------------------

def primary(metrics: dict, task: str) -> float | None:
    value = metrics.get(task, {}).get(get_task(task).primary)
    return None if value is None else float(value)


def metrics_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["metrics"]


@torch.no_grad()
def old_outputs_identical(source: Path, grown: Path, root: Path, size: int) -> bool:
    """Old tasks unchanged: every old task's output of the grown model equals the source model's to float
    rounding (the grown model runs more rows, so BLAS may pick other kernels: no bitwise promise) and every
    parameter the old tasks read is bitwise unchanged, on val images (eval mode)."""
    from modsquad.data import build_dataset

    before, after = load_model(source), load_model(grown / "last.safetensors")
    data = build_dataset("synthetic", str(root), [], "val", size, train=False, max_images=16)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    old = list(before.tasks)
    a, b = before(images), after(images)  # the grown model runs old and new tasks in one forward
    same_outputs = all(torch.allclose(a[t], b[t], rtol=1e-5, atol=1e-6) for t in old)
    grown_state = after.state_dict()
    same_params = all(torch.equal(v, grown_state[k][: v.shape[0]] if v.shape != grown_state[k].shape else grown_state[k])
                      for k, v in before.state_dict().items() if k in grown_state)
    return same_outputs and same_params


# --- report -----------------------------------------------------------------------------------------------------

def val_images(comparison: dict) -> int | str:
    """Images in the val split the runs were scored on (from the first run's metrics.json)."""
    run = Path(comparison["runs"][0]["path"])
    return json.loads((run / "metrics.json").read_text()).get("num_images", "?")


def _fmt(v, digits=4) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}g}"


def _arrow(task: str) -> str:
    return "↓" if get_task(task).lower_is_better() else "↑"


def usage_pairs(comparison: dict) -> list[tuple[str, dict | None, dict | None, dict, dict]]:
    """(router, usage MI off, usage MI on, row off, row on) for every router run pair."""
    rows = {r["name"]: r for r in comparison["runs"]}
    pairs = []
    for name, row in rows.items():
        if name == "dense" or name.endswith("_mi"):
            continue
        on = rows.get(f"{name}_mi")
        if on is not None:
            pairs.append((name, row["usage"], on["usage"], row, on))
    return pairs


def plot_usage_mi(pairs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    names = [p[0] for p in pairs]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
    for ax, key, title in ((axes[0], "share", "experts carrying 90% of a task's routing (share of E, lower = sparser)"),
                           (axes[1], "mi", "I(task; expert) of the usage counts (nats)")):
        off = [p[1][key] if p[1] else np.nan for p in pairs]
        on = [p[2][key] if p[2] else np.nan for p in pairs]
        ax.bar(x - 0.2, off, width=0.4, label="without MI loss")
        ax.bar(x + 0.2, on, width=0.4, label="with MI loss")
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def plot_add_task(old_rows, fewshot, path: Path) -> None:
    """Old tasks' change per freeze mode (rows: task, before, {mode: change %}, {mode: after}) and the few-shot
    curve (rows: N, added, scratch)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
    ax = axes[0]
    tasks = [t for t, *_ in old_rows]
    modes = ["experts", "backbone", "none"]
    x = np.arange(len(tasks))
    for i, mode in enumerate(modes):
        change = [row[2][mode] + 0.0 for row in old_rows]
        bars = ax.bar(x + (i - 1) * 0.27, change, width=0.27, label=f"--freeze {mode}")
        ax.bar_label(bars, fmt="%+.1f", fontsize=7, padding=2)
    ax.axhline(0, color="k", lw=0.8)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo - 0.08 * (hi - lo), hi + 0.1 * (hi - lo))  # room for the value labels
    ax.set_xticks(x, tasks, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("Δ % of primary metric vs before (+ = better)")
    ax.set_title(f"old tasks after adding {NEW_TASK}", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1]
    shots = [s for s, *_ in fewshot]
    xs = np.arange(len(shots))
    ax.plot(xs, [f for _, f, _ in fewshot], "o-", label=f"added to the {SOURCE_RUN} model (--freeze experts)")
    ax.plot(xs, [s for _, _, s in fewshot], "s--", label="single-task model from scratch")
    ax.set_xticks(xs, [str(s) for s in shots])
    ax.set_xlabel("training images of the new task")
    spec = get_task(NEW_TASK)
    ax.set_ylabel(f"{NEW_TASK} {spec.primary} ({'lower' if spec.lower_is_better() else 'higher'} is better)")
    ax.set_title("few-shot transfer", fontsize=9)
    ax.legend(fontsize=8)
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def relative(after: float | None, before: float | None, task: str) -> float:
    if after is None or before is None or before == 0:
        return float("nan")
    sign = -1.0 if get_task(task).lower_is_better() else 1.0
    return sign * (after - before) / abs(before) * 100.0


def write_report(args, report_dir: Path, comparison: dict, add: dict, fewshot: list, identical: bool | None,
                 timings: dict) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    write_compare(comparison, args.out / "compare")
    shutil.copy(args.out / "compare" / "compare.png", report_dir / "study_compare.png")
    pairs = usage_pairs(comparison)
    if pairs:
        plot_usage_mi(pairs, report_dir / "study_usage_mi.png")

    lines = ["# Routing study on the synthetic suite", "",
             f"Measured by `tools/study_synthetic.py` ({'--quick, ' if args.quick else ''}{args.images} images of "
             f"{args.size}x{args.size}, {args.steps} steps per router run at batch {args.batch}, {args.add_steps} "
             f"steps per add-a-task run, seed {args.seed}; torch {torch.__version__}, {args.threads} CPU threads, "
             f"{platform.machine()}; total {timings['total'] / 60:.1f} min).",
             f"Command: `python tools/study_synthetic.py --images {args.images} --size {args.size} --steps {args.steps} "
             f"--add-steps {args.add_steps} --batch {args.batch} --shots {args.shots} --seed {args.seed}"
             f"{' --quick' if args.quick else ''}`. Metrics are on the val split ({val_images(comparison)} images); "
             "times include evaluation and usage counting, on a machine shared with other jobs.",
             "One seed and a small val split: differences of a few percent are within noise.", ""]
    lines += ["## Routers vs the dense baseline", "",
              "Tasks: " + ", ".join(args.tasks) + ". Δm = mean over tasks of the relative gain of each task's primary "
              "metric over the dense run (positive = better). `+MI`: Mod-Squad's mutual-information loss "
              f"(weight {args.mi_weight if args.mi_weight is not None else 0.005}); `+bal`: switch load-balance loss "
              "(0.01), as in the shipped shared / task_conditioned configs.", ""]
    lines += [summary_markdown(comparison), "", "![routers](study_compare.png)", ""]
    if pairs:
        lines += ["## Expert-usage sparsity with and without the MI loss", "",
                  "usage share: mean over tasks and MoE layers of the fraction of a layer's experts that carry 90% "
                  "of the task's top-k selections on the val split (lower = sparser; a top-k layer of E experts cannot "
                  "go below about k/E, here 2/8 = 0.25 with the default model). usage MI: I(task; expert) of the selection counts, mean over layers (nats; "
                  "higher = tasks use more distinct experts).", "",
                  "| router | share, no MI | share, MI | usage MI, no MI | usage MI, MI | Δm no MI | Δm MI |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, off, on, r_off, r_on in pairs:
            dm = [(r["delta_m"] or {}).get("mean") for r in (r_off, r_on)]
            lines.append(f"| {name} | {_fmt((off or {}).get('share'), 3)} | {_fmt((on or {}).get('share'), 3)} | "
                         f"{_fmt((off or {}).get('mi'), 3)} | {_fmt((on or {}).get('mi'), 3)} | "
                         f"{'-' if dm[0] is None else f'{dm[0]:+.2f}'} | {'-' if dm[1] is None else f'{dm[1]:+.2f}'} |")
        lines += ["", "![usage](study_usage_mi.png)", ""]
    if add:
        lines += [f"## Adding {NEW_TASK} to the trained {SOURCE_RUN} model", "",
                  f"`modsquad train --from runs/{SOURCE_RUN} --add-tasks {NEW_TASK} --freeze MODE` for "
                  f"{args.add_steps} steps on the full training split; experts mode starts the new router from "
                  f"`{RELATED_TASK}` (`--router-init-from {RELATED_TASK}`). Old tasks with frozen experts keep their parameters bitwise and their "
                  f"outputs equal to the source model's within float rounding (rtol 1e-5, val images): "
                  f"**{'yes' if identical else 'NO'}**.", "",
                  "| task | metric | before | --freeze experts | --freeze backbone | no freezing |",
                  "|---|---|---:|---:|---:|---:|"]
        for task, before, _, after in add["old"]:
            spec = get_task(task)
            lines.append(f"| {task} | {spec.primary} {_arrow(task)} | {_fmt(before)} | {_fmt(after['experts'])} | "
                         f"{_fmt(after['backbone'])} | {_fmt(after['none'])} |")
        spec = get_task(NEW_TASK)
        lines.append(f"| **{NEW_TASK}** (new) | {spec.primary} {_arrow(NEW_TASK)} | - | {_fmt(add['new']['experts'])} | "
                     f"{_fmt(add['new']['backbone'])} | {_fmt(add['new']['none'])} |")
        lines += ["", f"Trainable parameters: experts {add['trainable']['experts']:,}, backbone "
                      f"{add['trainable']['backbone']:,}, none {add['trainable']['none']:,} (of "
                      f"{add['trainable']['total']:,}).", ""]
    if fewshot:
        lines += ["## Few-shot transfer", "",
                  f"{NEW_TASK} {get_task(NEW_TASK).primary} {_arrow(NEW_TASK)} on the val split after "
                  f"{args.add_steps} steps with N training images (`--set data.max_images=N`).", "",
                  "| N | added, --freeze experts | single-task from scratch |", "|---:|---:|---:|"]
        lines += [f"| {n} | {_fmt(f)} | {_fmt(s)} |" for n, f, s in fewshot]
        lines += ["", "![add a task](study_add_task.png)", ""]
    lines += ["## Time", "", *(f"- {k}: {v:.0f} s" for k, v in timings.items()), ""]
    path = report_dir / "study_synthetic.md"
    atomic_write(path, lambda p: p.write_text("\n".join(lines)))
    return path


# --- main -------------------------------------------------------------------------------------------------------

def main(argv=None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    report_dir = args.report_dir or args.out / "report"
    root = args.out / "data"
    summary = synthesize(root, images=args.images, size=args.size, seed=args.seed)
    if not summary.reused:
        atomic_write(args.out / "render_seconds.txt", lambda p: p.write_text(f"{summary.seconds:.1f}\n"))
    render = args.out / "render_seconds.txt"
    timings = {"render data": float(render.read_text()) if render.is_file() else 0.0}

    names = args.runs.split(",") if args.runs else [n for n, _ in ROUTER_RUNS]
    unknown = set(names) - {n for n, _ in ROUTER_RUNS}
    if unknown:
        raise SystemExit(f"unknown --runs {sorted(unknown)}; choose from {[n for n, _ in ROUTER_RUNS]}")
    runs = train_router_runs(args, root, names)
    timings["router runs"] = sum(map(run_seconds, runs.values()))
    comparison = compare_runs(list(runs.values()), baseline=runs.get("dense"))

    add, fewshot, identical = {}, [], None
    if SOURCE_RUN in runs:
        source = runs[SOURCE_RUN]
        grown = {"experts": add_task_run(args, root, source, "add_freeze_experts", "experts", RELATED_TASK),
                 "backbone": add_task_run(args, root, source, "add_freeze_backbone", "backbone", None),
                 "none": add_task_run(args, root, source, "add_no_freeze", "none", None)}
        identical = old_outputs_identical(source, grown["experts"], root, args.size)
        before = metrics_of(source)
        after = {mode: metrics_of(run) for mode, run in grown.items()}
        add["old"] = [(t, primary(before, t), {m: relative(primary(after[m], t), primary(before, t), t) for m in after},
                       {m: primary(after[m], t) for m in after}) for t in args.tasks]
        add["new"] = {m: primary(after[m], NEW_TASK) for m in after}
        add["trainable"] = trainable_counts(source)
        timings["add a task"] = sum(map(run_seconds, grown.values()))

        few_runs = []
        source_config = source / "config.yaml"
        for shots in [int(s) for s in args.shots.split(",") if s.strip()]:
            f = add_task_run(args, root, source, f"fewshot_{shots}", "experts", RELATED_TASK, shots)
            s = scratch_run(args, root, source_config, f"scratch_{shots}", shots)
            fewshot.append((shots, primary(metrics_of(f), NEW_TASK), primary(metrics_of(s), NEW_TASK)))
            few_runs += [f, s]
        s = scratch_run(args, root, source_config, "scratch_all", None)
        fewshot.append(("all", add["new"]["experts"], primary(metrics_of(s), NEW_TASK)))
        timings["few-shot"] = sum(map(run_seconds, [*few_runs, s]))
        report_dir.mkdir(parents=True, exist_ok=True)
        plot_add_task(add["old"], fewshot, report_dir / "study_add_task.png")
    timings["total"] = sum(timings.values())
    path = write_report(args, report_dir, comparison, add, fewshot, identical, timings)
    console.print(f"wrote {path}")
    return path


def trainable_counts(source: Path) -> dict[str, int]:
    """Parameters that train in each freeze mode when adding the new task to `source`."""
    from modsquad.models.grow import add_tasks, freeze

    grown = add_tasks(load_model(source), [NEW_TASK])
    counts = {"total": sum(p.numel() for p in grown.parameters())}
    for mode in ("experts", "backbone", "none"):
        frozen = freeze(grown, mode, [NEW_TASK])
        n = sum(p.numel() for p in grown.parameters() if p.requires_grad)
        counts[mode] = n - sum(ids.numel() * p[0].numel() for p, ids in frozen.rows.values())
        frozen.remove()
    return counts


if __name__ == "__main__":
    main()
