"""`modsquad demo`: the whole Mod-Squad pipeline on CPU in a few minutes, end to end.

    result = run_demo("demo_out")            # synth -> train -> eval -> usage -> extract -> bench

1. render a small synthetic suite (Taskonomy layout, exact labels) into OUT/data;
2. train `modsquad_vit_tiny` on its tasks (the packaged config synthetic_tiny) with the mutual-information loss, which
   makes each task concentrate on a few experts, into OUT/run;
3. evaluate the run on the val split (OUT/run/metrics.json);
4. count expert usage on the training split (OUT/usage/usage.{json,png}: task x expert heatmaps);
5. extract every task with the experts that carry `mass` of its routing (OUT/extracted/<task>), with the
   routing coverage and max |diff| measured on the held-out val split (OUT/usage/usage_kept.png boxes the
   experts each task kept);
6. benchmark every extracted model against the full model (OUT/bench/bench.{json,md,png}).

The last panel lists every artefact and the benchmark table. Everything is deterministic by seed except timing.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table

from .bench import benchmark, summary_table, write_report
from .bench.bench import fixed_threads
from .bench.report import primary_metric
from .config import CONFIG_DIR, load_config
from .core.atomic import atomic_write
from .core.errors import ConfigError
from .data import synthesize
from .evaluate.evaluator import evaluate, metrics_table
from .extract import compute_usage, save_usage, write_extracted
from .extract.usage import load_usage, plot_usage
from .run import Run
from .train.trainer import train

CONFIG = "synthetic_tiny.yaml"


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is; `DEFAULT` fits 5 minutes on 2 CPU cores, `QUICK` is for tests."""

    images: int
    size: int
    steps: int
    batch: int
    tasks: tuple[str, ...] | None  # None: the config's tasks
    bench_repeats: int
    bench_batch: tuple[int, int]
    mi: float
    mass: float  # routing mass of the experts kept per task (1.0: every expert the task used in training)
    lr: float = 3e-3  # with a 30-step warm-up; tuned for the short CPU run (the config's 1e-3 learns too slowly)
    warmup: int = 30
    weighting: str = "equal"  # uncertainty weighting shrinks the segmentation CE early in a short run


# More distinct scenes at 48 px (36 tokens) and many small batches learn far more in the same time than many
# epochs over a few 64 px scenes (96 scenes at 64 px, 300 steps of 16: segmentation stayed background-only).
DEFAULT = DemoSize(images=768, size=48, steps=1300, batch=8, tasks=None, bench_repeats=15, bench_batch=(1, 16),
                   mi=0.05, mass=0.99)
QUICK = DemoSize(images=24, size=32, steps=24, batch=8,
                 tasks=("depth_euclidean", "normal", "segment_semantic", "edge_texture"),
                 bench_repeats=3, bench_batch=(1, 4), mi=0.05, mass=0.99)


@dataclass
class DemoResult:
    """What the demo made: artefact paths, the evaluation, the benchmark, the wall time per stage."""

    out: Path
    artefacts: dict[str, Path]
    metrics: dict
    bench: dict
    extracted: dict
    seconds: dict[str, float] = field(default_factory=dict)


def config_path() -> Path:
    """The packaged synthetic_tiny.yaml (the demo's base config)."""
    path = CONFIG_DIR / CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: the demo's base config is missing (reinstall modsquad)")
    return path


def demo_overrides(out: Path, size: DemoSize, device: str) -> list[str]:
    """`--set` overrides turning synthetic_tiny.yaml into the demo run (data in OUT/data, MI loss on)."""
    overrides = [
        f"data.root={out / 'data'}",
        f"data.synth.images={size.images}",
        f"data.synth.size={size.size}",
        f"model.img_size={size.size}",
        f"data.batch_size={size.batch}",
        f"train.steps={size.steps}",
        f"train.eval_every={size.steps}",  # one evaluation, at the end
        f"train.log_every={max(1, size.steps // 10)}",
        f"train.device={device}",
        f"train.lr={size.lr}",
        f"train.warmup_steps={size.warmup}",
        f"train.weighting={size.weighting}",
        f"aux.mi={size.mi}",
        f"output.save_every={size.steps}",  # epochs: no checkpoint per (short) epoch, one at the end
        "output.visualize=4",
    ]
    if size.tasks:
        overrides.append(f"model.tasks=[{','.join(size.tasks)}]")
    return overrides


