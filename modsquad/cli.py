"""The `modsquad` command line. It only parses arguments, calls library functions and prints.

Every command is also one Python call in the library; errors that users can cause (`UserError`) are printed
as one red line and exit with code 2.
"""

from __future__ import annotations

import errno
import functools
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

try:  # typer >= 0.2x carries its own copy of click; its usage errors are that copy's classes
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - typer on the public click
    from click.exceptions import NoArgsIsHelpError, UsageError

from .core.atomic import PLACE_ERRNOS, check_dir_path
from .core.errors import ConfigError, UserError
from .core.version import __version__

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


class _App(typer.Typer):
    """Typer app whose direct call also turns stray `UserError`s into one line and exit code 2."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except UserError as e:  # pragma: no cover - commands already catch these
            err_console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise SystemExit(2) from None


class _OneLineUsageErrors(TyperGroup):
    """Bad option values and unknown options of a command (`--steps abc`) as one line and exit 2, like every
    other user error, instead of click's usage box."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except NoArgsIsHelpError:
            raise
        except UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else ctx.command_path
            err_console.print(f"[bold red]error:[/] {e.format_message()} (see `{where} --help`)", highlight=False)
            raise typer.Exit(2) from None


_HELP_NAMES = {"help_option_names": ["-h", "--help"]}
app = _App(name="modsquad", help="Multi-task vision with mixture-of-experts ViTs (Mod-Squad and friends).",
           no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, cls=_OneLineUsageErrors,
           context_settings=_HELP_NAMES)
data_app = typer.Typer(help="Make and check datasets.", no_args_is_help=True, context_settings=_HELP_NAMES)
app.add_typer(data_app, name="data")


