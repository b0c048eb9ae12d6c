"""Typed, strict run configs: dataclasses -> omegaconf structured config, loaded from YAML files.

Configs ship inside the package (modsquad/configs/*.yaml) and resolve by name: `load_config("synthetic_tiny")`
is that file, `list_configs()` lists them with their descriptions; a path to any YAML file works as well.
A config file lists only what differs from the defaults below (or from its `base:` file, a path or list of
paths resolved relative to the file, or a packaged config's name), and `--set a.b=c` overrides are applied last (values parsed as YAML:
`--set model.tasks=[normal,reshading]`, `--set train.clip_grad=null`). Every key is checked against the
schema: a misspelt key, a wrong type or a bad choice is a `ConfigError` naming the key and the file.

    cfg = load_config("synthetic_tiny", ["train.epochs=2"])  # or a path: load_config("my.yaml")
    cfg.train.lr, cfg.model.tasks           # attribute access, typed
    save_config(cfg, "runs/x/config.yaml")  # resolved YAML; load_config reads it back
"""

from __future__ import annotations

import difflib
import inspect
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .core.errors import ConfigError, UnknownNameError
from .models.registry import MODEL_ARGS, list_models
from .tasks.losses import TASK_LOSSES
from .tasks.registry import get_task
from .tasks.weighting import WEIGHTINGS


@dataclass
class ModelConfig:
    """Which network: a preset of `models/registry.py` plus keyword overrides of that preset."""

    name: str = "modsquad_vit_tiny"
    tasks: list[str] = field(default_factory=list)
    img_size: int = 224
    #: preset kwargs, e.g. {router: shared, mlp_experts: 8, top_k: 2, head: conv}; checked by the preset.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class SynthConfig:
    """The procedural dataset rendered when data.format is synthetic and data.root is missing/empty."""

    images: int = 64
    size: int = 64
    seed: int = 0


@dataclass
class DataConfig:
    format: str = "synthetic"  # synthetic | taskonomy | pascal_context
    root: str | None = None
    split_set: str = "tiny"  # Taskonomy building split table: tiny | medium | full | fullplus
    train_split: str = "train"
    val_split: str = "val"
    max_images: int | None = None  # cap on training images (low-resource / few-shot runs); None = all
    resize: int | None = None  # shorter side before the random/centre crop of model.img_size (None = none)
    hflip: bool = True
    workers: int = 2
    batch_size: int = 8
    synth: SynthConfig = field(default_factory=SynthConfig)
    on_error: str = "raise"  # raise | skip (unreadable samples)
    #: PASCAL-Context: where normals count: benchmark (the 170 Context ids of the benchmark) | all | a file of ids
    normals_valid_classes: str = "benchmark"


@dataclass
class TrainConfig:
    """Optimisation. `steps > 0` wins over `epochs`; lr is absolute unless lr_scale_batch (lr x batch / 256)."""

    epochs: int = 10
    steps: int = 0
    lr: float = 4e-4
    lr_scale_batch: bool = False
    weight_decay: float = 0.05
    adam_eps: float = 1e-8  # AdamW epsilon (the official Mod-Squad recipe uses 1e-4)
    warmup_steps: int = 0
    warmup_epochs: float = 0.0  # used when warmup_steps == 0
    min_lr: float = 1e-6
    clip_grad: float | None = None
    amp: str = "none"  # none | bf16
    compile: bool = False  # torch.compile the training forward (the first steps are slower while it compiles)
    accum_steps: int = 1
    seed: int = 0
    log_every: int = 10  # steps
    eval_every: int = 0  # steps between evaluations; 0 = after every epoch
    weighting: str = "equal"  # equal | uncertainty | uncertainty_official | dwa (tasks/weighting.py)
    weighting_kwargs: dict[str, Any] = field(default_factory=dict)
    task_losses: dict[str, str] = field(default_factory=dict)  # task -> loss name replacing the task's default
    loss_clamp: float | None = None  # clamp the total loss to +-this (official Mod-Squad: 1000); null = off
    drop_path: float | None = None  # null: the model preset's own drop_path_rate
    init_from: str | None = None  # dense timm ViT to upcycle: a file, timm:MODEL.TAG or hf-hub:REPO (models/upcycle.py)
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class AuxConfig:
    """Weights of the router auxiliary losses (0 disables one)."""

    mi: float = 0.0  # mutual information task<->expert (Mod-Squad: 0.005)
    balance: float = 0.0  # switch load balance
    z: float = 0.0  # router z-loss
    task_prior: str = "uniform"  # P(task) in the MI loss: uniform | tokens | official (token share, official 1e-4s)


