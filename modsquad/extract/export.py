"""`modsquad extract`: per-task standalone models from a multi-task checkpoint, written to disk, optionally ONNX.

    results = extract("runs/x", "out/extracted", tasks=["depth_euclidean"], threshold=None, onnx=True)

For each task: keep per MoE layer the experts chosen by `modsquad.extract.prune.select_experts` from expert usage
(counted on the run's validation data, another data set, or read from a usage.json), slice them out
(`extract_task`), fold `task_level` layers into dense ones, measure the largest difference to the full model on a
few validation images, and write `OUT/<task>/{model.safetensors, config.json[, model.onnx]}`. Everything is
written into a temporary directory next to OUT first and renamed into place only once every task succeeded, so
an error never leaves a half-written task directory behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, UnknownNameError
from ..moe import TaskLevelRouter
from .prune import check_selection, count_params, extract_task, select_experts
from .standalone import (
    CONFIG_NAME,
    EXTRACTED_FORMAT,
    ONNX_NAME,
    WEIGHTS_NAME,
    ExtractedModel,
    file_sha256,
    fixed_routing,
    fold_moe_layers,
)
from .usage import check_usage_matches, count_usage, eval_loader, load_usage, run_config_path, usage_report

ONNX_OPSET = 17
ONNX_ATOL = 1e-4
CHECK_IMAGES = 4


# --- saving -------------------------------------------------------------------------------------------------

def task_spec_dict(spec) -> dict:
    """The JSON-able fields of a TaskSpec (codecs are code, not data, and are not needed to predict)."""
    return {"name": spec.name, "channels": spec.channels, "kind": spec.kind, "loss": spec.loss,
            "metrics": list(spec.metrics), "primary": spec.primary, "suite": spec.suite,
            "description": spec.description}


def save_extracted(sub: ExtractedModel, out_dir: str | os.PathLike, info: Mapping) -> Path:
    """Write `model.safetensors` and `config.json` (info + task, architecture and weights hash) into `out_dir`."""
    from safetensors.torch import save_file

    from .. import __version__

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_NAME
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in sub.model.state_dict().items()}
    save_file(state, str(weights), metadata={"format": EXTRACTED_FORMAT, "task": sub.task})
    config = {"format": EXTRACTED_FORMAT, "version": __version__, "task": sub.task,
              "task_spec": task_spec_dict(sub.spec), **info, "weights_sha256": file_sha256(weights)}
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    sub.info = config
    return out_dir


@contextmanager
def staging_dir(out: Path):
    """A fresh temporary directory next to `out` (same file system, so renames are atomic), removed at exit."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(staged: Path, out: Path, names: Sequence[str]) -> None:
    """Move `staged/<name>` to `out/<name>` for every name, replacing an older one only once the new one is in."""
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = out / name
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=out))
            os.replace(target, old / name)
        os.replace(staged / name, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --- ONNX ---------------------------------------------------------------------------------------------------

def onnx_module(sub: ExtractedModel) -> nn.Module:
    """A copy of `sub` for export. Remaining MoE layers switch to their static-shape path (every kept expert on
    every token, weighted by the top-k gates) by themselves while tracing (`modsquad.moe.routers.is_exporting`);
    `task_level` layers must have been folded first."""
    sub = deepcopy(sub).eval()
    for name, layer in sub.model.moe_layers():
        if isinstance(layer.router, TaskLevelRouter):
            raise ValueError(f"{name}: fold task_level layers before exporting (fold_moe_layers)")
    return sub


def export_onnx(sub: ExtractedModel, path: str | os.PathLike, img_size: int | Sequence[int] | None = None,
                opset: int = ONNX_OPSET, batch_sizes: Sequence[int] = (1, 3), atol: float = ONNX_ATOL) -> dict:
    """Export `sub` to ONNX with a dynamic batch axis and check it against PyTorch with onnxruntime (CPU).

    Inputs "images" [batch, 3, H, W] at the model's img_size, output "prediction". Returns {"file", "opset",
    "max_abs_diff", "batch_sizes"}; RuntimeError if onnxruntime disagrees with PyTorch by more than `atol`.
    """
    import warnings

    import onnxruntime as ort

    img_size = img_size if img_size is not None else sub.img_size
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    module = onnx_module(sub).cpu().float()
    reference = deepcopy(sub).cpu().float().eval()
    in_chans = sub.model.in_chans
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / deprecation warnings about shape asserts we do not depend on
        torch.onnx.export(module, (torch.randn(2, in_chans, h, w, generator=gen),), str(path), dynamo=False,
                          input_names=["images"], output_names=["prediction"], opset_version=opset,
                          dynamic_axes={"images": {0: "batch"}, "prediction": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = 0.0
    for b in batch_sizes:
        x = torch.randn(b, in_chans, h, w, generator=gen)
        with torch.no_grad():
            expected = reference(x)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        if got.shape != expected.shape:
            raise RuntimeError(f"ONNX output shape {tuple(got.shape)} != PyTorch {tuple(expected.shape)} at batch {b}")
        diff = max(diff, (got - expected).abs().max().item())
    if not diff <= atol:
        raise RuntimeError(f"ONNX export of {sub.task!r} differs from PyTorch by {diff:.3g} (> {atol})")
    return {"file": ONNX_NAME, "opset": opset, "max_abs_diff": diff, "batch_sizes": list(batch_sizes)}


# --- extraction ---------------------------------------------------------------------------------------------

def kept_experts(model: nn.Module, task: str, counts: Mapping[str, Sequence[int]], threshold: float | None = None,
                 mass: float | None = None) -> dict[str, list[int]]:
    """{layer: kept expert ids} for one task: from usage for token-routed layers; for `task_level` layers
    exactly the k experts its fixed routing uses (those are folded, so usage does not matter)."""
    t = model.task_index(task)
    top_k = {name: layer.top_k for name, layer in model.moe_layers()}
    kept = select_experts(counts, top_k, threshold, mass)
    for name, layer in model.moe_layers():
        if isinstance(layer.router, TaskLevelRouter):
            kept[name] = sorted(fixed_routing(layer, t)[0].tolist())
    return kept


def extract_standalone(model: nn.Module, task: str, counts: Mapping[str, Sequence[int]],
                       threshold: float | None = None, mass: float | None = None) -> ExtractedModel:
    """The in-memory standalone model of one task (no files): kept experts from `counts` ({layer: [E]}), sliced
    out of `model`, `task_level` layers folded. `sub.info` holds the architecture and the kept experts."""
    kept = kept_experts(model, task, counts, threshold, mass)
    sub_model = extract_task(model, task, kept)
    config = deepcopy(sub_model.config)
    folded = fold_moe_layers(sub_model)
    return ExtractedModel(sub_model, {"model_config": config, "folded": bool(folded), "folded_layers": folded,
                                      "kept": kept}).eval()


def _check_images(model: nn.Module, loader, n: int) -> tuple[torch.Tensor, str]:
    """Up to n images from the first batches of `loader`, else n seeded random ones."""
    from .usage import batch_images

    if loader is not None:
        parts, have = [], 0
        for batch in loader:
            images = batch_images(batch)[:n - have]
            parts.append(images)
            have += images.shape[0]
            if have >= n:
                break
        if have:
            return torch.cat(parts), "validation images"
    size = model.config["img_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, model.in_chans, h, w, generator=gen), "random images (no data given)"


def extract(checkpoint: str | os.PathLike, out: str | os.PathLike, *, tasks: Sequence[str] | None = None,
            threshold: float | None = None, mass: float | None = None, usage: str | os.PathLike | None = None,
            data: str | os.PathLike | None = None, data_format: str | None = None, split: str | None = None,
            max_images: int | None = None, batch_size: int | None = None, workers: int = 0,
            onnx: bool = False, check_images: int = CHECK_IMAGES, device: str = "auto") -> dict[str, dict]:
    """Extract every task of `tasks` (default: all) of a checkpoint into `out/<task>/`; returns {task: summary}.

    Usage: `usage` (a usage.json from `modsquad usage`), else counted on `data` or the run's validation split.
    Selection: default keeps every expert the task selected at least once (exact on that data); `threshold` in
    [0, 1) keeps experts whose usage share exceeds it, `mass` in (0, 1] the fewest carrying that routing mass.
    A summary holds the kept experts per layer, parameter counts, the maximum absolute difference to the full
    model measured on `check_images` images, and the ONNX check when `onnx`.
    """
    from ..engine.checkpoint import load_model, resolve_checkpoint
    from ..engine.distributed import resolve_device

    check_selection(threshold, mass)
    out = Path(out)
    path = resolve_checkpoint(checkpoint)
    model = load_model(path).to(resolve_device(device))
    tasks = list(dict.fromkeys(tasks)) if tasks else list(model.tasks)
    for task in tasks:
        if task not in model.tasks:
            raise UnknownNameError(f"checkpoint {path} has no task {task!r}; its tasks: {', '.join(model.tasks)}")
    checkpoint_sha = file_sha256(path)

    loader = None
    if usage is not None:
        report = load_usage(usage)
        check_usage_matches(report, model, source=str(usage))
        if report.get("checkpoint_sha256") not in ("", None, checkpoint_sha):
            raise CheckpointError(f"{usage}: counted on another checkpoint ({report.get('checkpoint')}); "
                                  f"run `modsquad usage {checkpoint}` again")
    elif not model.moe_layers():  # a dense model: nothing to select, the encoder is kept whole
        report = usage_report(model, {t: {} for t in model.tasks})
    else:
        loader, source = eval_loader(model, path, data=data, data_format=data_format, split=split,
                                     max_images=max_images, batch_size=batch_size, workers=workers)
        counts, source["images"] = count_usage(model, loader, max_images)
        report = usage_report(model, counts, checkpoint=str(path), checkpoint_sha256=checkpoint_sha, data=source)
    if loader is None and (data is not None or run_config_path(path).is_file()):
        loader, _ = eval_loader(model, path, data=data, data_format=data_format, split=split,
                                max_images=check_images, batch_size=check_images)
    images, images_kind = _check_images(model, loader, check_images)
    device_ = next(model.parameters()).device
    images = images.to(device_)
    with torch.no_grad():
        full_out = model(images, tasks=tasks)
    full_params = count_params(model)
    selection = {"mode": "mass" if mass is not None else "threshold" if threshold is not None else "used",
                 "threshold": threshold, "mass": mass,
                 "usage": str(usage) if usage is not None else report.get("data", {})}
    layer_meta = {d["name"]: d for d in report["layers"]}

    results = {}
    with staging_dir(out) as staged:
        for task in tasks:
            sub = extract_standalone(model, task, report["counts"][task], threshold, mass)
            kept, folded = sub.info["kept"], sub.info["folded_layers"]
            with torch.no_grad():
                diff = (sub(images) - full_out[task]).abs().max().item()
            info = {
                "model_config": sub.info["model_config"],
                "folded": bool(folded),
                "folded_layers": folded,
                "layers": {name: {**{k: layer_meta[name][k] for k in ("kind", "num_experts", "top_k", "router")},
                                  "kept": ids} for name, ids in kept.items()},
                "selection": selection,
                "source": {"checkpoint": str(path), "sha256": checkpoint_sha, "model": model.config.get("name"),
                           "tasks": list(model.tasks)},
                "params": {"extracted": count_params(sub), "full": full_params},
                "max_abs_diff": diff,
                "check_images": {"count": int(images.shape[0]), "kind": images_kind},
            }
            task_dir = staged / task
            if onnx:
                task_dir.mkdir(parents=True)
                info["onnx"] = export_onnx(sub, task_dir / ONNX_NAME)
            save_extracted(sub, task_dir, info)
            results[task] = {"dir": str(out / task), "kept": kept, "params": info["params"], "max_abs_diff": diff,
                             "folded": bool(folded), "onnx": info.get("onnx"), "check_images": info["check_images"],
                             "experts_total": sum(d["num_experts"] for d in report["layers"])}
        publish(staged, out, tasks)
    return results
