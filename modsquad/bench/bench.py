"""Extracted vs full vs a dense timm ViT: parameters, FLOPs, latency, throughput, peak memory and task metrics.

The full multi-task model is measured as users would run it for one task (`model(x, tasks=[task])`) and each
extracted model as `extracted(x)`. The baseline every figure is also put against is a plain single-task dense timm
`VisionTransformer` of the checkpoint's shape with that task's head (`DenseTimmBaseline`, random weights: only its
cost is measured), i.e. what the task would cost without mixture-of-experts. Every figure of a task comes from
the same process and the same inputs, and timed runs are interleaved (full, extracted, dense, full, ... with the
order rotated each round) so that a noisy machine slows all alike and the ratios stay fair.

Definitions (also written into bench.json under "definitions" and into bench.md):
    params       full per task: all parameters minus those that belong to the other tasks (their heads, their
                 rows of task embeddings, per-task router gates and task logits); see `task_param_count`.
    flops        forward FLOPs for one image (torch.utils.flop_counter; a multiply-add counts 2), including
                 attention on CPU and grouped expert matmuls, which the stock counter misses.
    latency_ms   median wall time of one forward at batch 1 after warm-up, under torch.inference_mode.
    throughput   images per second at the larger batch (batch / median time of one forward).
    peak_mem_mb  weights + input + the peak of the tensors torch holds during one forward at the larger batch:
                 torch.cuda.max_memory_allocated on CUDA; on CPU the same quantity counted by a dispatch mode
                 that tracks every tensor storage an op creates until it is freed.
"""

from __future__ import annotations

import copy
import functools
import gc
import math
import statistics
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from ..checkpoint import load_model, resolve_checkpoint
from ..core.devices import resolve_device
from ..core.errors import CheckpointError, ConfigError, UnknownNameError
from ..data.from_config import eval_dataset, eval_loader, random_images
from ..evaluate.evaluator import metric_kwargs
from ..extract.extracted import file_sha256, load_extracted
from ..extract.usage import routing_coverage
from ..moe.dispatch import grouped_mm_supported
from ..moe.layer import dispatch_paths
from ..run import Run
from ..tasks.metrics import MultiTaskMetrics

FIELDS = ("params", "flops", "latency_ms", "throughput", "peak_mem_mb")

DEFINITIONS = {
    "params": "full per task = all parameters except those of the other tasks (heads, task-embedding rows, "
              "per-task router gates/logits); extracted = every parameter of the extracted model",
    "flops": "forward FLOPs per image at batch 1 (torch.utils.flop_counter, multiply-add = 2 FLOPs, with "
             "CPU attention and grouped expert matmuls added)",
    "latency_ms": "median of the timed forwards at the latency batch after warm-up, all models of the run "
                  "interleaved, torch.inference_mode, fixed thread count",
    "throughput": "images/s at the throughput batch (batch / median forward time)",
    "peak_mem_mb": "weights + input + peak bytes of tensors alive during one forward at the throughput batch "
                   "(CUDA: torch.cuda.max_memory_allocated; CPU: tensor storages tracked by a dispatch mode)",
    "max_abs_diff": "max |extracted(x) - full(x, tasks=[task])[task]| over the evaluated val images",
    "heldout_coverage": "share of the full model's top-k expert choices (all MoE layers, tokens of the task) on "
                        "the evaluated images that lie inside the extracted model's kept experts; held_out tells "
                        "whether those images are another split than the one usage was counted on (exactness "
                        "of a usage-based extraction holds only where coverage is 1)",
    "dispatch_paths": "how each MoE layer of the extracted model runs: sorted (tokens sorted by expert, grouped "
                      "matmuls), stacked (every kept expert in one concatenated matmul, gates on the hidden "
                      "chunks; MLPs when experts == top-k, attention when experts <= 1.25 x top-k) or folded "
                      "(fixed routing, one plain layer)",
    "dense_timm": "baseline: a single-task dense timm VisionTransformer of the checkpoint's shape (patch size, "
                  "width, depth, heads, MLP ratio; no MoE, no task embedding) plus the task's head, random "
                  "weights (cost only, no metrics); ratios extracted_vs_dense and full_vs_dense divide by it",
}


