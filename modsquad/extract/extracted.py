"""The extracted model: the one-task module `modsquad.load_extracted` returns, its folder format (save and load)
and folding of fixed routing.

An extracted task lives in a folder of two files (written by `save_extracted`, read by `load_extracted`):

    config.json         format, task, task spec, the single-task `model_config`, whether MoE layers are folded,
                        kept expert ids per layer, source checkpoint hash, sha256 of the weights, measured error,
                        preprocessing and output meaning
    model.safetensors   the weights of that single-task `MultiTaskViT` (after folding)

`load_extracted(dir)` rebuilds the architecture from `model_config` with the same `MultiTaskViT` class, applies the
same folding (shapes only depend on the config) and loads the weights; it needs no other file.

Folding: a router with `fixed_routing` (`task_level`) makes one decision per (task, layer) that does not look at
the tokens, so in eval every token of the task goes through the same k experts with the same weights. Each MoE
layer folds itself (`MoELayer.fold`): a MoE MLP is exactly a dense MLP whose hidden units are the k experts' hidden
units side by side, with each expert's output rows scaled by its weight; a MoA layer is a multi-query attention
with k heads sharing one key/value projection (`FoldedMoEAttention`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin, snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.atomic import atomic_write, ensure_dir
from ..core.errors import CheckpointError, UserError
from ..core.hashing import file_sha256, json_sha256
from ..core.version import __version__
from ..models import build_model_from_config
from ..tasks import TASKS, TaskSpec, register_task
from ..tasks.visualize import output_meaning

EXTRACTED_FORMAT = "modsquad-extracted"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ONNX_NAME = "model.onnx"


def fold_moe_layers(model: nn.Module) -> list[str]:
    """Replace every MoE layer of a one-task model whose router has `fixed_routing` by its dense fold, in place.

    Returns the names of the folded layers. Also used on a freshly built skeleton when loading, where only the
    resulting shapes matter.
    """
    folded = []
    for name, layer in model.moe_layers():
        if not layer.router.fixed_routing:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.fold())
        folded.append(name)
    return folded


class ExtractedModel(nn.Module, ModelHubMixin, library_name="modsquad",
                     tags=["modsquad", "mixture-of-experts", "multi-task", "vision"]):
    """A single-task model: `extracted(images [B, 3, H, W]) -> Tensor` ([B, C, H, W] dense, [B, classes] otherwise).

    Wraps a one-task `MultiTaskViT` (`self.model`), possibly with folded MoE layers. `info` is the extracted
    model's config.json (task spec, kept experts, source checkpoint, preprocessing, output meaning).
    Hugging Face Hub: `extracted.save_pretrained(dir)`, `extracted.push_to_hub("user/name")` and
    `ExtractedModel.from_pretrained("user/name" or dir)` write / read the same two files as `modsquad extract`.
    """

    def __init__(self, model: nn.Module, info: dict | None = None):
        super().__init__()
        if len(model.tasks) != 1:
            raise ValueError(f"an extracted model has one task, got {model.tasks}")
        self.model = model
        self.task = model.tasks[0]
        self.spec = model.task_specs[self.task]
        self.info = dict(info or {})

    @property
    def img_size(self) -> int | tuple[int, int]:
        return self.model.config["img_size"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats, grid = self.model.forward_features(images, [self.task])
        return self.model.heads[self.task](feats[0], grid)

    @property
    def pretrained_cfg(self) -> dict:
        """timm-style input description (see `MultiTaskViT.pretrained_cfg`), for `timm.data.resolve_data_config`."""
        return {**self.model.pretrained_cfg, "task": self.task}

    def extra_repr(self) -> str:
        return f"task={self.task!r}"

    # --- Hugging Face Hub (huggingface_hub.ModelHubMixin) -----------------------------------------------

    def _save_pretrained(self, save_directory: Path) -> None:
        """config.json + model.safetensors, as `modsquad extract` writes them (the mixin adds a README.md)."""
        rewritten = ("format", "version", "task", "task_spec", "weights_sha256", "onnx")  # no model.onnx here
        save_extracted(self, save_directory, {k: v for k, v in self.info.items() if k not in rewritten})

    def generate_model_card(self, *args, **kwargs):
        """The Hub model card (README.md): task, output meaning, preprocessing and how to load it."""
        data = ModelCardData(library_name="modsquad", tags=["modsquad", "mixture-of-experts", "multi-task",
                                                             "vision", self.task])
        out, pre = self.info.get("output", {}), self.info.get("preprocessing", {})
        kept = self.info.get("kept", {})
        lines = [f"# modsquad: {self.task}", "",
                 f"A single-task model extracted from a multi-task mixture-of-experts ViT by `modsquad extract` "
                 f"({sum(map(len, kept.values()))} experts kept over {len(kept)} MoE layers).", "",
                 f"- Output: {out.get('quantity', self.spec.kind)}"
                 + (f" ({out['units']})" if out.get("units") else "") + f", {out.get('layout', '')}",
                 f"- Input: RGB in [0, 1], normalised with mean {pre.get('mean')} and std {pre.get('std')}, "
                 f"[batch, 3, H, W] with H and W multiples of {pre.get('size_multiple')} "
                 f"(trained at {pre.get('input_size')})", "",
                 "```python", "from modsquad.extract.extracted import ExtractedModel", "",
                 "model = ExtractedModel.from_pretrained(REPO_ID)   # model(images) -> prediction", "```", ""]
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, map_location: str | torch.device = "cpu",
                         **kwargs) -> ExtractedModel:
        """A local extracted-model folder, or a Hub repo holding one (only its two files are downloaded)."""
        if Path(model_id).is_dir():
            return load_extracted(model_id, map_location=map_location)
        folder = snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir, token=token,
                                   force_download=force_download, local_files_only=local_files_only,
                                   allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
        return load_extracted(folder, map_location=map_location)


def config_sha256(info: dict) -> str:
    """sha256 of an extracted config.json's content without its `weights_sha256` (canonical JSON), stored in
    model.safetensors' metadata so that an edited config.json (e.g. another top_k) is caught at load time."""
    body = {k: v for k, v in info.items() if k != "weights_sha256"}
    return json_sha256(body)