def _check_plan(plan: DemoSize) -> None:
    """ConfigError for sizes the demo cannot run with (named as the CLI options)."""
    if plan.size < 32 or plan.size % 8:
        raise ConfigError(f"--size {plan.size}: must be a multiple of 8 (the tiny ViT's patch size), at least 32")
    if plan.images < 3 * plan.batch:
        raise ConfigError(f"--images {plan.images}: need at least {3 * plan.batch} (train, val and test buildings "
                          f"of at least one batch of {plan.batch})")
    if plan.steps < 1:
        raise ConfigError(f"--steps {plan.steps}: must be at least 1")
    if not 0.0 < plan.mass <= 1.0:
        raise ConfigError(f"mass {plan.mass}: must be in (0, 1]")


class _Stages:
    """Numbered stage headings and wall time per stage."""

    def __init__(self, console: Console, total: int):
        self.console, self.total, self.n = console, total, 0
        self.seconds: dict[str, float] = {}

    def run(self, name: str, title: str, fn: Callable[[], object]):
        self.n += 1
        self.console.rule(f"[bold]{self.n}/{self.total} {title}", align="left")
        t0 = time.perf_counter()
        result = fn()
        self.seconds[name] = time.perf_counter() - t0
        self.console.print(f"[dim]{title}: {self.seconds[name]:.1f} s[/]")
        return result


def run_demo(out: str | Path = "demo_out", *, images: int | None = None, steps: int | None = None,
             size: int | None = None, tasks: Sequence[str] | None = None, quick: bool = False, device: str = "cpu",
             mass: float | None = None, threads: int | None = 1, console: Console | None = None) -> DemoResult:
    """Run the demo into `out` (see the module docstring); returns the artefacts and numbers.

    `quick` picks the small test size; `images`, `steps`, `size`, `tasks`, `mass` override either size's
    values (`mass`: the routing mass a task's kept experts carry; 1.0 keeps every expert it used on the
    training split). `threads`: torch CPU threads for the whole demo (None keeps torch's setting); the default 1 is the
    fastest for this tiny model and keeps a shared machine from stalling on oversubscribed threads. An existing
    OUT/run is replaced.
    """
    console = console or Console()
    base = QUICK if quick else DEFAULT
    def given(value, default):  # 0 is a value (and refused by _check_plan), never "the default"
        return default if value is None else value

    plan = DemoSize(images=given(images, base.images), size=given(size, base.size), steps=given(steps, base.steps),
                    batch=base.batch, tasks=tuple(tasks) if tasks else base.tasks, bench_repeats=base.bench_repeats,
                    bench_batch=base.bench_batch, mi=base.mi, mass=given(mass, base.mass), lr=base.lr,
                    warmup=base.warmup, weighting=base.weighting)
    _check_plan(plan)
    out = Path(out)
    cfg = load_config(config_path(), demo_overrides(out, plan, device))
    with fixed_threads(threads):
        result = _run_stages(out, plan, cfg, device, console)
    console.print(final_panel(result))
    return result


