"""`modsquad extract`: per-task extracted models of a multi-task checkpoint, in memory or written to disk (+ ONNX).

    extracted = extract_model(model, "depth_euclidean", counts)         # ExtractedModel, in memory
    results = write_extracted("runs/x", "out/extracted", onnx=True)     # writes OUT/<task>/; {task: summary}

For each task: keep per MoE layer the experts chosen by `modsquad.extract.prune.select_experts` from expert usage
(counted on the run's training split, another split or data set, or read from a usage.json), slice them out
(`extract_task_model`), fold `task_level` layers into dense ones (`extract_model`), measure on a held-out split how
often the full model's routing stays inside the kept experts (coverage) and the largest difference to the full
model there and on the counting images, and write `OUT/<task>/{model.safetensors, config.json[, model.onnx]}`
(`write_extracted`). Everything is written into a temporary directory next to OUT first and renamed into place
only once every task succeeded, so an error never leaves a half-written task directory behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from copy import deepcopy

import torch
from torch import nn

from ..checkpoint import load_model, resolve_checkpoint
from ..core.atomic import check_dir_path, publish, staging_dir
from ..core.devices import resolve_device
from ..core.errors import CheckpointError, ConfigError, DataError, UnknownNameError
from ..core.hashing import file_sha256
from ..core.version import __version__
from ..data.from_config import random_images
from .extracted import ONNX_NAME, ExtractedModel, fold_moe_layers, model_io, save_extracted
from .prune import check_selection, count_params, extract_task_model, select_experts
from .usage import (
    capped_images,
    check_usage_matches,
    count_usage,
    default_splits,
    eval_loader,
    heldout_split,
    load_run_config,
    load_usage,
    routing_coverage,
    usage_report,
)

ONNX_OPSET = 18  # Resize with antialias (the position embedding's bicubic resampling)
ONNX_ATOL = 1e-4
CHECK_IMAGES = 4
HELDOUT_IMAGES = 64

__all__ = ["export_onnx", "extract_model", "kept_experts", "write_extracted"]


# --- ONNX ---------------------------------------------------------------------------------------------------

def onnx_module(extracted: ExtractedModel) -> nn.Module:
    """A copy of `extracted` for export. Remaining MoE layers switch to their static-shape path (every kept expert on
    every token, weighted by the top-k gates) by themselves while tracing (`modsquad.moe.routers.is_exporting`);
    `task_level` layers must have been folded first."""
    extracted = deepcopy(extracted).eval()
    for name, layer in extracted.model.moe_layers():
        if layer.router.fixed_routing:
            raise ValueError(f"{name}: fold layers with fixed routing before exporting (fold_moe_layers)")
    return extracted


def _onnx_sizes(extracted: ExtractedModel, img_size: int | Sequence[int] | None) -> list[tuple[int, int]]:
    """The sizes an export is checked at: the built (or given) size and one that differs in both sides."""
    size = img_size if img_size is not None else extracted.img_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    p = extracted.model.patch_size
    return [(h, w), (h + 2 * p, w + p)]


def _name_dims(path: str | os.PathLike, extracted: ExtractedModel) -> None:
    """Input [batch, C, height, width]; output [batch, C, height, width] (dense) or [batch, classes], with the
    channel / class count concrete, written into the saved ONNX file, plus the io description as metadata."""
    import onnx

    model = onnx.load(str(path))
    names = {0: "batch", 2: "height", 3: "width"}
    channels = {1: extracted.model.in_chans}
    for value, fixed in ((model.graph.input[0], channels), (model.graph.output[0], {1: extracted.spec.channels})):
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if i in fixed:
                dim.dim_value = fixed[i]
            elif i in names:
                dim.dim_param = names[i]
    io = model_io(extracted)
    pre, out = io["preprocessing"], io["output"]
    props = {"modsquad.preprocessing": json.dumps(pre), "modsquad.output": json.dumps(out),
             "modsquad.version": __version__, "task": extracted.task, "kind": out["kind"], "units": out["units"],
             "mean": json.dumps(pre["mean"]), "std": json.dumps(pre["std"]), "channel_order": pre["channel_order"],
             "value_range": json.dumps(pre["value_range"]), "input_size": json.dumps(pre["input_size"]),
             "patch_size": str(pre["patch_size"])}
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))


def export_onnx(extracted: ExtractedModel, path: str | os.PathLike, img_size: int | Sequence[int] | None = None,
                opset: int = ONNX_OPSET, batch_sizes: Sequence[int] = (1, 3), atol: float = ONNX_ATOL) -> dict:
    """Export `extracted` to ONNX with dynamic batch, height and width and check it against PyTorch with onnxruntime.

    Input "images" [batch, 3, height, width] (height and width any multiples of the patch size; the position
    embedding is resampled inside the graph), output "prediction" [batch, C, height, width] (dense) or [batch,
    classes]. The file's metadata_props hold the preprocessing and the output's meaning (`model_io`). Checked
    (CPU) at two sizes (the built one and one differing in both sides) and `batch_sizes`. Returns {"file",
    "opset", "max_abs_diff", "batch_sizes", "sizes"}; RuntimeError if onnxruntime disagrees with PyTorch by more
    than `atol`.
    """
    import logging
    import warnings

    import onnxruntime as ort

    sizes = _onnx_sizes(extracted, img_size)
    p = extracted.model.patch_size
    module = onnx_module(extracted).cpu().float()
    reference = deepcopy(extracted).cpu().float().eval()
    in_chans = extracted.model.in_chans
    gen = torch.Generator().manual_seed(0)
    (h, w), example = sizes[0], sizes[1]
    grid = torch.export.Dim("grid_h", min=1, max=1024), torch.export.Dim("grid_w", min=1, max=1024)
    dynamic = {"images": {0: torch.export.Dim("batch", min=1, max=4096), 2: p * grid[0], 3: p * grid[1]}}
    loggers = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter chatter about shape guards we do not depend on
            program = torch.onnx.export(module, (torch.randn(2, in_chans, *example, generator=gen),), dynamo=True,
                                        input_names=["images"], output_names=["prediction"], opset_version=opset,
                                        dynamic_shapes=dynamic, verbose=False)
            program.save(str(path))
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    _name_dims(path, extracted)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = 0.0
    checks = [(b, h, w) for b in batch_sizes] + [(2, *size) for size in sizes[1:]]
    for b, hh, ww in checks:
        x = torch.randn(b, in_chans, hh, ww, generator=gen)
        with torch.no_grad():
            expected = reference(x)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        if got.shape != expected.shape:
            raise RuntimeError(f"ONNX output shape {tuple(got.shape)} != PyTorch {tuple(expected.shape)} at "
                               f"input {b}x{in_chans}x{hh}x{ww}")
        diff = max(diff, (got - expected).abs().max().item())
    if not diff <= atol:
        raise RuntimeError(f"ONNX export of {extracted.task!r} differs from PyTorch by {diff:.3g} (> {atol})")
    return {"file": ONNX_NAME, "opset": opset, "max_abs_diff": diff, "batch_sizes": list(batch_sizes),
            "sizes": [list(s) for s in sizes], "dynamic_axes": ["batch", "height", "width"]}


# --- extraction ---------------------------------------------------------------------------------------------

def kept_experts(model: nn.Module, task: str, counts: Mapping[str, Sequence[int]], threshold: float | None = None,
                 mass: float | None = None) -> dict[str, list[int]]:
    """{layer: kept expert ids} for one task: from usage for token-routed layers; for `task_level` layers
    exactly the k experts its fixed routing uses (those are folded, so usage does not matter)."""
    t = model.task_index(task)
    top_k = {name: layer.top_k for name, layer in model.moe_layers()}
    kept = select_experts(counts, top_k, threshold, mass)
    for name, layer in model.moe_layers():
        if layer.router.fixed_routing:
            kept[name] = sorted(layer.router.fixed_choice(t)[0].tolist())
    return kept


def extract_model(model: nn.Module, task: str, counts: Mapping[str, Sequence[int]],
                  threshold: float | None = None, mass: float | None = None) -> ExtractedModel:
    """The extracted model of one task, in memory (no files): kept experts from `counts` ({layer: [E]}), sliced
    out of `model`, `task_level` layers folded. `extracted.info` holds the architecture and the kept experts."""
    kept = kept_experts(model, task, counts, threshold, mass)
    task_model = extract_task_model(model, task, kept)
    config = deepcopy(task_model.config)
    folded = fold_moe_layers(task_model)
    return ExtractedModel(task_model, {"model_config": config, "folded": bool(folded), "folded_layers": folded,
                                       "kept": kept}).eval()


def _first_images(loader, n: int) -> torch.Tensor | None:
    """Up to n images [<=n, 3, H, W] from the first batches of `loader` (None without a loader or images)."""
    parts = list(capped_images(loader, n)) if loader is not None else []
    return torch.cat(parts) if parts else None


def write_extracted(checkpoint: str | os.PathLike, out: str | os.PathLike, *, tasks: Sequence[str] | None = None,
                    threshold: float | None = None, mass: float | None = None,
                    usage: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
                    data_format: str | None = None, split: str | None = None, max_images: int | None = None,
                    batch_size: int | None = None, workers: int = 0, onnx: bool = False,
                    check_images: int = CHECK_IMAGES, heldout_images: int = HELDOUT_IMAGES,
                    device: str = "auto") -> dict[str, dict]:
    """Extract every task of `tasks` (default: all) of a checkpoint and write each extracted model to
    `out/<task>/` (what `modsquad extract` does); returns {task: summary of what was written}.

    Usage: `usage` (a usage.json from `modsquad usage`), else counted on `data` or the run's training split
    (`split` picks another). Selection: default keeps every expert the task selected at least once; `threshold`
    in [0, 1) keeps experts whose usage share exceeds it, `mass` in (0, 1] the fewest carrying that mass.

    What is exact, as measured: on the images usage was counted on, keeping every used expert reproduces the
    full model to float rounding (`counted.max_abs_diff`). On other images a token may pick an expert that was
    never picked while counting, so each summary also holds `heldout`: on up to `heldout_images` images of a
    held-out split (val when usage is counted on train), the routing coverage (share of the full model's top-k
    choices inside the kept experts; 1.0 means routed exactly as the full model) and the max |diff| on
    `check_images` of them. `max_abs_diff` itself is measured on `check_images` of the counting images (held-out
    ones when usage came from a file and no data is at hand, random ones without any data; `check_images` says
    which). A summary also holds the kept experts per layer, parameter counts and the ONNX check.
    """
    check_selection(threshold, mass)
    for name, value in (("check_images", check_images), ("heldout_images", heldout_images),
                        ("max_images", max_images), ("batch_size", batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"extract: {name} must be at least 1, got {value}")
    out = check_dir_path(out, "--out")
    path = resolve_checkpoint(checkpoint)
    model = load_model(path).to(resolve_device(device))
    tasks = list(dict.fromkeys(tasks)) if tasks else list(model.tasks)
    for task in tasks:
        if task not in model.tasks:
            raise UnknownNameError(f"checkpoint {path} has no task {task!r}; its tasks: {', '.join(model.tasks)}")
    checkpoint_sha = file_sha256(path)
    cfg = load_run_config(path)
    has_data = data is not None or cfg is not None
    loader_kw = {"data": data, "data_format": data_format, "workers": workers}

    counting = None
    if usage is not None:
        report = load_usage(usage)
        check_usage_matches(report, model, source=str(usage))
        if report.get("checkpoint_sha256") not in ("", None, checkpoint_sha):
            raise CheckpointError(f"{usage}: counted on another checkpoint ({report.get('checkpoint')}); "
                                  f"run `modsquad usage {checkpoint}` again")
    elif not model.moe_layers():  # a dense model: nothing to select, the encoder is kept whole
        report = usage_report(model, {t: {} for t in model.tasks})
    else:
        counting, source = eval_loader(model, path, split=split, max_images=max_images, batch_size=batch_size,
                                       **loader_kw)
        counts, source["images"] = count_usage(model, counting, max_images)
        report = usage_report(model, counts, checkpoint=str(path), checkpoint_sha256=checkpoint_sha, data=source)
    counted_split = (report.get("data") or {}).get("split") or (split or default_splits(cfg)[0])

    if counting is None and has_data and model.moe_layers():  # usage from a file: its split, for the check
        try:
            counting, _ = eval_loader(model, path, split=counted_split, max_images=check_images,
                                      batch_size=batch_size, **loader_kw)
        except DataError:
            counting = None
    heldout, heldout_name = None, None
    if has_data:
        heldout_name = heldout_split(counted_split, cfg)
        try:
            heldout, _ = eval_loader(model, path, split=heldout_name, max_images=heldout_images,
                                     batch_size=batch_size, **loader_kw)
        except DataError as e:  # e.g. a data set without that split: say so instead of claiming coverage
            heldout, heldout_name = None, f"{heldout_name} (unavailable: {e})"
    device_ = next(model.parameters()).device
    # max_abs_diff: on images usage was counted on (where keeping every used expert is exact), else held-out
    # or, without data, random images; the held-out difference is reported beside the coverage
    counted_imgs = _first_images(counting, check_images)
    held_imgs = _first_images(heldout, check_images)
    if counted_imgs is not None:
        check, check_kind = counted_imgs, f"{counted_split} images usage was counted on"
    elif held_imgs is not None:
        check, check_kind = held_imgs, f"held-out {heldout_name} images"
    else:
        check = random_images(check_images, model.config["img_size"], model.in_chans)
        check_kind = "random images (no data given)"
    with torch.no_grad():
        full_out = model(check.to(device_), tasks=tasks)
        held_full = model(held_imgs.to(device_), tasks=tasks) if held_imgs is not None else None
    full_params = count_params(model)
    selection = {"mode": "mass" if mass is not None else "threshold" if threshold is not None else "used",
                 "threshold": threshold, "mass": mass,
                 "usage": str(usage) if usage is not None else report.get("data", {}),
                 "counted_split": counted_split}
    layer_meta = {d["name"]: d for d in report["layers"]}

    extracted_models = {task: extract_model(model, task, report["counts"][task], threshold, mass) for task in tasks}
    coverage, covered_images = {}, 0
    if heldout is not None:
        kept_by_task = {t: extracted.info["kept"] for t, extracted in extracted_models.items()}
        coverage, covered_images = routing_coverage(model, heldout, kept_by_task, heldout_images)

    results = {}
    with staging_dir(out) as staged:
        for task, extracted in extracted_models.items():
            kept, folded = extracted.info["kept"], extracted.info["folded_layers"]
            with torch.no_grad():
                diff = (extracted(check.to(device_)) - full_out[task]).abs().max().item()
                held_diff = ((extracted(held_imgs.to(device_)) - held_full[task]).abs().max().item()
                             if held_imgs is not None else None)
            cov = coverage.get(task, {})
            held = {"split": heldout_name, "images": covered_images, "coverage": cov.get("coverage"),
                    "tokens_covered": cov.get("tokens_covered"), "per_layer": cov.get("per_layer", {}),
                    "max_abs_diff": held_diff, "diff_images": int(held_imgs.shape[0]) if held_imgs is not None else 0}
            info = {
                "model_config": extracted.info["model_config"],
                "folded": bool(folded),
                "folded_layers": folded,
                "layers": {name: {**{k: layer_meta[name][k] for k in ("kind", "num_experts", "top_k", "router")},
                                  "kept": ids} for name, ids in kept.items()},
                "selection": selection,
                "source": {"checkpoint": str(path), "sha256": checkpoint_sha, "model": model.config.get("name"),
                           "tasks": list(model.tasks)},
                "params": {"extracted": count_params(extracted), "full": full_params},
                "max_abs_diff": diff,
                "check_images": {"count": int(check.shape[0]), "kind": check_kind},
                "counted": {"split": counted_split,
                            "max_abs_diff": diff if counted_imgs is not None else None,
                            "images": int(counted_imgs.shape[0]) if counted_imgs is not None else 0},
                "heldout": held,
            }
            task_dir = staged / task
            if onnx:
                task_dir.mkdir(parents=True)
                info["onnx"] = export_onnx(extracted, task_dir / ONNX_NAME)
            save_extracted(extracted, task_dir, info)
            results[task] = {"dir": str(out / task), "kept": kept, "params": info["params"], "max_abs_diff": diff,
                             "folded": bool(folded), "onnx": info.get("onnx"), "check_images": info["check_images"],
                             "counted": info["counted"], "heldout": held,
                             "experts_total": sum(d["num_experts"] for d in report["layers"])}
        publish(staged, out, tasks)
    return results