@dataclass
class EvalConfig:
    split: str = "val"
    batch_size: int | None = None  # None = data.batch_size
    max_images: int | None = None  # cap on validation images (evenly spread); None = all
    baseline: str | None = None  # run dir or metrics.json of a multi-task baseline, for delta_m
    task_baselines: dict[str, str] = field(default_factory=dict)  # task -> single-task run dir / metrics.json
    edge_tolerance_px: float | None = None  # None = 0.0075 x image diagonal (SEISM maxDist)


@dataclass
class OutputConfig:
    dir: str | None = None  # None = runs/<name>
    save_every: int = 1  # epochs between checkpoints
    visualize: int = 4  # validation images drawn as prediction grids (0 = none)
    tensorboard: bool = True  # TensorBoard event files in <run>/tb/ beside metrics.jsonl and metrics.csv


@dataclass
class Config:
    name: str = ""  # run name; defaults to the config file's stem
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


BASE_KEY = "base"
#: the packaged configs, resolvable by name (`--config synthetic_tiny`)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CHOICES: dict[str, tuple[str, ...]] = {
    "data.format": ("synthetic", "taskonomy", "pascal_context"),
    "data.on_error": ("raise", "skip"),
    "train.amp": ("none", "bf16"),
    "aux.task_prior": ("uniform", "tokens", "official"),
}


