import pytest
import yaml

from modsquad.config import (
    CONFIG_DIR,
    config_from_dict,
    config_to_dict,
    effective_lr,
    list_configs,
    load_config,
    resolve_config,
    save_config,
)
from modsquad.core.errors import ConfigError

CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
SUITES = ("synthetic_tiny", "taskonomy_vit_s", "pascal_context_vit_s")


def _write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASIC = """
model: {name: modsquad_vit_tiny, tasks: [depth_euclidean, normal], img_size: 32}
train: {epochs: 1}
"""


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.model.tasks and cfg.name == path.stem


@pytest.mark.parametrize("suite", SUITES)
def test_every_suite_has_its_baselines(suite):
    names = {p.stem for p in CONFIGS}
    for variant in ("", "_dense", "_shared", "_task_conditioned", "_task_level"):
        assert suite + variant in names


def test_variants_inherit_from_base():
    base, shared = load_config(CONFIGS[0].parent / "taskonomy_vit_s.yaml"), None
    shared = load_config(CONFIGS[0].parent / "taskonomy_vit_s_shared.yaml")
    assert shared.model.overrides.router == "shared" and list(shared.model.tasks) == list(base.model.tasks)
    assert shared.train.lr == base.train.lr == 6e-4 and shared.train.weighting == "uncertainty_official"
    assert shared.train.adam_eps == base.train.adam_eps == 1e-4 and shared.train.loss_clamp == 1000
    dense = load_config(CONFIGS[0].parent / "synthetic_tiny_dense.yaml")
    assert dense.model.name == "dense_vit_tiny" and dense.aux.mi == 0.0


def test_paper_settings():
    cfg = load_config(CONFIGS[0].parent / "taskonomy_vit_s.yaml")
    assert (cfg.model.img_size, cfg.data.resize, cfg.train.weight_decay, cfg.train.drop_path, cfg.aux.mi) == \
        (224, 256, 0.05, 0.1, 0.005)
    assert cfg.train.lr_scale_batch and cfg.train.weighting == "uncertainty_official" and len(cfg.model.tasks) == 13