# --- parameters --------------------------------------------------------------------------------------------

def count_params(module: nn.Module) -> int:
    """Number of parameter elements (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def _task_indexed(model: nn.Module) -> set[int]:
    """ids of the parameters stacked per task along dim 0: the model's task embedding and what its MoE layers
    declare (`MoELayer.task_parameters()`: per-task router gates, task logits, ...)."""
    params = [getattr(model, "task_embed", None)]
    for _, layer in model.moe_layers() if hasattr(model, "moe_layers") else ():
        params.extend(layer.task_parameters().values())
    return {id(p) for p in params if p is not None}


def task_param_count(model: nn.Module, task: str, tasks: Sequence[str] | None = None) -> int:
    """Parameters the full model spends on one task: the shared parts plus that task's own parts.

    A parameter belongs to another task when a component of its name is that task's name (heads and other
    per-task `ModuleDict`s); parameters stacked per task along dim 0 (task embeddings, per-task router gates,
    task logits) count one row. Everything else (patch embedding, blocks, all experts) is shared.
    """
    tasks = list(tasks if tasks is not None else model.tasks)
    others = set(tasks) - {task}
    by_task = _task_indexed(model)
    total = 0
    for name, param in model.named_parameters():
        if others & set(name.split(".")):
            continue
        if id(param) in by_task:
            total += param.numel() // len(tasks)
        else:
            total += param.numel()
    return total


def module_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers (what the weights occupy in memory)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --- FLOPs -------------------------------------------------------------------------------------------------

def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """CPU flash attention: q @ k^T and attn @ v, [B, H, Nq, d] x [B, H, Nk, d]."""
    b, h, nq, d = query_shape
    nk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * nq * nk * (d + dv)


def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """Grouped GEMM: every output element is a dot product over the reduced dim of `a`."""
    if len(a_shape) == 2 and len(b_shape) == 2:  # groups split the reduced dim: out [G, M, N]
        return 2 * math.prod(out_shape[1:]) * a_shape[-1]
    return 2 * math.prod(out_shape) * a_shape[-1]


def _extra_flop_formulas() -> dict:
    aten = torch.ops.aten
    formulas = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop
    if hasattr(aten, "_grouped_mm"):
        formulas[aten._grouped_mm] = _grouped_mm_flop
    return formulas


@torch.inference_mode()
def count_flops(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> int:
    """Forward FLOPs of `fn(x)` (multiply-add = 2) for the whole batch `x`."""
    for dtype in {x.dtype, torch.float32, torch.bfloat16}:  # run the cached grouped_mm probes outside the counter
        grouped_mm_supported(x.device, dtype)
    with FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as counter:
        fn(x)
    return int(counter.get_total_flops())


# --- memory ------------------------------------------------------------------------------------------------

class LiveTensorTracker(TorchDispatchMode):
    """Counts the bytes of tensor storages created inside the mode while they are alive; keeps the peak.

    Views and in-place results share their input's storage and add nothing. Scratch memory that a single
    kernel allocates and frees internally is not seen (on CUDA the allocator statistics see it).
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._bytes: dict[int, int] = {}
        self._refs: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.current -= self._bytes.pop(key)
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self._refs:
                self._bytes[key] = storage.nbytes()
                self._refs[key] = 0
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            self._refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


@torch.inference_mode()
def peak_memory_mb(fn: Callable[[torch.Tensor], Any], module: nn.Module, x: torch.Tensor) -> float:
    """Weights + input + the peak of what one forward `fn(x)` allocates, in MiB (see module docstring)."""
    static = module_bytes(module) + x.numel() * x.element_size()
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        out = fn(x)
        torch.cuda.synchronize(x.device)
        transient = torch.cuda.max_memory_allocated(x.device) - base
        del out
    else:
        with LiveTensorTracker() as tracker:
            out = fn(x)
        transient = tracker.peak
        del out
    return (static + transient) / 2**20