# --- the folder: save and load -----------------------------------------------------------------------------

def task_spec_dict(spec) -> dict:
    """The JSON-able fields of a TaskSpec (codecs are code, not data, and are not needed to predict)."""
    return {"name": spec.name, "channels": spec.channels, "kind": spec.kind, "loss": spec.loss,
            "metrics": list(spec.metrics), "primary": spec.primary, "suite": spec.suite,
            "description": spec.description}


def preprocessing_dict(extracted: ExtractedModel) -> dict:
    """What the caller must do to an image before `extracted(images)` (and the ONNX model), as plain JSON: RGB,
    NCHW float32, pixel values scaled to [0, 1] and then normalised per channel with `mean` / `std`, at any height
    and width that are multiples of `patch_size` (`input_size` is what it was trained at). Models with
    `input_norm: minus1_1` take the same input and map it to [-1, 1] inside the model."""
    cfg = extracted.pretrained_cfg
    internal = cfg["input_norm"]
    return {"channel_order": "RGB", "layout": "NCHW", "dtype": "float32", "value_range": [0.0, 1.0],
            "mean": list(cfg["mean"]), "std": list(cfg["std"]), "normalize": "(x - mean) / std per channel",
            "input_size": list(cfg["input_size"]), "patch_size": cfg["patch_size"],
            "size_multiple": cfg["patch_size"], "interpolation": cfg["interpolation"],
            "inside_model": ("nothing more" if internal == "imagenet" else
                             "maps the normalised input back to [0, 1] and then to [-1, 1] (input_norm minus1_1)")}


def model_io(extracted: ExtractedModel) -> dict:
    """{"preprocessing": ..., "output": ...}: what goes in (`preprocessing_dict`) and what comes out
    (`modsquad.tasks.visualize.output_meaning`: task, kind, channels, units, value range, class names)."""
    return {"preprocessing": preprocessing_dict(extracted), "output": output_meaning(extracted.spec)}


