#!/usr/bin/env python
"""Kernel benchmark of the MoE core against timm's dense layers at equal active FLOPs.

Measures, in one run and on one device:
  * MoE MLP vs `timm.layers.Mlp(dim, 4 * dim)`: experts of hidden 4 * dim / top_k, so a token's compute is equal;
  * MoE attention (MoA) vs `timm.models.vision_transformer.Attention(dim, num_heads=top_k)`: experts of head_dim
    dim / top_k, so the k chosen query/output projections equal the dense ones (MoA's shared K/V projection is
    k times smaller than timm's, printed in the GFLOPs column);
  * forward (no_grad) and forward + backward, float32 and bfloat16, grouped_mm and the per-expert loop;
  * the `modsquad_vit_s` model: one forward for all tasks vs one forward per task (skipped if unavailable).
Times are medians over `--repeats` after warm-up. Routers get random gates so that tokens spread over experts
as in a trained model (zero-initialised gates would send every token to the first k experts).

    python tools/bench_moe.py --out bench_out/moe.json          (also `make bench`)
    python tools/bench_moe.py --quick                           (tiny sizes, a smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn

from modsquad.core.atomic import atomic_write
from modsquad.moe import MoEAttention, MoEMlp
from modsquad.moe.dispatch import GROUPED_MM_ENV, grouped_mm_supported

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODEL_TASKS = ("depth_euclidean", "normal", "edge_texture", "reshading", "keypoints2d")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per call (batch x sequence)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sample (attention span)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tasks", type=int, default=5, help="tasks the samples are spread over")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, from {sorted(DTYPES)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--model", default="modsquad_vit_s", help="preset for the all-tasks vs per-task comparison")
    p.add_argument("--model-img-size", type=int, default=224)
    p.add_argument("--model-batch", type=int, default=2, help="images per task")
    p.add_argument("--model-repeats", type=int, default=3)
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats, one thread (smoke test)")
    p.add_argument("--stacked", action="store_true", help="only the sweep behind the stacked-path rule "
                   "(modsquad.moe.layer.STACKED_MAX_RATIO): stacked vs sorted inference, E/k from 1 to 2")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.seq_len, args.dim, args.experts = 256, 32, 64, 4
        args.repeats, args.warmup, args.model_img_size, args.model_batch, args.model_repeats = 2, 1, 32, 1, 1
        args.threads = args.threads or 1  # tiny ops on a shared machine: threads only add barrier waits
    unknown = set(args.dtypes.split(",")) - set(DTYPES)
    if unknown:
        p.error(f"--dtypes: unknown {sorted(unknown)}; choose from {sorted(DTYPES)}")
    if args.tokens % args.seq_len:
        p.error(f"--tokens ({args.tokens}) must be a multiple of --seq-len ({args.seq_len})")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def interleaved_median_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                          device: torch.device) -> dict[str, float]:
    """Median time of each fn, timed round-robin so that a change of machine load hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time_ms(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def spread_routers(module: nn.Module, seed: int = 0) -> None:
    """Random gates (logits ~ N(0, 1) for unit-scale tokens) so that routing is spread over the experts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".router." in f".{name}":
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)


def layer_cases(args) -> list[dict]:
    """(name, kind, module factory, active GFLOPs per forward) for each layer compared."""
    d, k, e, n, t = args.dim, args.top_k, args.experts, args.seq_len, args.tokens
    hidden = 4 * d
    head_dim = d // k
    mlp_flops = 2 * t * 2 * d * hidden
    dense_attn_flops = 2 * t * 4 * d * d + 2 * t * 2 * n * d
    moa_flops = 2 * t * (2 * k * head_dim * d + 2 * head_dim * d) + 2 * t * 2 * n * k * head_dim
    return [
        dict(layer="mlp", impl="dense (timm)", make=lambda: Mlp(d, hidden), gflops=mlp_flops / 1e9),
        dict(layer="mlp", impl="moe", make=lambda: MoEMlp(d, hidden, e, k, args.tasks), gflops=mlp_flops / 1e9),
        dict(layer="attention", impl="dense (timm)", make=lambda: Attention(d, num_heads=k, qkv_bias=True),
             gflops=dense_attn_flops / 1e9),
        dict(layer="attention", impl="moe", make=lambda: MoEAttention(d, head_dim, e, k, args.tasks),
             gflops=moa_flops / 1e9),
    ]


def _calls(module: nn.Module, x: torch.Tensor, task_ids: torch.Tensor | None):
    """(inference forward, forward + backward) closures; task_ids None for the dense timm layers."""
    inputs = (lambda t: (t,)) if task_ids is None else (lambda t: (t, task_ids))

    @torch.no_grad()
    def forward():
        return module(*inputs(x))

    x_grad = x.detach().requires_grad_()

    def forward_backward():
        module(*inputs(x_grad)).float().square().mean().backward()
        module.zero_grad(set_to_none=True)
        x_grad.grad = None

    return forward, forward_backward


def _with_grouped_mm(fn: Callable[[], object], enabled: bool) -> Callable[[], object]:
    def call():
        os.environ[GROUPED_MM_ENV] = "1" if enabled else "0"
        return fn()

    return call


def bench_layers(args, device: torch.device, console: Console) -> list[dict]:
    """Each layer's dense and MoE variants (grouped_mm and loop), timed round-robin per dtype."""
    rows = []
    batch = args.tokens // args.seq_len
    task_ids = (torch.arange(batch) % args.tasks).to(device)
    previous_env = os.environ.get(GROUPED_MM_ENV)
    try:
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            x = torch.randn(batch, args.seq_len, args.dim, generator=torch.Generator().manual_seed(0)).to(device, dtype)
            for layer in ("mlp", "attention"):
                calls, gflops = {}, {}
                for case in (c for c in layer_cases(args) if c["layer"] == layer):
                    module = case["make"]().to(device, dtype)
                    if case["impl"] != "moe":
                        calls[case["impl"]] = _calls(module, x, None)
                        gflops[case["impl"]] = case["gflops"]
                        continue
                    spread_routers(module)
                    module.track_usage = False
                    impls = ["grouped_mm", "loop"]
                    if not grouped_mm_supported(device, dtype):
                        console.print(f"[yellow]grouped_mm unsupported for {dtype_name} on {device.type}; skipped")
                        impls.remove("grouped_mm")
                    for impl in impls:
                        fwd, fwd_bwd = _calls(module, x, task_ids)
                        calls[impl] = tuple(_with_grouped_mm(f, impl == "grouped_mm") for f in (fwd, fwd_bwd))
                        gflops[impl] = case["gflops"]
                fwd = interleaved_median_ms({k: v[0] for k, v in calls.items()}, args.repeats, args.warmup, device)
                train = interleaved_median_ms({k: v[1] for k, v in calls.items()}, args.repeats, args.warmup, device)
                dense = next(k for k in calls if k.startswith("dense"))
                for impl in calls:
                    rows.append(dict(layer=layer, dtype=dtype_name, impl=impl, gflops=gflops[impl],
                                     fwd_ms=fwd[impl], fwd_bwd_ms=train[impl], fwd_vs_dense=fwd[impl] / fwd[dense],
                                     fwd_bwd_vs_dense=train[impl] / train[dense]))
                    console.print(f"  {layer:9s} {dtype_name} {impl:13s} fwd {fwd[impl]:8.2f} ms  "
                                  f"fwd+bwd {train[impl]:8.2f} ms")
    finally:
        if previous_env is None:
            os.environ.pop(GROUPED_MM_ENV, None)
        else:
            os.environ[GROUPED_MM_ENV] = previous_env
    return rows


def bench_model(args, device: torch.device, console: Console) -> dict:
    """All tasks in one forward vs one forward per task (eval, no_grad, float32)."""
    tasks = list(MODEL_TASKS[: args.tasks]) if args.tasks <= len(MODEL_TASKS) else list(MODEL_TASKS)
    try:
        import modsquad

        model = modsquad.create_model(args.model, tasks=tasks, img_size=args.model_img_size).to(device).eval()
    except Exception as err:  # the model package may not exist yet or may be broken: report and go on
        console.print(f"[yellow]model comparison skipped: cannot build {args.model!r}: {type(err).__name__}: {err}")
        return {"skipped": f"{type(err).__name__}: {err}"}
    spread_routers(model)
    images = torch.randn(args.model_batch, 3, args.model_img_size, args.model_img_size,
                         generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        times = interleaved_median_ms({"together": lambda: model(images, tasks=tasks),
                                       "separate": lambda: [model(images, tasks=[t]) for t in tasks]},
                                      args.model_repeats, 1, device)
    together, separate = times["together"], times["separate"]
    result = dict(model=args.model, tasks=tasks, img_size=args.model_img_size, batch=args.model_batch,
                  together_ms=together, per_task_ms=separate, speedup=separate / together)
    console.print(f"  {args.model}: {len(tasks)} tasks in one forward {together:.1f} ms, "
                  f"one forward per task {separate:.1f} ms -> {result['speedup']:.2f}x")
    return result


def print_tables(console: Console, rows: list[dict], model: dict) -> None:
    if rows:
        _print_layer_table(console, rows)
    if "speedup" in model:
        console.print(f"{model['model']} ({len(model['tasks'])} tasks, {model['batch']} images "
                      f"{model['img_size']}px): one forward {model['together_ms']:.1f} ms vs per-task forwards "
                      f"{model['per_task_ms']:.1f} ms = {model['speedup']:.2f}x")


def _print_layer_table(console: Console, rows: list[dict]) -> None:
    table = Table(title="MoE layers vs timm dense at equal active FLOPs (median ms)")
    for col in ("layer", "dtype", "impl", "GFLOPs", "fwd ms", "fwd+bwd ms", "fwd / dense", "fwd+bwd / dense"):
        table.add_column(col, justify="left" if col in ("layer", "dtype", "impl") else "right")
    for r in rows:
        table.add_row(r["layer"], r["dtype"], r["impl"], f"{r['gflops']:.2f}", f"{r['fwd_ms']:.2f}",
                      f"{r['fwd_bwd_ms']:.2f}", f"{r['fwd_vs_dense']:.2f}x", f"{r['fwd_bwd_vs_dense']:.2f}x")
    console.print(table)


def bench_stacked(args, device: torch.device, console: Console) -> list[dict]:
    """No-grad inference of MoE MLP (D, expert hidden 4D / k) and MoA (head_dim 2D / 6 as Mod-Squad) for
    E = k .. 2k experts, one task: the stacked path (every expert in one concatenated matmul) against sorted
    dispatch, interleaved, at `--seq-len` tokens (one image) and `--tokens` tokens. The rule E <= r * k in
    `modsquad.moe.layer.STACKED_MAX_RATIO` comes from this table."""
    import modsquad.moe.layer as moe_layer

    d, k = args.dim, args.top_k
    rows = []
    for kind in ("mlp", "attn"):
        for experts in sorted({k, round(1.25 * k), round(1.5 * k), 2 * k}):
            if kind == "mlp":
                layer = MoEMlp(d, 4 * d, experts, k, num_tasks=1)
            else:
                layer = MoEAttention(d, 2 * d // 6, experts, k, num_tasks=1, bias="official")
            layer = layer.to(device).eval()
            layer.track_usage = False
            spread_routers(layer)
            for tokens in (args.seq_len, args.tokens):
                x = torch.randn(max(tokens // args.seq_len, 1), args.seq_len, d).to(device)

                def call(path, layer=layer, x=x):
                    def run():
                        saved = dict(moe_layer.STACKED_MAX_RATIO)
                        moe_layer.STACKED_MAX_RATIO[layer.kind] = float("inf") if path == "stacked" else 0.0
                        try:
                            with torch.no_grad():
                                return layer(x, 0)
                        finally:
                            moe_layer.STACKED_MAX_RATIO.update(saved)
                    return run

                ms = interleaved_median_ms({"stacked": call("stacked"), "sorted": call("sorted")}, args.repeats,
                                           args.warmup, device)
                rows.append(dict(layer=kind, experts=experts, top_k=k, tokens=x.shape[0] * x.shape[1],
                                 stacked_ms=ms["stacked"], sorted_ms=ms["sorted"],
                                 ratio=ms["stacked"] / ms["sorted"]))
                console.print(f"  {kind} E={experts} k={k} (E/k {experts / k:.2f}) tokens {rows[-1]['tokens']}: "
                              f"stacked {ms['stacked']:.2f} ms, sorted {ms['sorted']:.2f} ms, "
                              f"ratio {rows[-1]['ratio']:.2f}")
    return rows


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON; atomically, so an interrupted run never leaves half a file."""
    text = json.dumps(data, indent=2, default=str)
    atomic_write(path, lambda p: p.write_text(text))


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console()
    if console.width < 120:  # not a terminal: rich would wrap the table at 80 columns
        console = Console(width=120)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    console.print(f"torch {torch.__version__} on {device} ({torch.get_num_threads()} threads); tokens {args.tokens}, "
                  f"dim {args.dim}, {args.experts} experts, top-{args.top_k}")
    if args.stacked:
        rows = bench_stacked(args, device, console)
        if args.out:
            write_json(args.out, dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                                      stacked=rows))
        return 0
    rows = [] if args.skip_layers else bench_layers(args, device, console)
    model = {"skipped": "--skip-model"} if args.skip_model else bench_model(args, device, console)
    print_tables(console, rows, model)
    result = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                  config={k: v for k, v in vars(args).items() if k != "out"}, layers=rows, model=model)
    if args.out:
        write_json(args.out, result)
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
