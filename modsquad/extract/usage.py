"""Expert usage over a pass of data: which experts each task selects in every MoE layer.

`count_usage` runs the model in eval mode over batches of images and reads the layers' selection counters
(`MoELayer.usage`, top-k selections per task and expert). `compute_usage` does that for a checkpoint on its run's
training split (or any split or data set) and returns the report that `save_usage` writes as

    usage.json  {"format": "modsquad-usage", "checkpoint", "checkpoint_sha256", "data": {...}, "tasks": [...],
                 "layers": [{"name", "kind", "num_experts", "top_k", "router"}],
                 "counts": {task: {layer: [E ints]}},
                 "experts_for_mass": {"0.9": {task: {layer: n}}, "0.99": {...}}}
    usage.png   one task x expert heatmap (share of the task's tokens that pick the expert) per MoE layer

`modsquad extract` reads the same report (from a pass it runs itself, or from `--usage usage.json`), and
`routing_coverage` measures on held-out images how often the full model's top-k choices stay inside the experts
an extraction keeps (an extracted model is exact only where they do).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_model, resolve_checkpoint
from ..core.atomic import atomic_write
from ..core.devices import resolve_device
from ..core.errors import CheckpointError, ConfigError
from ..core.hashing import file_sha256
from ..data.from_config import eval_dataset
from ..data.from_config import eval_loader as make_loader
from ..moe import experts_for_mass_count
from ..run import USAGE_FILE, Run

USAGE_FORMAT = "modsquad-usage"
USAGE_PNG = "usage.png"
MASSES = (0.9, 0.99)


# --- counting -----------------------------------------------------------------------------------------------

def batch_images(batch) -> torch.Tensor:
    """Images [B, 3, H, W] of a loader batch: a tensor, a dict with "image", or a tuple/list led by the images."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in ("image", "images", "rgb"):
            if key in batch:
                return batch[key]
        raise TypeError(f"batch has no 'image' entry (keys: {sorted(batch)})")
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"cannot find images in a batch of type {type(batch).__name__}")


def capped_images(batches: Iterable, max_images: int | None = None) -> Iterator[torch.Tensor]:
    """The images [b, 3, H, W] of each batch (`batch_images`), the last ones cut so that at most `max_images`
    come out in all; stops reading `batches` once they have (or at an empty batch)."""
    seen = 0
    for batch in batches:
        images = batch_images(batch)
        if max_images is not None:
            images = images[:max_images - seen]
        if images.shape[0] == 0:
            return
        yield images
        seen += images.shape[0]
        if max_images is not None and seen >= max_images:
            return


@torch.no_grad()
def count_usage(model: nn.Module, batches: Iterable, max_images: int | None = None
                ) -> tuple[dict[str, dict[str, list[int]]], int]:
    """Top-k selections per task, MoE layer and expert over `batches`, in eval mode, with all tasks in one forward.

    Returns ({task: {layer: [E]}}, number of images). The model's usage counters are reset first and left
    holding this pass; its train/eval mode is restored.
    """
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    model.reset_usage()
    seen = 0
    try:
        for images in capped_images(batches, max_images):
            model(images.to(device, non_blocking=True))
            seen += images.shape[0]
    finally:
        model.train(was_training)
    return model.expert_usage(), seen


def layer_info(model: nn.Module) -> list[dict]:
    """[{"name", "kind" ("attn" | "mlp"), "num_experts", "top_k", "router"}] of every MoE layer in block order."""
    return [{"name": name, "kind": layer.kind,
             "num_experts": layer.num_experts, "top_k": layer.top_k, "router": layer.router_kind}
            for name, layer in model.moe_layers()]


def mass_summary(counts: Mapping[str, Mapping[str, Sequence[int]]], masses: Sequence[float] = MASSES
                 ) -> dict[str, dict[str, dict[str, int]]]:
    """{str(mass): {task: {layer: fewest experts carrying that share of the task's selections}}}."""
    return {str(m): {task: {layer: experts_for_mass_count(torch.tensor(row), m) for layer, row in rows.items()}
                     for task, rows in counts.items()} for m in masses}


def usage_report(model: nn.Module, counts: Mapping[str, Mapping[str, Sequence[int]]], *, checkpoint: str = "",
                 checkpoint_sha256: str = "", data: Mapping | None = None) -> dict:
    """The usage.json dict for `counts` measured on `model` (see the module docstring)."""
    return {
        "format": USAGE_FORMAT,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": checkpoint_sha256,
        "data": dict(data or {}),
        "tasks": list(model.tasks),
        "layers": layer_info(model),
        "counts": {t: {layer: list(map(int, row)) for layer, row in rows.items()} for t, rows in counts.items()},
        "experts_for_mass": mass_summary(counts),
    }


# --- data ---------------------------------------------------------------------------------------------------

def load_run_config(checkpoint: Path):
    """The config.yaml of the run the checkpoint belongs to (data.root resolved against the run), or None."""
    return Run.of(checkpoint).config_or_none()