def _run_stages(out: Path, plan: DemoSize, cfg, device: str, console: Console) -> DemoResult:
    run_dir, usage_dir, extracted_dir, bench_dir = out / "run", out / "usage", out / "extracted", out / "bench"
    if run_dir.exists():  # the demo always trains afresh, but only ever deletes a run it could have made
        if not Run(run_dir).has_config:
            raise ConfigError(f"{run_dir} exists and is not a modsquad run; choose another --out")
        shutil.rmtree(run_dir)
    t_start = time.perf_counter()
    stages = _Stages(console, 6)

    synth = stages.run("synth", f"synthesise {plan.images} scenes at {plan.size}px",
                       lambda: synthesize(out / "data", images=plan.images, size=plan.size, seed=cfg.data.synth.seed,
                                                 workers=2 if plan.images >= 128 else 1))
    console.print(f"{synth.root}: {synth.images} images, buildings {synth.splits}")

    console.print(f"tasks: {', '.join(cfg.model.tasks)}; {plan.steps} steps, MI loss weight {plan.mi}")
    stages.run("train", f"train {cfg.model.name} on {len(cfg.model.tasks)} tasks",
               lambda: train(cfg, run_dir, console=console))

    evaluation = stages.run("eval", "evaluate on the val split", lambda: evaluate(run_dir, device=device))
    console.print(metrics_table(evaluation))

    def usage():
        return save_usage(compute_usage(run_dir, device=device), usage_dir)

    usage_json, usage_png = stages.run("usage", "count expert usage per task", usage)

    extracted = stages.run("extract", f"extract every task (experts carrying {plan.mass:.0%} of its routing)",
                           lambda: write_extracted(run_dir, extracted_dir, usage=usage_json, mass=plan.mass,
                                                   device=device))
    for task, info in extracted.items():
        p = info["params"]
        console.print(f"{task}: {p['extracted']:,} of {p['full']:,} parameters, max |diff| {info['max_abs_diff']:.2e}")
    kept = {task: info["kept"] for task, info in extracted.items()}  # usage.png again, with the kept experts boxed
    kept_png = atomic_write(usage_dir / "usage_kept.png", lambda p: plot_usage(load_usage(usage_json), p, kept=kept))

    bench = stages.run("bench", "benchmark extracted vs full",
                       lambda: benchmark(run_dir, extracted_dir, batch_sizes=plan.bench_batch, device=device,
                                         repeats=plan.bench_repeats, warmup=2, progress=True))
    bench_paths = write_report(bench, bench_dir)
    stages.seconds["total"] = time.perf_counter() - t_start

    run = Run(run_dir)
    artefacts = {
        "data": Path(synth.root),
        "config": run.config_path,
        "checkpoint": run.checkpoint(),
        "train log": run.log_path,
        "predictions": run_dir / "predictions",
        "metrics": Path(evaluation["file"]),
        "usage.json": usage_json,
        "usage.png": usage_png,
        "usage_kept.png": kept_png,
        **{f"extracted {t}": Path(info["dir"]) for t, info in extracted.items()},
        "bench.json": bench_paths["json"],
        "bench.md": bench_paths["md"],
        "bench.png": bench_paths["png"],
    }
    return DemoResult(out, artefacts, evaluation, bench, extracted, stages.seconds)


def summary_lines(bench: dict) -> list[str]:
    """One line per task: the extracted model against the full model run for that task and on all tasks."""
    lines = []
    for task, entry in bench["tasks"].items():
        r = entry["ratios"]
        vs_all = entry["latency_ms"] / bench["full"]["latency_ms"]
        line = (f"{task}: {r['params']:.2f}x params, {r['flops']:.2f}x FLOPs, {r['latency_ms']:.2f}x latency of "
                f"the full model run for it ({vs_all:.2f}x of one forward on all tasks)")
        name, full_value = primary_metric(task, entry["full"]["metrics"])
        if name is not None and name in entry["metrics"]:
            value = entry["metrics"][name]
            rel = f" ({100 * (value - full_value) / abs(full_value):+.2f}%)" if full_value else ""
            line += f"; {name} {value:.4g} vs {full_value:.4g}{rel}"
        lines.append(line + f", max |diff| {entry['max_abs_diff']:.1e}")
    return lines


def final_panel(result: DemoResult) -> Panel:
    """The closing panel: where each artefact is, the benchmark table, the per-task summary, the timings."""
    table = summary_table(result.bench, title="bench: extracted vs full")
    where = Table.grid(padding=(0, 2))
    where.add_column(style="bold")
    where.add_column()
    for name, path in result.artefacts.items():
        where.add_row(name, str(path))
    times = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    return Panel(Group(where, "", table, "", *summary_lines(result.bench), "", f"[dim]wall time: {times}[/]"),
                 title=f"modsquad demo: {result.out}", border_style="green")