# --- timing ------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def fixed_threads(threads: int | None):
    """Run with `threads` intra-op CPU threads (None keeps the current setting); restores it afterwards."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def time_interleaved(fns: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, repeats: int = 20,
                     warmup: int = 3, on_round: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Wall seconds of `repeats` calls of every fn on `x`, interleaved: one call of each per round.

    The order rotates each round so that no fn always runs right after the same neighbour (caches, clocks);
    garbage collection is paused while timing. `on_round` is called after each round (progress bars).
    Returns name -> list of seconds, in round order.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name](x)
    _sync(x.device)
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                fns[name](x)
                _sync(x.device)
                times[name].append(time.perf_counter() - start)
            if on_round is not None:
                on_round()
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def median_ms(seconds: Iterable[float]) -> float:
    """Median of wall times in seconds, in milliseconds."""
    return statistics.median(seconds) * 1e3


def ratios(extracted: dict[str, float], full: dict[str, float], fields: Sequence[str] = FIELDS) -> dict:
    """extracted / full for every field both have (None where the full figure is 0 or missing)."""
    return {k: (extracted[k] / full[k] if full.get(k) else None) for k in fields if k in extracted}


def repeat_to_batch(images: torch.Tensor, batch: int) -> torch.Tensor:
    """images: [n, C, H, W] -> [batch, C, H, W], cycling through the n images."""
    idx = torch.arange(batch, device=images.device) % images.shape[0]
    return images[idx].contiguous()


def _as_path(p: str | Path) -> Path:
    return Path(p).expanduser()


# --- the benchmark ----------------------------------------------------------------------------------------

def _select_tasks(model: nn.Module, extracted: Path, tasks: Sequence[str] | None) -> list[str]:
    """Tasks to compare: the requested ones, else every task of the model that has an extracted directory."""
    if not extracted.is_dir():
        raise CheckpointError(f"{extracted}: extracted-models directory not found (run `modsquad extract` first)")
    found = [t for t in model.tasks if (extracted / t / "config.json").is_file()]
    if tasks:
        unknown = [t for t in tasks if t not in model.tasks]
        if unknown:
            raise UnknownNameError(f"model has no task {unknown[0]!r}; its tasks: {', '.join(model.tasks)}")
        missing = [t for t in tasks if t not in found]
        if missing:
            raise CheckpointError(f"{extracted / missing[0]}: no extracted model (config.json) for task "
                                  f"{missing[0]!r}")
        return list(tasks)
    if not found:
        raise CheckpointError(f"{extracted}: holds no extracted model of this checkpoint's tasks "
                              f"({', '.join(model.tasks)}); expected {extracted}/<task>/config.json")
    return found


def _check_sources(extracted_models: dict[str, nn.Module], ckpt_path: Path, extracted: Path) -> None:
    """CheckpointError when an extracted model was cut from another checkpoint than the one benchmarked."""
    sha = file_sha256(ckpt_path)
    for task, extracted_model in extracted_models.items():
        source = (getattr(extracted_model, "info", None) or {}).get("source") or {}
        if source.get("sha256") not in (None, "", sha):
            raise CheckpointError(f"{extracted / task} was extracted from {source.get('checkpoint', 'another file')}, "
                                  f"not from {ckpt_path}; benchmark the checkpoint it came from or extract again")


class DenseTimmBaseline(nn.Module):
    """A plain single-task dense ViT: timm `VisionTransformer` tokens -> one task head.

    What a task costs without Mod-Squad: no experts, router or task embedding; the patch tokens (no class
    token) go through the timm final norm to the same head type as the multi-task model's.
    """

    def __init__(self, encoder: VisionTransformer, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.patch_size = encoder.patch_embed.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> head output ([B, C_t, H, W] for dense tasks, [B, classes] for classification)."""
        grid = (x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1])
        return self.head(self.encoder.forward_features(x), grid)  # tokens [B, h*w, D]