def test_typo_names_key_file_and_suggestion(tmp_path):
    path = _write(tmp_path, BASIC + "\n" + "optim: 1\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*'optim'"):
        load_config(path)
    path = _write(tmp_path, BASIC.replace("epochs: 1", "epochs: 1, lrr: 0.1"))
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown key 'train\.lrr' \(did you mean 'train\.lr'\?\)"):
        load_config(path)
    path = _write(tmp_path, BASIC.replace("epochs: 1", "epochs: 1, batch_size: 4"))
    with pytest.raises(ConfigError, match=r"'train\.batch_size' \(did you mean 'data\.batch_size'\?\)"):
        load_config(path)
    path = _write(tmp_path, BASIC + "trian: {epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"'trian' \(did you mean 'train'\?\)"):
        load_config(path)


def test_typo_in_base_file_names_the_base(tmp_path):
    _write(tmp_path, BASIC + "data: {batchsize: 2}\n", "base.yaml")
    path = _write(tmp_path, "base: base.yaml\ntrain: {epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key 'data\.batchsize'.*data\.batch_size"):
        load_config(path)


def test_wrong_type_names_the_field(tmp_path):
    path = _write(tmp_path, BASIC.replace("epochs: 1", "epochs: many"))
    with pytest.raises(ConfigError, match=r"run\.yaml: train\.epochs: expected int"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"train\.lr: expected float"):
        load_config(_write(tmp_path, BASIC), ["train.lr=fast"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, "model: [unclosed\n"))


def test_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(_write(tmp_path, BASIC), ["train.epochs=3", "model.tasks=[normal,reshading]",
                                                "train.clip_grad=1.5", "train.lr=1e-3", "data.root=null",
                                                "model.overrides.router=shared", "train.weighting=dwa"])
    assert cfg.train.epochs == 3 and list(cfg.model.tasks) == ["normal", "reshading"]
    assert cfg.train.clip_grad == 1.5 and cfg.train.lr == 1e-3 and cfg.data.root is None
    assert cfg.model.overrides.router == "shared" and cfg.train.weighting == "dwa"
    cfg = load_config(_write(tmp_path, BASIC), ["model.tasks=normal,reshading"])  # comma list for list fields
    assert list(cfg.model.tasks) == ["normal", "reshading"]


def test_bad_overrides(tmp_path):
    path = _write(tmp_path, BASIC)
    with pytest.raises(ConfigError, match=r"--set: unknown key 'train\.epoch' \(did you mean 'train\.epochs'"):
        load_config(path, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["train.epochs"])


@pytest.mark.parametrize("override, key", [
    ("train.amp=fp16", "train.amp"), ("data.format=coco", "data.format"), ("train.weighting=gradnorm",
                                                                           "train.weighting"),
    ("model.tasks=[depth]", "model.tasks"), ("model.tasks=[]", "model.tasks"), ("model.tasks=[semseg]",
                                                                                  "model.tasks"),
    ("train.lr=0", "train.lr"), ("train.drop_path=1.5", "train.drop_path"), ("model.name=modsquad_vit_m",
                                                                             "model.name"),
    ("model.overrides.routr=shared", "model.overrides.routr"), ("train.device=gpu", "train.device"),
])
def test_invalid_values_name_the_field(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(_write(tmp_path, BASIC), [override])


def test_suggests_close_choice(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'model\.overrides\.router'"):
        load_config(_write(tmp_path, BASIC), ["model.overrides.routr=shared"])
    with pytest.raises(ConfigError, match="did you mean 'modsquad_vit_s'"):
        load_config(_write(tmp_path, BASIC), ["model.name=modsquad_vit_ss"])


def test_circular_base(tmp_path):
    _write(tmp_path, "base: b.yaml\n", "a.yaml")
    _write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_save_round_trip(tmp_path):
    cfg = load_config(CONFIGS[0].parent / "synthetic_tiny_task_level.yaml", ["train.epochs=2"])
    saved = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert "base" not in yaml.safe_load(saved.read_text())
    again = load_config(saved)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert config_to_dict(config_from_dict(config_to_dict(cfg))) == config_to_dict(cfg)


def test_scientific_notation_is_a_float(tmp_path):
    cfg = load_config(_write(tmp_path, BASIC.replace("epochs: 1", "epochs: 1, lr: 4e-4, min_lr: 1E-6")))
    assert cfg.train.lr == pytest.approx(4e-4) and cfg.train.min_lr == pytest.approx(1e-6)


def test_effective_lr(tmp_path):
    cfg = load_config(_write(tmp_path, BASIC), ["train.lr=4e-4", "data.batch_size=64", "train.accum_steps=2"])
    assert effective_lr(cfg) == pytest.approx(4e-4)
    cfg = load_config(_write(tmp_path, BASIC), ["train.lr=4e-4", "train.lr_scale_batch=true",
                                                "data.batch_size=64", "train.accum_steps=2"])
    assert effective_lr(cfg, world_size=4) == pytest.approx(4e-4 * 512 / 256)


def test_section_shapes(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.yaml: train: expected a section"):
        load_config(_write(tmp_path, BASIC.replace("train: {epochs: 1}", "train: 5")))
    cfg = load_config(_write(tmp_path, BASIC + "aux:\n"))  # an empty section keeps the defaults
    assert cfg.aux.mi == 0.0
    with pytest.raises(ConfigError, match=r"model\.tasks: expected a list"):
        load_config(_write(tmp_path, BASIC.replace("tasks: [depth_euclidean, normal]", "tasks: {a: 1}")))


def test_packaged_configs_resolve_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # by name from any folder, no checkout needed
    assert resolve_config("synthetic_tiny") == CONFIG_DIR / "synthetic_tiny.yaml"
    assert resolve_config("synthetic_tiny.yaml") == CONFIG_DIR / "synthetic_tiny.yaml"
    assert resolve_config("configs/synthetic_tiny.yaml") == CONFIG_DIR / "synthetic_tiny.yaml"  # old checkout path
    cfg = load_config("synthetic_tiny_dense")  # `base:` includes resolve inside the package
    assert cfg.name == "synthetic_tiny_dense" and cfg.model.name == "dense_vit_tiny"
    own = _write(tmp_path, BASIC, "synthetic_tiny.yaml")  # a file of that name in the folder wins
    assert resolve_config("synthetic_tiny.yaml").resolve() == own.resolve()
    mine = _write(tmp_path, "base: synthetic_tiny\ntrain: {epochs: 3}\n", "mine.yaml")  # own file on a packaged base
    cfg = load_config(mine)
    assert cfg.train.epochs == 3 and cfg.model.tasks == load_config("synthetic_tiny").model.tasks
    with pytest.raises(ConfigError, match=r"'synthetic_tiyn' not found.*did you mean synthetic_tiny\b.*modsquad configs"):
        load_config("synthetic_tiyn")


def test_list_configs_has_every_file_with_its_description():
    listed = list_configs()
    assert list(listed) == [p.stem for p in CONFIGS]
    assert all(listed.values()), [n for n, d in listed.items() if not d]