def default_splits(cfg) -> tuple[str, str]:
    """(split usage is counted on, held-out split): the run's training split and its validation split."""
    if cfg is None:
        return "train", "val"
    return cfg.data.train_split, cfg.data.val_split or "test"


def heldout_split(counted: str, cfg) -> str:
    """A split other than `counted` to measure held-out coverage and differences on (val, else train)."""
    train, val = default_splits(cfg)
    return val if counted != val else train


def eval_loader(model: nn.Module, checkpoint: Path, *, data: str | os.PathLike | None = None,
                data_format: str | None = None, split: str | None = None, max_images: int | None = None,
                batch_size: int | None = None, workers: int = 0) -> tuple[Iterable, dict]:
    """A DataLoader over the images of one split (images only, no labels) and a description for usage.json.

    Default: the run's training split (usage is counted on the data the model was trained on; held-out
    splits then show how well that generalises) as its config.yaml (next to the checkpoint) describes it.
    `data` reads another data set root (format `data_format`, default the run's or "taskonomy"). A missing
    root is a DataError that says how to make it: nothing is rendered here.
    """
    cfg = load_run_config(checkpoint)
    if cfg is None and data is None:
        raise ConfigError(f"{checkpoint}: no run config.yaml next to the checkpoint to find its data; "
                          f"give the data with --data-root ROOT [--format F] (or a usage.json with --usage)")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    # no tasks: routing needs the images only, so labels are neither read nor required
    dataset, source = eval_dataset(cfg, split or default_splits(cfg)[0], tasks=[], root=data, format=data_format,
                                   img_size=model.config["img_size"], max_images=max_images)
    bs = batch_size or ((cfg.eval.batch_size or cfg.data.batch_size) if cfg is not None else 8)
    return make_loader(dataset, bs, workers), source


def compute_usage(checkpoint: str | os.PathLike, *, data: str | os.PathLike | None = None,
                  data_format: str | None = None, split: str | None = None, max_images: int | None = None,
                  batch_size: int | None = None, workers: int = 0, device: str = "auto",
                  model: nn.Module | None = None) -> dict:
    """Load a checkpoint (file or run directory), count expert usage on its training split (or `split` / `data`);
    the usage.json dict.

    `model` may pass the already loaded checkpoint to save loading it twice.
    """
    path = resolve_checkpoint(checkpoint)
    model = model if model is not None else load_model(path)
    if not model.moe_layers():
        raise CheckpointError(f"{path}: model has no MoE layers (router 'dense'): there is no expert usage to count")
    model = model.to(resolve_device(device))
    loader, source = eval_loader(model, path, data=data, data_format=data_format, split=split,
                                 max_images=max_images, batch_size=batch_size, workers=workers)
    counts, images = count_usage(model, loader, max_images)
    source["images"] = images
    return usage_report(model, counts, checkpoint=str(path), checkpoint_sha256=file_sha256(path), data=source)


# --- files --------------------------------------------------------------------------------------------------