def dense_timm_baseline(model: nn.Module, task: str, img_size: int | Sequence[int] | None = None,
                        seed: int = 0) -> DenseTimmBaseline:
    """The dense timm twin of `model` for `task`: same image/patch size, width, depth, heads and MLP ratio (from
    `model.config`), a deep copy of the task's head, random weights drawn from `seed` (the global RNG is left
    as it was). `img_size` defaults to the config's; on the model's device and dtype, in eval mode."""
    cfg = model.config
    img_size = cfg["img_size"] if img_size is None else img_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = VisionTransformer(img_size=tuple(img_size) if not isinstance(img_size, int) else img_size,
                                    patch_size=cfg["patch_size"], in_chans=cfg.get("in_chans", 3),
                                    embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"],
                                    mlp_ratio=cfg["mlp_ratio"], qkv_bias=cfg.get("qkv_bias", True),
                                    class_token=False, global_pool="", num_classes=0)
    ref = model.pos_embed
    return DenseTimmBaseline(encoder, copy.deepcopy(model.heads[task])).to(ref.device, ref.dtype).eval()


def _full_task(model: nn.Module, task: str, x: torch.Tensor) -> torch.Tensor:
    """The full model as a user runs it for one task: x [B, C, H, W] -> that task's output."""
    return model(x, tasks=[task])[task]


class _Steps:
    """A rich progress bar over the benchmark's steps, or nothing (`enabled=False`)."""

    def __init__(self, enabled: bool, total: int):
        self.total = total
        self._progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("bench: {task.description:<22}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(), transient=True)

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
            self._id = self._progress.add_task("", total=self.total)
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._id, description=text)

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._id)


@dataclass
class ValData:
    """The evaluated val images: loader batches (dicts with "image", "targets", "masks") and where from."""

    root: str
    split: str
    batches: list[dict]

    @property
    def images(self) -> torch.Tensor:
        """The first batch's images [B, C, H, W] (inputs for FLOPs, timing and memory)."""
        return self.batches[0]["image"]

    @property
    def num_images(self) -> int:
        return sum(b["image"].shape[0] for b in self.batches)

    def describe(self) -> dict:
        return {"root": self.root, "split": self.split, "images": self.num_images}


def _val_data(ckpt_path: Path, model: nn.Module, data: str | Path | None, split: str | None, max_images: int,
              batch: int) -> tuple[ValData | None, dict]:
    """Val batches for the metrics and the metric options, from the run's config.yaml (`data` replaces its
    data.root) or, for a bare checkpoint, from `data` read as Taskonomy layout; (None, {}) when there is no
    data to evaluate or `max_images` is 0."""
    if max_images <= 0:
        return None, {}
    cfg = Run.of(ckpt_path).config_or_none()
    if cfg is None and data is None:
        return None, {}
    dataset, source = eval_dataset(cfg, split, tasks=list(model.tasks), root=data, img_size=model.config["img_size"],
                                   max_images=max_images)
    kwargs = metric_kwargs(cfg, list(model.tasks)) if cfg is not None else {}
    return ValData(source["root"], source["split"], list(eval_loader(dataset, batch))), kwargs


def _heldout_coverage(model: nn.Module, extracted_models: dict[str, nn.Module], val: ValData | None
                      ) -> dict[str, dict]:
    """Per task: how often the full model's routing on the evaluated images stays inside the extracted model's
    kept experts (`modsquad.extract.usage.routing_coverage`), and whether those images are held out (another
    split than the one usage was counted on). {} without evaluated images."""
    if val is None:
        return {}
    kept = {t: {name: layer["kept"] for name, layer in (extracted_model.info.get("layers") or {}).items()}
            for t, extracted_model in extracted_models.items()}
    report, images = routing_coverage(model, val.batches, kept)
    out = {}
    for t, extracted_model in extracted_models.items():
        selection = extracted_model.info.get("selection") or {}
        usage = selection.get("usage") if isinstance(selection.get("usage"), dict) else {}
        counted = selection.get("counted_split") or usage.get("split")
        out[t] = {"split": val.split, "images": images, "usage_split": counted,
                  "held_out": None if counted is None else counted != val.split,
                  "coverage": report[t]["coverage"], "tokens_covered": report[t]["tokens_covered"]}
    return out


def _to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