#: OS errors that only a user's path can cause (a file where a folder goes, no permission, ...): printed like
#: UserErrors as a last line of defence, for paths the library did not check itself.
_PATH_ERRORS = (FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
#: ... and OS errors of the place a path points to (a read-only mount, a full disk or quota, a too long name)
_PATH_ERRNOS = PLACE_ERRNOS | {errno.ENAMETOOLONG}


def user_errors(fn):
    """Print `UserError`s (and path errors) as one red line and exit 2 instead of showing a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(2) from None
        except OSError as e:
            if not isinstance(e, _PATH_ERRORS) and e.errno not in _PATH_ERRNOS:
                raise
            where = f"{e.filename}: " if e.filename else ""
            err_console.print(f"[bold red]error:[/] {where}{e.strerror or e}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def _out_dir(path: Path | None, option: str = "--out") -> Path | None:
    """OutputPathError before any work when an output folder is an existing file (or lies under one)."""
    return None if path is None else check_dir_path(path, option)


def _under_run(checkpoint: Path, name: str) -> Path:
    """The default output folder `name` inside the run of `checkpoint` (a run folder or a file in one)."""
    from .run import Run

    return _out_dir(Run.of(checkpoint).path / name)


def _at_least(option: str, value: int | float | None, low: int = 1) -> None:
    """ConfigError unless `value` is None or a number >= `low` (0 never silently means 'default')."""
    if value is not None and not value >= low:  # `not >=` also catches NaN
        raise ConfigError(f"{option} {value}: must be at least {low}")


def _version(value: bool):
    if value:
        console.print(f"modsquad {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")):
    """Train, inspect, extract and benchmark multi-task mixture-of-experts ViTs."""


def _renamed(new: str, value, old: str, old_value):
    """The value of option `new`, or of its old spelling `old` (kept as a hidden alias); both is an error."""
    if old_value is None:
        return value
    if value is not None:
        raise ConfigError(f"{old} is the old name of {new}; give only {new}")
    return old_value


def _csv(value: str | None, option: str = "--tasks") -> list[str] | None:
    """"a, b" -> ["a", "b"]; None (not given) -> None; a given but empty list is a ConfigError, not "all"."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ConfigError(f"{option} {value!r}: no names given (leave {option} out for all)")
    return items


# --- data ------------------------------------------------------------------------------------------------------

@data_app.command("synth")
@user_errors
def data_synth(out: Path = typer.Argument(..., help="Folder to write the suite to (Taskonomy layout)."),
               images: int = typer.Option(256, "--images", help="Number of images."),
               size: int = typer.Option(128, "--size", help="Image side in pixels."),
               seed: int = typer.Option(0, "--seed", help="Random seed; the suite is deterministic in it."),
               buildings: int = typer.Option(None, "--buildings", help="Scene families (split unit); default "
                                             "max(3, min(8, images // 16))."),
               workers: int = typer.Option(1, "--workers", help="Processes that render in parallel.")):
    """Render the built-in synthetic suite: indoor scenes with exact labels for 14 Taskonomy domains.

    Example: modsquad data synth data/synth256 --images 256 --size 128 --workers 2
    """
    from .data import synthesize

    _out_dir(out, "OUT")
    for option, value in (("--images", images), ("--size", size), ("--buildings", buildings),
                          ("--workers", workers)):
        _at_least(option, value)
    s = synthesize(out, images=images, size=size, seed=seed, buildings=buildings, workers=workers)
    if s.reused:
        console.print(f"{out} already holds this suite ({s.images} images of {s.size}x{s.size}, seed {s.seed})")
        return
    console.print(f"wrote {s.images} images of {s.size}x{s.size} x {len(s.domains)} domains to {out} "
                  f"in {s.seconds:.1f} s")
    for split, names in s.splits.items():
        console.print(f"  {split:5s} {len(names)} buildings: {' '.join(names)}", highlight=False)


@data_app.command("check")
@user_errors
def data_check(root: Path = typer.Argument(..., help="Dataset root."),
               format: str = typer.Option("taskonomy", "--format", help="taskonomy (also synthetic) or "
                                          "pascal-context."),
               tasks: str = typer.Option(None, "--tasks", help="Comma-separated tasks that must be trainable "
                                         "(default: every task with a folder)."),
               max_samples: int = typer.Option(None, "--max-samples", help="Check an evenly spread subset.")):
    """List missing, unreadable and wrong-shaped files per domain; exit 2 if a requested task cannot be trained.

    Example: modsquad data check data/taskonomy --tasks depth_euclidean,normal
    """
    from .data import check_dataset

    _at_least("--max-samples", max_samples)
    report = check_dataset(root, format, tasks=_csv(tasks), max_samples=max_samples)
    table = Table(title=f"{root} ({report.format}, {report.samples} samples)")
    for col in ("domain", "found", "missing", "unreadable", "wrong shape"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for rep in report.domains.values():
        table.add_row(rep.domain, str(rep.found), str(len(rep.missing)), str(len(rep.unreadable)),
                      str(len(rep.wrong_shape)))
    console.print(table)
    for rep in report.domains.values():
        for kind, items in (("missing", rep.missing), ("unreadable", rep.unreadable), ("wrong shape", rep.wrong_shape)):
            for item in items[:5]:
                console.print(f"  {rep.domain} {kind}: {item}", highlight=False, soft_wrap=True)
            if len(items) > 5:
                console.print(f"  {rep.domain} {kind}: ... and {len(items) - 5} more", highlight=False, soft_wrap=True)
    for building, domains in list(report.buildings_missing.items())[:20]:
        console.print(f"  building {building} lacks files of: {', '.join(domains)}", highlight=False, soft_wrap=True)
    report.raise_for(_csv(tasks))
    console.print(f"[green]ok[/] for {', '.join(report.tasks) or 'rgb only'}")


# --- configs -------------------------------------------------------------------------------------------------

@app.command("configs")
@user_errors
def configs_cmd():
    """List the packaged run configs with their descriptions; each is usable by name in `train --config NAME`.

    Example: modsquad configs
    """
    from .config import CONFIG_DIR, list_configs

    table = Table(title="Packaged configs (train --config NAME)", title_justify="left",
                  caption=f"files in {CONFIG_DIR}; copy one to change it, or override keys with --set",
                  caption_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("description", overflow="fold")
    for name, description in list_configs().items():
        table.add_row(name, description)
    console.print(table)


# --- train and eval --------------------------------------------------------------------------------------------

@app.command("train")
@user_errors
def train_cmd(config: Path = typer.Option(None, "--config", "-c", help="Run config: a packaged config's name "
                                          "(`modsquad configs` lists them) or a YAML file. With --resume it "
                                          "defaults to the run's own config.yaml."),
              overrides: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set "
                                                  "train.epochs=2 (repeatable)."),
              out: Path = typer.Option(None, "--out", help="Run directory (default: output.dir, else runs/<name>)."),
              resume: bool = typer.Option(False, "--resume/--no-resume", help="Continue the run in --out from its "
                                          "state.pt."),
              stop_after: int = typer.Option(None, "--stop-after", help="Stop (with a checkpoint) after this many "
                                             "steps in all, keeping the schedule; continue later with --resume."),
              from_run: Path = typer.Option(None, "--from", help="Trained run (or checkpoint) to add tasks to; "
                                            "its config.yaml is the base config (change it with --set)."),
              add_tasks: str = typer.Option(None, "--add-tasks", help="Comma-separated new tasks (with --from)."),
              freeze: str = typer.Option("none", "--freeze", help="With --from: experts (train only the new tasks' "
                                         "routers, embeddings and heads; old tasks' parameters stay bitwise "
                                         "unchanged, their outputs equal to float rounding), backbone "
                                         "(only new heads) or none (everything)."),
              router_init_from: str = typer.Option(None, "--router-init-from", help="With --from: start the new "
                                                   "tasks' routers from this old task's (reuse its experts).")):
    """Train a multi-task model: writes config.yaml, last/best.safetensors, state.pt and the log (metrics.jsonl,
    metrics.csv, TensorBoard events in tb/).

    Examples (a tiny run on CPU; then a task it does not have added to it; a paper config on 8 GPUs):
      modsquad train --config synthetic_tiny --set train.epochs=2 --out runs/tiny
      modsquad train --from runs/tiny --add-tasks keypoints2d --freeze experts --out runs/tiny_kp
      torchrun --nproc_per_node 8 --no-python modsquad train --config taskonomy_vit_s
    """
    _out_dir(out)
    _at_least("--stop-after", stop_after)
    if from_run is not None or add_tasks is not None or (resume and out and _adds_tasks(out)):
        result = _train_add_tasks(config, overrides, out, resume, stop_after, from_run, add_tasks, freeze,
                                  router_init_from)
    elif router_init_from is not None or freeze != "none":
        raise ConfigError("--freeze and --router-init-from need --from RUN --add-tasks TASK[,TASK]")
    else:
        result = _train(config, overrides, out, resume, stop_after)
    if result.interrupted:
        raise typer.Exit(130)
    if result.is_main:  # under torchrun every process runs this command; one `done` line
        best = f", best delta_m {result.best_score:+.2f}%" if result.best_score is not None else ""
        console.print(f"[green]done[/]: {result.step}/{result.total_steps} steps in {result.out}{best}", highlight=False)


def _adds_tasks(out: Path) -> bool:
    from .run import Run

    return Run(out).adds_tasks


def _train_add_tasks(config, overrides, out, resume, stop_after, from_run, add_tasks, freeze, router_init_from):
    """`train --from RUN --add-tasks X,Y` (and its --resume): grow, freeze and train the new tasks."""
    from .train.transfer import train_add_tasks

    if config is not None:
        raise ConfigError("--config cannot be combined with --from: the source run's config.yaml is the base "
                          "(change it with --set)")
    if resume and (from_run is not None or add_tasks is not None):
        raise ConfigError("--resume continues an add-tasks run from its grow.json; drop --from/--add-tasks")
    new_tasks = _csv(add_tasks, "--add-tasks")
    if not resume and (from_run is None or not new_tasks):
        raise ConfigError("adding tasks needs both --from RUN and --add-tasks TASK[,TASK]")
    return train_add_tasks(from_run, new_tasks, out, freeze=freeze, router_init_from=router_init_from,
                           overrides=overrides, resume=resume, stop_after=stop_after, console=console)


def _train(config, overrides, out, resume, stop_after):
    from .config import load_config
    from .run import Run
    from .train import train

    if config is None:
        if not (resume and out):
            raise ConfigError("--config is required (only `--resume --out RUN` can reuse the run's config.yaml)")
        cfg = Run(out).resume_config(overrides)
    else:
        cfg = load_config(config, overrides)
    return train(cfg, out, resume=resume, stop_after=stop_after, console=console)


def _task_paths(items: list[str]) -> dict[str, str]:
    pairs = [item.partition("=") for item in items]
    bad = [item for item, (task, sep, path) in zip(items, pairs, strict=True) if not (sep and task and path)]
    if bad:
        raise ConfigError(f"--task-baseline {bad[0]!r}: expected TASK=RUN_OR_METRICS_JSON")
    return {task.strip(): path.strip() for task, _, path in pairs}


@app.command("eval")
@user_errors
def eval_cmd(checkpoint: Path = typer.Argument(..., help="Run directory (best, else last checkpoint) or a "
                                               ".safetensors file beside its config.yaml."),
             split: str = typer.Option(None, "--split", help="Split to score (default: the run's eval.split, val)."),
             baseline: list[Path] = typer.Option([], "--baseline", help="Baseline run directory (its metrics file, "
                                                 "else the evaluation its training logged) or metrics JSON for "
                                                 "delta_m (repeatable; merged per task)."),
             task_baseline: list[str] = typer.Option([], "--task-baseline", help="Single-task baseline, "
                                                     "TASK=RUN_OR_METRICS_JSON (repeatable)."),
             data_root: Path = typer.Option(None, "--data-root", help="Dataset root instead of the run's data.root."),
             out: Path = typer.Option(None, "--out", help="Folder for the metrics file (default: the run directory)."),
             batch_size: int = typer.Option(None, "--batch-size", help="Images per forward."),
             max_images: int = typer.Option(None, "--max-images", help="Score an evenly spread subset."),
             device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
             visualize: int = typer.Option(0, "--visualize", help="Draw this many predictions into OUT/predictions.")):
    """Per-task metrics of a checkpoint -> metrics.json (metrics_<split>.json for other splits), + delta_m.

    Example: modsquad eval runs/tiny --baseline runs/tiny_dense
    """
    from .evaluate.evaluator import evaluate, metrics_table

    _out_dir(out)
    _at_least("--batch-size", batch_size)
    _at_least("--max-images", max_images)
    _at_least("--visualize", visualize, 0)
    result = evaluate(checkpoint, split, baseline or None, data_root=data_root, out=out,
                      task_baselines=_task_paths(task_baseline) or None, batch_size=batch_size,
                      max_images=max_images, device=device, visualize=visualize)
    console.print(metrics_table(result))
    console.print(f"wrote {result['file']}", highlight=False, soft_wrap=True)


# --- compare ------------------------------------------------------------------------------------------------

@app.command("compare")
@user_errors
def compare_cmd(runs: list[Path] = typer.Argument(..., help="Run directories (metrics.json, else the evaluation "
                                                 "their training logged in metrics.jsonl)."),
                baseline: Path | None = typer.Option(None, "--baseline", help="Run for delta_m (default: the first "
                                                     "dense run among RUNS, else none)."),
                out: Path | None = typer.Option(None, "--out", help="Where compare.md, compare.json and "
                                                "compare.png go (default: compare/ in the folder holding the "
                                                "runs, or in the run when there is one)."),
                split: str = typer.Option("val", "--split", help="Which metrics file to read (metrics.json = val)."),
                flops: bool = typer.Option(True, "--flops/--no-flops", help="Count active FLOPs per image.")):
    """One table (and PNG) of every run's task metrics, delta_m, params, active FLOPs and expert-usage sparsity.

    Example: modsquad compare runs/dense runs/per_task runs/task_level --baseline runs/dense
    """
    from .bench.compare import (
        compare_runs,
        compare_table,
        default_compare_out,
        task_metrics_table,
        write_compare,
    )

    _out_dir(out)
    result = compare_runs(runs, baseline, split=split, flops=flops)
    out = out if out is not None else _out_dir(default_compare_out(result))
    paths = write_compare(result, out)
    console.print(compare_table(result))
    console.print(task_metrics_table(result))
    console.print(f"wrote {paths['md']}, {paths['json']} and {paths['png']}", highlight=False, soft_wrap=True)


# --- bench and demo ----------------------------------------------------------------------------------------

def _batch_sizes(value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not 1 <= len(sizes) <= 2 or min(sizes) < 1:
        raise ConfigError(f"--batch-size {value!r}: give one or two positive ints, latency,throughput (e.g. 1,32)")
    return sizes


@app.command()
@user_errors
def bench(checkpoint: Path = typer.Argument(..., help="Run directory or .safetensors checkpoint of the full model."),
          extracted: Path | None = typer.Option(None, "--extracted", help="Directory written by `modsquad extract` "
                                                "(default: the run's extracted/)."),
          out: Path | None = typer.Option(None, "--out", help="Where bench.json, bench.md, bench.png go (default: "
                                          "the run's bench/)."),
          tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated tasks (default: all extracted)."),
          batch_size: str = typer.Option(None, "--batch-size", help="Latency and throughput batch sizes "
                                         "(default 1,32)."),
          batch_old: str = typer.Option(None, "--batch", hidden=True),
          device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
          repeats: int = typer.Option(20, "--repeats", help="Timed forwards per model and batch size."),
          warmup: int = typer.Option(3, "--warmup", help="Untimed forwards before timing."),
          data_root: Path | None = typer.Option(None, "--data-root", help="Dataset root for metrics (default: the "
                                                "run's data.root)."),
          data_old: Path | None = typer.Option(None, "--data", hidden=True),
          split: str | None = typer.Option(None, "--split", help="Split for metrics (default: the config's)."),
          max_images: int = typer.Option(64, "--max-images", help="Images evaluated for metrics (0: none)."),
          threads: int | None = typer.Option(None, "--threads", help="CPU threads while measuring."),
          dense_baseline: bool = typer.Option(True, "--dense-baseline/--no-dense-baseline",
                                              help="Also measure a same-shape dense timm ViT per task."),
          compile: bool = typer.Option(False, "--compile/--no-compile", help="Time torch.compile'd models (compiled in "
                                       "warm-up; needs a C++ compiler on CPU).")):
    """Extracted vs full vs dense timm: params, FLOPs, latency, throughput, memory, metrics -> bench.json/md/png.

    Examples (the second writes runs/tiny/bench from runs/tiny/extracted, the defaults):
      modsquad bench runs/tiny --extracted runs/tiny/extracted --batch-size 1,32 --out runs/tiny/bench
      modsquad bench runs/tiny
    """
    from .bench import benchmark, summary_table, write_report

    out = _out_dir(out) or _under_run(checkpoint, "bench")
    extracted = extracted if extracted is not None else _under_run(checkpoint, "extracted")
    _at_least("--repeats", repeats)
    _at_least("--warmup", warmup, 0)
    _at_least("--max-images", max_images, 0)
    _at_least("--threads", threads)
    batch = _renamed("--batch-size", batch_size, "--batch", batch_old) or "1,32"
    data = _renamed("--data-root", data_root, "--data", data_old)
    result = benchmark(checkpoint, extracted, tasks=_csv(tasks), batch_sizes=_batch_sizes(batch), device=device,
                       repeats=repeats, warmup=warmup, data=data, split=split, max_images=max_images,
                       threads=threads, dense_baseline=dense_baseline, progress=True, compile=compile)
    paths = write_report(result, out)
    console.print(summary_table(result))
    for kind, path in paths.items():
        console.print(f"{kind:>4}: {path}")


@app.command()
@user_errors
def demo(out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for every artefact of the demo."),
         quick: bool = typer.Option(False, "--quick/--no-quick", help="A smaller, faster run (tests, smoke checks)."),
         images: int | None = typer.Option(None, "--images", help="Synthetic images to render."),
         steps: int | None = typer.Option(None, "--steps", help="Training steps."),
         size: int | None = typer.Option(None, "--size", help="Image size in pixels."),
         device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
         threads: int = typer.Option(1, "--threads", help="torch CPU threads (1 suits the tiny model best).")):
    """Synthesise a suite, train with the MI loss, evaluate, extract every task, benchmark extracted vs full.

    About 4-5 minutes on 2 CPU cores; --quick for a smoke run.

    Example: modsquad demo --out demo_out
    """
    from .demo import run_demo

    _out_dir(out)
    for option, value in (("--images", images), ("--steps", steps), ("--size", size), ("--threads", threads)):
        _at_least(option, value)
    run_demo(out, images=images, steps=steps, size=size, quick=quick, device=device, threads=threads,
             console=console)


# --- usage, extract, predict -------------------------------------------------------------------------------

_DATA_HELP = "Dataset root to count usage on (default: the run's data root)."
_FORMAT_HELP = "Format of --data-root: taskonomy, pascal_context or synthetic (default: the run's)."


def _usage_table(report: dict):
    """Per task and MoE layer: experts carrying 90% / 99% of the task's routing mass."""
    mass, layers = report["experts_for_mass"], report["layers"]
    total = sum(d["num_experts"] for d in layers)
    table = Table(title="Experts carrying 90%/99% of each task's routing (columns: layer, experts, top-k)",
                  title_justify="left")
    table.add_column("task", overflow="fold")
    for d in layers:
        table.add_column(f"{d['name'].removeprefix('blocks.')}\n{d['num_experts']}, k{d['top_k']}", justify="right")
    table.add_column(f"all\nof {total}", justify="right")
    for task in report["tasks"]:
        n90, n99 = mass["0.9"][task], mass["0.99"][task]
        cells = [f"{n90[d['name']]}/{n99[d['name']]}" for d in layers]
        table.add_row(task, *cells, f"{sum(n90.values())}/{sum(n99.values())}")
    return table


@app.command("usage")
@user_errors
def usage_cmd(checkpoint: Path = typer.Argument(..., help="Run directory or .safetensors checkpoint."),
              out: Path | None = typer.Option(None, "--out", help="Folder for usage.json and usage.png "
                                              "(default: the checkpoint's folder)."),
              data_root: Path | None = typer.Option(None, "--data-root", help=_DATA_HELP),
              data_old: Path | None = typer.Option(None, "--data", hidden=True),
              data_format: str | None = typer.Option(None, "--format", help=_FORMAT_HELP),
              split: str | None = typer.Option(None, "--split", help="Split to count usage on (default: the run's training split; held-out figures use val)."),
              max_images: int | None = typer.Option(None, "--max-images", help="Use at most this many images."),
              batch_size: int | None = typer.Option(None, "--batch-size", help="Images per forward."),
              workers: int = typer.Option(0, "--workers", help="DataLoader worker processes."),
              device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")):
    """Count how often each task selects each expert of every MoE layer -> usage.json, usage.png.

    Example: modsquad usage runs/tiny --out runs/tiny/usage
    """
    from .checkpoint import resolve_checkpoint
    from .extract.usage import compute_usage, save_usage

    _out_dir(out)
    _at_least("--max-images", max_images)
    _at_least("--batch-size", batch_size)
    _at_least("--workers", workers, 0)
    data = _renamed("--data-root", data_root, "--data", data_old)
    report = compute_usage(checkpoint, data=data, data_format=data_format, split=split, max_images=max_images,
                           batch_size=batch_size, workers=workers, device=device)
    json_path, png_path = save_usage(report, out if out is not None else resolve_checkpoint(checkpoint).parent)
    console.print(_usage_table(report))
    console.print(f"{report['data'].get('images', 0)} images; wrote {json_path} and {png_path}")


@app.command("extract")
@user_errors
def extract_cmd(checkpoint: Path = typer.Argument(..., help="Run directory or .safetensors checkpoint."),
                out: Path | None = typer.Option(None, "--out", help="Folder for one <task>/ directory per task "
                                                "(default: the run's extracted/)."),
                tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated tasks (default: all)."),
                threshold: float | None = typer.Option(None, "--threshold", help="Keep experts whose usage share "
                                                       "exceeds T, in [0, 1) (default: every expert used once)."),
                mass: float | None = typer.Option(None, "--mass", help="Keep the fewest experts carrying this "
                                                  "share of the routing, in (0, 1]."),
                paper_threshold: bool = typer.Option(False, "--paper-threshold/--no-paper-threshold", help="Mod-Squad's rule: keep "
                                                     "experts whose usage exceeds 3/k % (k = the layer's top-k)."),
                usage: Path | None = typer.Option(None, "--usage", help="usage.json from `modsquad usage` "
                                                  "(default: count usage now)."),
                data_root: Path | None = typer.Option(None, "--data-root", help=_DATA_HELP),
                data_old: Path | None = typer.Option(None, "--data", hidden=True),
                data_format: str | None = typer.Option(None, "--format", help=_FORMAT_HELP),
                split: str | None = typer.Option(None, "--split", help="Split to count usage on (default: the run's training split; held-out figures use val)."),
                max_images: int | None = typer.Option(None, "--max-images", help="Count usage on at most N images."),
                batch_size: int | None = typer.Option(None, "--batch-size", help="Images per forward."),
                workers: int = typer.Option(0, "--workers", help="DataLoader worker processes."),
                onnx: bool = typer.Option(False, "--onnx/--no-onnx", help="Also export model.onnx, checked with onnxruntime."),
                check_images: int = typer.Option(4, "--check-images", help="Held-out images to compare with the full model (max |diff|)."),
                device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")):
    """Write an extracted model per task with only the experts it uses -> OUT/<task>/{model.safetensors, config.json}.

    Example (writes runs/tiny/extracted/<task>/, the default --out):
      modsquad extract runs/tiny --mass 0.99 --onnx
    """
    from .extract.export import write_extracted
    from .extract.prune import PAPER

    out = _out_dir(out) or _under_run(checkpoint, "extracted")
    _at_least("--max-images", max_images)
    _at_least("--batch-size", batch_size)
    _at_least("--workers", workers, 0)
    _at_least("--check-images", check_images)
    if paper_threshold:
        if threshold is not None or mass is not None:
            raise ConfigError("--paper-threshold cannot be combined with --threshold or --mass")
        threshold = PAPER
    data = _renamed("--data-root", data_root, "--data", data_old)
    results = write_extracted(checkpoint, out, tasks=_csv(tasks), threshold=threshold, mass=mass, usage=usage,
                              data=data, data_format=data_format, split=split, max_images=max_images,
                              batch_size=batch_size, workers=workers, onnx=onnx, check_images=check_images,
                              device=device)
    full = next(iter(results.values()))["params"]["full"]
    table = Table(title=f"Extracted into {out} (full model: {full:,} params)", title_justify="left")
    for col in ("task", "experts kept", "params", "max |diff|", "held-out coverage", "held-out |diff|",
                *(["onnx |diff|"] if onnx else [])):
        table.add_column(col, justify="left" if col == "task" else "right", overflow="fold")

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    for task, r in results.items():
        p = r["params"]
        kept = f"{sum(map(len, r['kept'].values()))}/{r['experts_total']}" + (" folded" if r["folded"] else "")
        row = [task, kept, f"{p['extracted']:,} ({100 * p['extracted'] / p['full']:.0f}%)",
               f"{r['max_abs_diff']:.1e}", fmt(r["heldout"]["coverage"], ".2%"), fmt(r["heldout"]["max_abs_diff"], ".1e")]
        table.add_row(*row, *([f"{r['onnx']['max_abs_diff']:.1e}"] if onnx else []))
    console.print(table)
    first = next(iter(results.values()))
    check, held, counted = first["check_images"], first["heldout"], first["counted"]
    console.print(f"held-out coverage: share of the full model's top-k choices on {held['images']} images of "
                  f"split {held['split']} that lie inside the kept experts (usage counted on {counted['split']}); "
                  f"outputs equal the full model's to float rounding only where it is 100%",
                  highlight=False, soft_wrap=True)
    console.print(f"max |diff|: largest difference to the full model's output on {check['count']} {check['kind']}",
                  highlight=False, soft_wrap=True)


@app.command("predict")
@user_errors
def predict_cmd(model: Path = typer.Argument(..., help="Extracted model directory (OUT/<task>) or its "
                                             "model.safetensors, or a full checkpoint / run directory."),
                images: list[Path] = typer.Argument(..., help="Image files (any size), folders of them, or quoted "
                                                    "glob patterns such as 'photos/*.jpg'."),
                out: Path | None = typer.Option(None, "--out", help="Folder for <stem>_<task>.png panels "
                                                "(default: next to each image)."),
                raw: bool = typer.Option(False, "--raw/--no-raw", help="Also write <stem>_<task>_raw.png/.npy: "
                                         "depth as 16-bit PNG in 1/512 m, normals as 8-bit RGB (Taskonomy "
                                         "encoding), class ids as PNG, other maps as float .npy."),
                tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated tasks of a full model "
                                                "(default: all)."),
                task_old: str | None = typer.Option(None, "--task", hidden=True),
                batch_size: int = typer.Option(8, "--batch-size", help="Images per forward."),
                device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
                compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the model first (pays off "
                                             "for many images; needs a C++ compiler on CPU).")):
    """Predict images: per image and task a panel input | prediction with a colour bar and units (or the classes).

    Aspect ratio is kept: short side resized to the model's input size (long side at most 4x it), padded to the
    patch grid; the prediction is cropped and resized back to the image. --raw also writes the prediction itself.

    Unreadable files are skipped and listed; the exit code is 2 only when nothing could be predicted.

    Example: modsquad predict runs/tiny/extracted/normal photos 'shots/*.jpg' --out preds --raw
    """
    import cv2

    from .predict import predict_images

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # a broken file is reported once, by us
    _out_dir(out)
    _at_least("--batch-size", batch_size)
    tasks = _renamed("--tasks", tasks, "--task", task_old)
    result = predict_images(model, images, out=out, tasks=_csv(tasks), device=device, batch_size=batch_size,
                            compile=compile, raw=raw)
    for path in result.written:
        console.print(str(path), highlight=False)
    for where, why in result.skipped.items():
        err_console.print(f"[yellow]skipped:[/] {where}: {why}", highlight=False)
    console.print(f"wrote {len(result.written)} files; skipped {len(result.skipped)} inputs; {result.strategy}",
                  highlight=False, soft_wrap=True)