def save_extracted(extracted: ExtractedModel, out_dir: str | os.PathLike, info: Mapping) -> Path:
    """Write `model.safetensors` and `config.json` (info + task, architecture, preprocessing, output meaning and
    weights hash) into `out_dir`; `extracted.info` becomes that config.json."""
    out_dir = ensure_dir(out_dir)
    weights = out_dir / WEIGHTS_NAME
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in extracted.model.state_dict().items()}
    config = json.loads(json.dumps({"format": EXTRACTED_FORMAT, "version": __version__, "task": extracted.task,
                                    "task_spec": task_spec_dict(extracted.spec), **info,
                                    **model_io(extracted)}))  # as it reads back
    # the weights carry the config's hash and the config the weights' hash: editing either file is caught
    metadata = {"format": EXTRACTED_FORMAT, "task": extracted.task, "config_sha256": config_sha256(config)}
    atomic_write(weights, lambda p: save_file(state, str(p), metadata=metadata))
    config["weights_sha256"] = file_sha256(weights)
    atomic_write(out_dir / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=1)))
    extracted.info = config
    return out_dir


def read_extracted_config(path: str | os.PathLike) -> dict:
    """The config.json of an extracted model directory; CheckpointError if missing or not an extracted model."""
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not path.is_dir():
        raise CheckpointError(f"{path}: extracted model directory not found")
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: not an extracted model (no {CONFIG_NAME}); "
                              f"make one with `modsquad extract`")
    try:
        info = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable ({e})") from None
    if not isinstance(info, dict) or info.get("format") != EXTRACTED_FORMAT:
        raise CheckpointError(f"{cfg_path}: not an extracted modsquad model (format is not {EXTRACTED_FORMAT!r})")
    for key in ("task", "task_spec", "model_config", "folded", "weights_sha256"):
        if key not in info:
            raise CheckpointError(f"{cfg_path}: missing field {key!r}")
    return info


def _ensure_task_registered(spec: dict) -> None:
    """Register the stored task spec when this installation does not know the task (e.g. a custom task)."""
    if spec["name"] in TASKS:
        return
    fields = {k: spec[k] for k in ("name", "channels", "kind", "loss", "primary", "suite", "description") if k in spec}
    register_task(TaskSpec(metrics=tuple(spec.get("metrics", ())), **fields))


def build_extracted(info: dict) -> ExtractedModel:
    """The architecture described by an extracted config.json (weights as initialised, not loaded)."""
    _ensure_task_registered(info["task_spec"])
    model = build_model_from_config(info["model_config"])
    if model.tasks != [info["task"]]:
        raise CheckpointError(f"model_config tasks {model.tasks} do not match task {info['task']!r}")
    if info["folded"]:
        fold_moe_layers(model)
    return ExtractedModel(model, info)


def load_extracted(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ExtractedModel:
    """Load `DIR/<task>` written by `modsquad extract`: an `ExtractedModel` in eval mode, `extracted(images) -> Tensor`.

    Checks that config.json is an extracted model's, that model.safetensors has the recorded sha256 (so a
    truncated or swapped file is caught), that config.json has the sha256 recorded in the weights' metadata (so
    an edited config is caught) and that every weight fits the architecture; CheckpointError otherwise.
    """
    path = Path(path)
    info = read_extracted_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS_NAME}")
    if file_sha256(weights) != info["weights_sha256"]:
        raise CheckpointError(f"{weights}: sha256 does not match {CONFIG_NAME} (corrupt, truncated or replaced)")
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    if metadata.get("format") != EXTRACTED_FORMAT or metadata.get("task") != info["task"]:
        raise CheckpointError(f"{weights}: metadata does not describe task {info['task']!r} of an extracted model")
    if "config_sha256" in metadata and metadata["config_sha256"] != config_sha256(info):  # older models lack it
        raise CheckpointError(f"{path / CONFIG_NAME}: edited after extraction (its sha256 does not match the one "
                              f"in {WEIGHTS_NAME}); extract the task again")
    try:
        extracted = build_extracted(info)
    except CheckpointError:
        raise
    except (UserError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: model_config cannot be built: {e}") from None
    expected = {k: tuple(v.shape) for k, v in extracted.model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        wrong = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        raise CheckpointError(f"{weights}: weights do not match the architecture in {CONFIG_NAME} "
                              f"({len(wrong)} tensor(s) missing, unexpected or misshapen, e.g. {wrong[0]!r})")
    extracted.model.load_state_dict(state, strict=True)
    return extracted.to(map_location).eval()