def save_usage(report: Mapping, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `usage.json` and `usage.png` into `out_dir`, each atomically; returns both paths."""
    out_dir = Path(out_dir)
    json_path = atomic_write(out_dir / USAGE_FILE, lambda p: p.write_text(json.dumps(report, indent=1)))
    png_path = atomic_write(out_dir / USAGE_PNG, lambda p: plot_usage(report, p))
    return json_path, png_path


def load_usage(path: str | os.PathLike) -> dict:
    """Read a usage.json (a file, or a directory holding one); CheckpointError if it is not one."""
    path = Path(path)
    path = path / USAGE_FILE if path.is_dir() else path
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: usage file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable usage file ({e})") from None
    if not isinstance(report, dict) or report.get("format") != USAGE_FORMAT:
        raise CheckpointError(f"{path}: not a usage file written by `modsquad usage`")
    for key in ("tasks", "layers", "counts"):
        if key not in report:
            raise CheckpointError(f"{path}: usage file has no {key!r}")
    return report


def check_usage_matches(report: Mapping, model: nn.Module, source: str = "usage") -> None:
    """CheckpointError unless `report` was counted on a model with these tasks and MoE layers."""
    layers = {d["name"]: d for d in layer_info(model)}
    counts = report["counts"]
    for task in model.tasks:
        if task not in counts:
            raise CheckpointError(f"{source}: has no counts for task {task!r}")
        for name, info in layers.items():
            row = counts[task].get(name)
            if row is None or len(row) != info["num_experts"]:
                raise CheckpointError(f"{source}: counts of task {task!r} in layer {name!r} do not match the model "
                                      f"({info['num_experts']} experts); was it counted on another checkpoint?")


def plot_usage(report: Mapping, path: str | os.PathLike,
               kept: Mapping[str, Mapping[str, Sequence[int]]] | None = None) -> None:
    """usage.png: per MoE layer a task x expert heatmap of the share of each task's tokens that pick the expert.

    A token picks top_k experts, so a row sums to top_k; 1.0 means every token of the task uses the expert.
    Experts a task never picks are crossed (x). `kept` ({task: {layer: expert ids}}, from extraction) outlines
    the cells of the experts each task's extraction kept.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    tasks, layers = report["tasks"], report["layers"]
    n = max(len(layers), 1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    max_e = max((d["num_experts"] for d in layers), default=1)
    cell_w = max(3.0, 0.22 * max_e + 1.5)
    cell_h = max(1.6, 0.3 * len(tasks) + 1.0)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell_w + 1.5, rows * cell_h + 0.6), squeeze=False,
                             layout="constrained")
    image = None
    for ax, info in zip(axes.flat, layers, strict=False):
        counts = np.array([report["counts"][t][info["name"]] for t in tasks], dtype=np.float64)
        tokens = counts.sum(1, keepdims=True) / info["top_k"]  # each token makes top_k selections
        rate = counts / np.maximum(tokens, 1.0)
        image = ax.imshow(rate, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        never_t, never_e = np.nonzero(counts == 0)  # experts the task never picks: dropped by extraction
        ax.scatter(never_e, never_t, marker="x", s=12, linewidths=0.8, color="white")
        for row, task in enumerate(tasks):
            for e in (kept or {}).get(task, {}).get(info["name"], ()):
                ax.add_patch(Rectangle((e - 0.5, row - 0.5), 1.0, 1.0, fill=False, edgecolor="#ff1744",
                                       linewidth=1.4))
        ax.set_title(f"{info['name']} ({info['kind']}, top-{info['top_k']})", fontsize=9)
        ax.set_xticks(range(info["num_experts"]))
        ax.set_xticklabels(range(info["num_experts"]), fontsize=6)
        ax.set_yticks(range(len(tasks)))
        ax.set_yticklabels(tasks, fontsize=7)
        ax.set_xlabel("expert", fontsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="share of tokens")
    images = report.get("data", {}).get("images")
    fig.suptitle("Expert usage: share of each task's tokens routed to each expert (x: never"
                 + ("; red box: kept by extraction)" if kept else ")")
                 + (f", {images} images" if images else ""), fontsize=10)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# --- held-out routing coverage ------------------------------------------------------------------------------

@torch.no_grad()
def routing_coverage(model: nn.Module, batches: Iterable, kept: Mapping[str, Mapping[str, Sequence[int]]],
                     max_images: int | None = None) -> tuple[dict[str, dict], int]:
    """How often the FULL model's routing stays inside the kept experts, on images usage was not counted on.

    `kept`: {task: {layer: kept expert ids}}. For every task and MoE layer, a token is covered when all of its
    top-k experts are kept (then dropping the others cannot change that layer's choice for it). Returns ({task:
    {"coverage": covered share of all (token, layer) choices, "tokens_covered": share of tokens covered in every
    layer, "per_layer": {layer: share}}}, images seen). Exactness claims rest on this: 1.0 on held-out images means
    the extracted model routes those images exactly as the full model does.
    """
    layers = dict(model.moe_layers())
    tasks = [t for t in model.tasks if t in kept]
    covered = {t: {name: 0 for name in layers} for t in tasks}
    every = {t: 0 for t in tasks}
    tokens = {t: 0 for t in tasks}
    was_training, track = model.training, {name: layer.track_usage for name, layer in layers.items()}
    device = next(model.parameters()).device
    model.eval()
    seen = 0
    try:
        for layer in layers.values():
            layer.track_usage = False  # leave the usage counters as they are
        for images in capped_images(batches, max_images):
            model(images.to(device), tasks=tasks)
            seen += images.shape[0]
            for t in tasks:
                all_layers = None
                tid = model.task_index(t)
                for name, layer in layers.items():
                    routing, task_ids = layer.last_routing
                    mask = task_ids.reshape(-1) == tid
                    ids = torch.as_tensor(list(kept[t].get(name, [])), dtype=torch.long, device=routing.indices.device)
                    inside = torch.isin(routing.indices[mask], ids).all(-1)
                    covered[t][name] += int(inside.sum())
                    all_layers = inside if all_layers is None else all_layers & inside
                    n = int(mask.sum())
                if all_layers is not None:
                    every[t] += int(all_layers.sum())
                    tokens[t] += n
    finally:
        model.train(was_training)
        for name, layer in layers.items():
            layer.track_usage = track[name]
    report = {}
    for t in tasks:
        if not layers:  # a dense model: no expert is dropped, every token is routed as in the full model
            report[t] = {"coverage": 1.0, "tokens_covered": 1.0, "per_layer": {}}
            continue
        n = max(tokens[t], 1)
        per_layer = {name: covered[t][name] / n for name in layers}
        report[t] = {"coverage": sum(per_layer.values()) / max(len(per_layer), 1) if tokens[t] else None,
                     "tokens_covered": every[t] / n if tokens[t] else None,
                     "per_layer": per_layer if tokens[t] else {}}
    return report, seen