# --- YAML -------------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `4e-4` as a float (YAML 1.1 wants `4.0e-4`)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open() as f:
            raw = yaml.load(f, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    except (UnicodeDecodeError, OSError) as e:  # a binary file, a folder, no permission
        raise ConfigError(f"{path}: not a readable YAML text file ({e.__class__.__name__})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


# --- schema helpers -------------------------------------------------------------------------------------

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_paths(cls: type = Config, prefix: str = "") -> list[str]:
    out = []
    for name, tp in _hints(cls).items():
        out.append(prefix + name)
        if is_dataclass(tp):
            out.extend(_all_paths(tp, f"{prefix}{name}."))
    return out


def _suggest(key: str, candidates: Sequence[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {prefix + close[0]!r}?)"
    elsewhere = [p for p in _all_paths() if p.rsplit(".", 1)[-1] == key]
    return f" (did you mean {elsewhere[0]!r}?)" if elsewhere else ""


def _field_type(path: str) -> Any:
    """The annotation of a dotted schema path (None when the path is inside a free-form dict)."""
    cls: Any = Config
    tp: Any = None
    for part in path.split("."):
        if not is_dataclass(cls):
            return None
        tp = _hints(cls).get(part)
        cls = tp
    return tp


def _type_name(tp: Any) -> str:
    if tp is None:
        return "a value"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _check_keys(raw: Mapping, cls: type, prefix: str, source: str) -> None:
    """Raise ConfigError for the first key of `raw` that is not a field of dataclass `cls` (recursively).
    Empty sections (None) become {} in place."""
    hints = _hints(cls)
    allowed = set(hints) | ({BASE_KEY} if not prefix else set())
    for key, value in raw.items():
        if not isinstance(key, str) or key not in allowed:
            raise ConfigError(f"{source}: unknown key {prefix + str(key)!r}{_suggest(str(key), list(hints), prefix)}")
        tp = hints.get(key)
        if is_dataclass(tp):
            if value is None and isinstance(raw, dict):  # an empty section (`train:`) keeps the defaults
                raw[key] = value = {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {prefix}{key}: expected a section of keys, got {value!r}")
            _check_keys(value, tp, f"{prefix}{key}.", source)
        elif typing.get_origin(tp) is list and not isinstance(value, (list, str)):  # str: interpolation
            raise ConfigError(f"{source}: {prefix}{key}: expected a list, got {value!r}")
        elif typing.get_origin(tp) is dict and not isinstance(value, (Mapping, str)):
            raise ConfigError(f"{source}: {prefix}{key}: expected a mapping, got {value!r}")


def _check_override_key(path: str) -> None:
    cls: Any = Config
    walked = ""
    for part in path.split("."):
        if not is_dataclass(cls):
            return  # inside a free-form dict such as model.overrides
        hints = _hints(cls)
        if part not in hints:
            raise ConfigError(f"--set: unknown key {walked + part!r}{_suggest(part, list(hints), walked)}")
        cls, walked = hints[part], f"{walked}{part}."


# --- loading --------------------------------------------------------------------------------------------

def _load_chain(path: Path, stack: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """[(file, raw dict)] for `path` and its `base:` files, bases first; keys checked per file."""
    path = path.resolve() if path.exists() else path
    if path in stack:
        raise ConfigError(f"{path}: circular 'base' include ({' -> '.join(str(p) for p in (*stack, path))})")
    raw = _read_yaml(path)
    _check_keys(raw, Config, "", str(path))
    bases = raw.pop(BASE_KEY, None) or []
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'base' must be a file path or a list of paths")
    chain: list[tuple[str, dict]] = []
    for base in bases:
        local = path.parent / base
        packaged = CONFIG_DIR / f"{Path(base).name.removesuffix('.yaml')}.yaml"
        if not local.is_file() and len(Path(base).parts) == 1 and packaged.is_file():
            local = packaged  # `base: synthetic_tiny` in a user's own file names the packaged config
        chain.extend(_load_chain(local, (*stack, path)))
    chain.append((str(path), raw))
    return chain


def _merge(cfg: DictConfig, raw: Mapping, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, raw)
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        key = getattr(e, "full_key", None) or "?"
        tp = _field_type(key) if key != "?" else None
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{source}: {key}: expected {_type_name(tp)} ({msg})") from None


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip().removeprefix("--set").strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=2")
    _check_override_key(key)
    try:
        value = yaml.load(text, Loader=_Loader) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    tp = _field_type(key)
    if typing.get_origin(tp) is list and isinstance(value, str):  # --set model.tasks=a,b
        value = [v.strip() for v in value.split(",") if v.strip()]
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _validate(cfg: DictConfig, source: str) -> None:
    """Checks beyond types: choices, known tasks and weightings, ranges, tasks fit the dataset format."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {getattr(e, 'full_key', '') or '?'}: {str(e).splitlines()[0]}") from None

    def fail(key: str, msg: str):
        raise ConfigError(f"{source}: {key}: {msg}")

    for key, options in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in options:
            close = difflib.get_close_matches(str(value), options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            fail(key, f"must be one of {', '.join(options)}; got {value!r}{hint}")
    if cfg.train.weighting not in WEIGHTINGS:
        fail("train.weighting", f"must be one of {', '.join(sorted(WEIGHTINGS))}; got {cfg.train.weighting!r}")
    options = [p for p in inspect.signature(WEIGHTINGS[cfg.train.weighting].__init__).parameters
               if p not in ("self", "tasks")]
    for key in cfg.train.weighting_kwargs:
        if key not in options:
            fail(f"train.weighting_kwargs.{key}", f"not an option of weighting {cfg.train.weighting!r} "
                                                  f"(options: {', '.join(options) or 'none'})")
    patch = cfg.model.overrides.get("patch_size")
    if isinstance(patch, int) and patch > 0 and isinstance(cfg.model.img_size, int) and cfg.model.img_size % patch:
        fail("model.img_size", f"{cfg.model.img_size} is not a multiple of model.overrides.patch_size {patch}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.train.device):
        fail("train.device", f"must be auto, cpu, cuda, cuda:N or mps; got {cfg.train.device!r}")

    presets = list_models()
    if cfg.model.name not in presets:
        close = difflib.get_close_matches(cfg.model.name, presets, n=1)
        fail("model.name", f"unknown model {cfg.model.name!r}" + (f" (did you mean {close[0]!r}?)" if close
                                                                  else f"; known: {', '.join(presets)}"))
    for key in cfg.model.overrides:
        if key in ("tasks", "img_size"):
            fail(f"model.overrides.{key}", f"set model.{key} instead")
        if key not in MODEL_ARGS:
            close = difflib.get_close_matches(str(key), MODEL_ARGS, n=1)
            hint = f" (did you mean 'model.overrides.{close[0]}'?)" if close else ""
            fail(f"model.overrides.{key}", f"not an option of the model{hint}")

    tasks = list(cfg.model.tasks)
    if not tasks:
        fail("model.tasks", "list at least one task")
    if len(set(tasks)) != len(tasks):
        fail("model.tasks", f"duplicate task in {tasks}")
    suite = "pascal_context" if cfg.data.format == "pascal_context" else "taskonomy"
    for task in tasks:
        try:
            spec = get_task(task)
        except UnknownNameError as e:
            fail("model.tasks", str(e))
        if spec.suite != suite:
            fail("model.tasks", f"task {task!r} belongs to the {spec.suite} suite, not data.format "
                                f"{cfg.data.format!r} ({suite} tasks)")

    positive = {"model.img_size": cfg.model.img_size, "data.batch_size": cfg.data.batch_size,
                "train.lr": cfg.train.lr, "train.accum_steps": cfg.train.accum_steps,
                "data.synth.images": cfg.data.synth.images, "data.synth.size": cfg.data.synth.size}
    non_negative = {"train.epochs": cfg.train.epochs, "train.steps": cfg.train.steps,
                    "train.weight_decay": cfg.train.weight_decay, "train.warmup_steps": cfg.train.warmup_steps,
                    "train.warmup_epochs": cfg.train.warmup_epochs, "train.min_lr": cfg.train.min_lr,
                    "train.log_every": cfg.train.log_every, "train.eval_every": cfg.train.eval_every,
                    "data.workers": cfg.data.workers, "aux.mi": cfg.aux.mi, "aux.balance": cfg.aux.balance,
                    "aux.z": cfg.aux.z, "output.save_every": cfg.output.save_every,
                    "output.visualize": cfg.output.visualize}
    for key, value in positive.items():
        if not value > 0:  # `not >` also refuses NaN
            fail(key, f"must be > 0; got {value}")
    for key, value in non_negative.items():
        if not value >= 0:
            fail(key, f"must be >= 0; got {value}")
    if cfg.train.epochs == 0 and cfg.train.steps == 0:
        fail("train.epochs", "set train.epochs or train.steps to more than 0")
    if cfg.train.drop_path is not None and not 0.0 <= cfg.train.drop_path < 1.0:
        fail("train.drop_path", f"must be in [0, 1); got {cfg.train.drop_path}")
    if cfg.train.clip_grad is not None and cfg.train.clip_grad <= 0:
        fail("train.clip_grad", f"must be > 0 or null; got {cfg.train.clip_grad}")
    if cfg.train.loss_clamp is not None and not cfg.train.loss_clamp > 0:
        fail("train.loss_clamp", f"must be > 0 or null; got {cfg.train.loss_clamp}")
    if not cfg.train.adam_eps > 0:
        fail("train.adam_eps", f"must be > 0; got {cfg.train.adam_eps}")
    for task, loss in cfg.train.task_losses.items():
        if task not in tasks:
            fail(f"train.task_losses.{task}", f"not a task of this model ({', '.join(tasks)})")
        if loss not in TASK_LOSSES:
            fail(f"train.task_losses.{task}", f"unknown loss {loss!r}; known: {', '.join(sorted(TASK_LOSSES))}")
    for key in ("data.max_images", "eval.max_images", "eval.batch_size"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            fail(key, f"must be > 0 or null; got {value}")


def default_config() -> DictConfig:
    """The schema's defaults as a structured config (model.tasks still empty)."""
    return OmegaConf.structured(Config)


def config_from_dict(data: Mapping, source: str = "<dict>", overrides: Sequence[str] | None = None) -> DictConfig:
    """Build and validate a config from a plain dict (e.g. the config stored beside a checkpoint)."""
    data = dict(data)
    data.pop(BASE_KEY, None)
    _check_keys(data, Config, "", source)
    cfg = _merge(default_config(), data, source)
    return _apply_overrides(cfg, overrides, source)


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str] | None, source: str) -> DictConfig:
    for item in overrides or ():
        key, value = _parse_override(item)
        cfg = _merge(cfg, _nest(key, value), f"--set {item}")
    _validate(cfg, source if not overrides else f"{source} (with --set)")
    return cfg


def list_configs() -> dict[str, str]:
    """{name: description} of the packaged configs (modsquad/configs/*.yaml), sorted by name."""
    out = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        try:
            raw = _read_yaml(path)
        except ConfigError:
            raw = {}
        out[path.stem] = str(raw.get("description") or "")
    return out


def resolve_config(name_or_path: str | Path) -> Path:
    """The YAML file of a config given by path or by packaged name (`synthetic_tiny`, `synthetic_tiny.yaml`).

    An existing file wins; otherwise a packaged config of that name (also for the old `configs/NAME.yaml`
    paths of a checkout, whose files now live in the package). ConfigError listing the closest names else.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    packaged = CONFIG_DIR / f"{name}.yaml"
    if packaged.is_file() and (len(path.parts) == 1 or path.parent == Path("configs")):
        return packaged
    if path.exists():  # a folder: _read_yaml says what is wrong with it
        return path
    names = list(list_configs())
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
    hint = (f"; did you mean {', '.join(close)}?" if close else "") + " (`modsquad configs` lists the packaged ones)"
    raise ConfigError(f"config {str(name_or_path)!r} not found: neither a file nor a packaged config name{hint}")


def load_config(path: str | Path, overrides: Sequence[str] | None = None) -> DictConfig:
    """Load a YAML config by path or packaged name (following `base:` includes), apply `key=value`
    overrides, validate.

    Raises ConfigError naming the file and key for a missing file (with the closest packaged names), invalid
    YAML, an unknown key (with the closest valid key), a wrong type, or a value outside its choices/range.
    """
    path = resolve_config(path)
    cfg = default_config()
    for source, raw in _load_chain(path):
        cfg = _merge(cfg, raw, source)
    if not cfg.name:
        cfg.name = path.stem
    return _apply_overrides(cfg, overrides, str(path))


def config_to_dict(cfg: DictConfig) -> dict[str, Any]:
    """Plain nested dict with interpolations resolved (for JSON logs and checkpoint metadata)."""
    return OmegaConf.to_container(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (`load_config` reads it back to the same config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def effective_lr(cfg: DictConfig, world_size: int = 1) -> float:
    """train.lr, times (batch x accum_steps x world_size) / 256 when train.lr_scale_batch (paper rule)."""
    if not cfg.train.lr_scale_batch:
        return float(cfg.train.lr)
    batch = cfg.data.batch_size * cfg.train.accum_steps * world_size
    return float(cfg.train.lr) * batch / 256.0


__all__ = ["AuxConfig", "Config", "DataConfig", "EvalConfig", "ModelConfig", "OutputConfig", "SynthConfig",
           "TrainConfig", "config_from_dict", "config_to_dict", "default_config", "effective_lr", "list_configs",
           "load_config", "resolve_config", "save_config"]