@torch.inference_mode()
def _evaluate(model: nn.Module, extracted_models: dict[str, nn.Module], val: ValData | None, images: torch.Tensor,
              metric_kwargs: dict | None = None):
    """Metrics of the extracted models, the full model per task and on all tasks at once, and max |extracted -
    full|.

    Without val data only the differences are measured, on `images`.
    """
    tasks = list(extracted_models)
    diffs = dict.fromkeys(tasks, 0.0)
    extracted_m, full_m = MultiTaskMetrics(tasks, metric_kwargs), MultiTaskMetrics(tasks, metric_kwargs)
    all_m = MultiTaskMetrics(model.tasks, metric_kwargs)
    batches = val.batches if val is not None else [{"image": images}]
    for batch in batches:
        batch = _to_device(batch, images.device)
        x = batch["image"]
        outs = {t: extracted_models[t](x) for t in tasks}
        full = {t: _full_task(model, t, x) for t in tasks}
        for t in tasks:
            diffs[t] = max(diffs[t], float((outs[t].float() - full[t].float()).abs().max()))
        if val is not None:
            extracted_m.update(outs, batch)
            full_m.update(full, batch)
            all_m.update(model(x), batch)
    if val is None:
        return {}, {}, {}, diffs
    return extracted_m.compute(), full_m.compute(), all_m.compute(), diffs


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    try:  # Linux: the CPU model, which platform.processor() leaves empty
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _entry(params: int, flops: int, latency: list[float], throughput: list[float], batch: int, peak_mb: float,
           metrics: dict | None = None) -> dict:
    """One model's figures (FIELDS, + "metrics" unless None)."""
    entry = {"params": int(params), "flops": int(flops), "latency_ms": median_ms(latency),
             "throughput": batch / statistics.median(throughput), "peak_mem_mb": peak_mb}
    return entry if metrics is None else {**entry, "metrics": metrics}


def benchmark(checkpoint: str | Path, extracted: str | Path, *, tasks: Sequence[str] | None = None,
              batch_sizes: Sequence[int] = (1, 32), device: str | torch.device = "cpu", repeats: int = 20,
              warmup: int = 3, data: str | Path | None = None, split: str | None = None, max_images: int = 64,
              threads: int | None = None, dense_baseline: bool = True, progress: bool = False,
              compile: bool = False) -> dict:
    """Measure the full model, every extracted model of `extracted` and, per task, a dense timm ViT of the same
    shape (`dense_timm_baseline`) side by side; returns bench.json's dict.

    Args:
        checkpoint: run directory or .safetensors checkpoint of the full multi-task model.
        extracted: directory with one `<task>/` per extracted model (`modsquad extract`).
        tasks: tasks to compare (default: every task of the model that was extracted).
        batch_sizes: (latency batch, throughput batch); one value uses the same batch for both.
        device: "auto" (CUDA when there is one), "cpu", "cuda", "cuda:N".
        repeats, warmup: timed and untimed forwards per model and batch size.
        data: dataset root for the metrics (default: the run's config.yaml data.root); split: default the
            config's eval split, else "val"; max_images: cap on evaluated images (0 skips the metrics).
        threads: CPU intra-op threads while measuring (default: torch's current setting).
        dense_baseline: also measure the dense timm baseline per task ("dense_timm" and the ratios
            "extracted_vs_dense" / "full_vs_dense" in each task's entry); False skips it.
        progress: show a rich progress bar.
        compile: time `torch.compile`d models (compiled during warm-up; FLOPs, memory, metrics stay eager).
    """
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if not batch_sizes or len(batch_sizes) > 2 or min(batch_sizes) < 1:
        raise ConfigError(f"--batch takes one or two batch sizes >= 1 (latency,throughput), got {batch_sizes}")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    b_lat, b_thr = batch_sizes[0], batch_sizes[-1]
    device = resolve_device(str(device))
    ckpt_path = resolve_checkpoint(checkpoint)
    model = load_model(ckpt_path, map_location=device).eval()
    extracted = _as_path(extracted)
    tasks = _select_tasks(model, extracted, tasks)
    extracted_models = {t: load_extracted(extracted / t, map_location=device).eval() for t in tasks}
    _check_sources(extracted_models, ckpt_path, extracted)
    val, metric_kwargs = _val_data(ckpt_path, model, data, split, max_images, b_thr)
    if val is not None:
        images = val.images.to(device)
    else:
        images = random_images(b_thr, model.config["img_size"], model.config.get("in_chans", 3)).to(device)

    dense = {t: dense_timm_baseline(model, t, tuple(images.shape[-2:])) for t in tasks} if dense_baseline else {}
    fns: dict[str, Callable[[torch.Tensor], Any]] = {"full": model}
    modules: dict[str, nn.Module] = {"full": model}
    for t in tasks:  # per task: full, extracted, dense (the timing loop rotates through all of them)
        fns[f"full/{t}"] = functools.partial(_full_task, model, t)
        modules[f"full/{t}"] = model
        fns[t] = extracted_models[t]
        modules[t] = extracted_models[t]
        if t in dense:
            fns[f"dense/{t}"] = modules[f"dense/{t}"] = dense[t]

    with fixed_threads(threads) as n_threads, _Steps(progress, 2 * repeats + len(fns) + 1) as steps:
        x_lat, x_thr = repeat_to_batch(images, b_lat), repeat_to_batch(images, b_thr)
        # One plain forward each first, so that lazy one-time work (kernel support probes, allocator pools)
        # happens outside the FLOP counter, the memory tracker, inference mode and the timed runs.
        with torch.no_grad():
            for fn in fns.values():
                fn(x_lat)
        steps.describe("FLOPs")
        flops = {k: count_flops(fn, x_lat[:1]) for k, fn in fns.items()}
        steps.describe(f"latency, batch {b_lat}")
        timed = {k: torch.compile(fn) for k, fn in fns.items()} if compile else fns
        # every "full/<task>" is a recompile of the same forward: room for all of them (and both batch sizes)
        with torch._dynamo.config.patch(recompile_limit=max(8, 2 * len(fns))):
            lat = time_interleaved(timed, x_lat, repeats, max(warmup, int(compile)), on_round=steps.advance)
            steps.describe(f"throughput, batch {b_thr}")
            thr = time_interleaved(timed, x_thr, repeats, max(warmup, int(compile)), on_round=steps.advance)
        steps.describe("peak memory")
        peak = {}
        for k, fn in fns.items():
            peak[k] = peak_memory_mb(fn, modules[k], x_thr)
            steps.advance()
        steps.describe("metrics")
        metrics, full_metrics, all_metrics, diffs = _evaluate(model, extracted_models, val, images, metric_kwargs)
        steps.advance()

    params = {"full": count_params(model), **{f"full/{t}": task_param_count(model, t) for t in tasks},
              **{t: count_params(extracted_models[t]) for t in tasks},
              **{f"dense/{t}": count_params(m) for t, m in dense.items()}}

    def entry(key: str, metrics: dict | None = None) -> dict:
        return _entry(params[key], flops[key], lat[key], thr[key], b_thr, peak[key], metrics)

    coverage = _heldout_coverage(model, extracted_models, val)
    result_tasks = {}
    for t in tasks:
        extracted_entry, full = entry(t, metrics.get(t, {})), entry(f"full/{t}", full_metrics.get(t, {}))
        result_tasks[t] = {**extracted_entry, "full": full, "max_abs_diff": diffs[t],
                           "ratios": ratios(extracted_entry, full),
                           "heldout_coverage": coverage.get(t),
                           "dispatch_paths": dispatch_paths(extracted_models[t])}
        if t in dense:
            base = entry(f"dense/{t}")
            result_tasks[t]["dense_timm"] = base
            result_tasks[t]["ratios"].update(extracted_vs_dense=ratios(extracted_entry, base),
                                             full_vs_dense=ratios(full, base))
    definitions = DEFINITIONS if dense else {k: v for k, v in DEFINITIONS.items() if k != "dense_timm"}
    full_all = entry("full", all_metrics)
    return {
        "checkpoint": str(ckpt_path),
        "extracted": str(extracted),
        "device": device.type,
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "threads": n_threads,
        "compiled": bool(compile),
        "batch_sizes": {"latency": b_lat, "throughput": b_thr},
        "repeats": repeats,
        "warmup": warmup,
        "data": val.describe() if val is not None else None,
        "full": {**full_all, "tasks": list(model.tasks)},
        "tasks": result_tasks,
        "definitions": definitions,
    }
