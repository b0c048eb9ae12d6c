import pytest
import torch

from modsquad.core.errors import ConfigError, UnknownNameError
from modsquad.models import build_model_from_config
from modsquad.models.grow import add_tasks, freeze, task_indexed_parameters
from modsquad.train.optim import build_optimizer

OLD = ["depth_euclidean", "normal", "segment_semantic", "class_scene"]
NEW = ["reshading", "edge_texture"]
ROUTERS = [("per_task", {}), ("per_task", {"noisy": True}), ("task_conditioned", {}),
           ("task_level", {"mode": "softmax"}), ("task_level", {"mode": "gumbel"}),
           ("task_level", {"mode": "gumbel_st"}), ("shared", {}), ("dense", {})]
IDS = [f"{r}-{'-'.join(map(str, kw.values())) or 'plain'}" for r, kw in ROUTERS]
# Outputs of the old tasks are computed by matmuls of other shapes once tasks are added (more gate rows, more
# batch rows), where BLAS may pick other kernels: equal to float rounding, not bitwise (1 ulp seen on AMD EPYC).
ROUNDING = dict(rtol=1e-5, atol=1e-6)


def assert_old_parameters_unchanged(old_state: dict, grown: torch.nn.Module, new_tasks) -> None:
    """Every parameter the old tasks use is bitwise unchanged: shared tensors whole, task-indexed ones on their
    old rows (dim 0); only the new tasks' heads are new. Usage counters are buffers, not parameters."""
    for name, value in grown.state_dict().items():
        if name.endswith("usage") or any(name.startswith(f"heads.{t}.") for t in new_tasks):
            continue
        ref = old_state[name]
        assert torch.equal(value[:ref.shape[0]] if value.shape != ref.shape else value, ref), name


def _train_new(model, frozen, images, steps=3, lr=1e-2, attach=True):
    """A few AdamW steps (weight decay on) on a loss of the new tasks only, plus the aux losses."""
    opt = build_optimizer(model, lr, weight_decay=0.1)
    if attach:
        frozen.attach(opt)
    model.train()
    for _ in range(steps):
        out = model(images, tasks=NEW)
        loss = sum(o.float().square().mean() for o in out.values()) + sum(model.aux_losses().values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.mark.parametrize("router,kwargs", ROUTERS, ids=IDS)
def test_add_tasks_then_frozen_training_keeps_old_outputs(make_vit, randomize, images, router, kwargs):
    model = randomize(make_vit(OLD, router=router, router_kwargs=kwargs)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(images)
    grown = add_tasks(model, NEW).eval()
    assert grown.tasks == OLD + NEW and grown.config["tasks"] == OLD + NEW
    with torch.no_grad():
        grown_out = grown(images, tasks=OLD)
    for task in OLD:
        torch.testing.assert_close(grown_out[task], before[task], **ROUNDING, msg=task)

    frozen = freeze(grown, "experts", NEW)
    _train_new(grown, frozen, images)
    assert_old_parameters_unchanged(state, grown, NEW)
    with torch.no_grad():
        alone, together = grown(images, tasks=OLD), grown(images)
    for task in OLD:
        torch.testing.assert_close(alone[task], before[task], **ROUNDING, msg=task)
        # the new tasks in the forward change nothing beyond rounding (their rows are other rows of the batch)
        torch.testing.assert_close(together[task], before[task], **ROUNDING, msg=task)


def test_add_tasks_copies_rows_and_leaves_input_alone(make_vit, randomize, images):
    model = randomize(make_vit(OLD))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(images)  # fill the usage counters
    usage = model.blocks[0].mlp.usage.clone()
    grown = add_tasks(model, NEW)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items() if not k.endswith("usage"))
    n = len(OLD)
    for name, p in task_indexed_parameters(grown).items():
        assert p.shape[0] == n + len(NEW), name
        assert torch.equal(p[:n], state[name]), name
    assert torch.equal(grown.blocks[0].mlp.usage[:n], usage)
    assert not grown.blocks[0].mlp.usage[n:].any()
    assert not grown.blocks[0].mlp.router.weight[n:].any()  # fresh per-task gates start at zero (uniform)
    # the grown config rebuilds the same architecture (checkpoints load strictly)
    build_model_from_config(grown.config).load_state_dict(grown.state_dict(), strict=True)


@pytest.mark.parametrize("router,kwargs", [r for r in ROUTERS if r[0] != "dense"],
                         ids=[i for i, r in zip(IDS, ROUTERS, strict=True) if r[0] != "dense"])
def test_router_init_from_reuses_the_tasks_routing(make_vit, randomize, images, router, kwargs):
    model = randomize(make_vit(OLD, router=router, router_kwargs=kwargs))
    grown = add_tasks(model, ["reshading"], router_init_from="normal").eval()
    src, dst = grown.task_index("normal"), grown.task_index("reshading")
    for name, p in task_indexed_parameters(grown).items():
        assert torch.equal(p[dst], p[src]), name  # the copied rows are bitwise the source task's
    with torch.no_grad():
        feats, _ = grown.forward_features(images, ["normal", "reshading"])
    # same task embedding and routers: the same tokens (other rows of one batch, so equal to float rounding)
    torch.testing.assert_close(feats[1], feats[0], **ROUNDING)
    grown.reset_usage()
    with torch.no_grad():
        grown(images, tasks=["normal", "reshading"])
    for _, layer in grown.moe_layers():
        # the same experts, up to a top-k tie that rounding may break the other way (at most a few selections)
        differ = (layer.usage[1] - layer.usage[-1]).abs().sum().item()
        assert differ <= max(2, 0.02 * layer.usage[1].sum().item()), (layer.usage[1], layer.usage[-1])


def test_freeze_modes_set_trainable_parameters(make_vit, randomize, images):
    grown = add_tasks(randomize(make_vit(OLD)), NEW)
    frozen = freeze(grown, "backbone", NEW)
    trainable = {n for n, p in grown.named_parameters() if p.requires_grad}
    assert trainable == set(frozen.trainable)
    assert trainable and all(n.split(".")[1] in NEW for n in trainable) and all(n.startswith("heads.") for n in trainable)

    frozen = freeze(grown, "experts", NEW)
    trainable = {n for n, p in grown.named_parameters() if p.requires_grad}
    assert trainable == set(frozen.trainable)
    assert set(task_indexed_parameters(grown)) <= trainable
    assert not any(".fc1." in n or ".q_weight" in n or n.startswith("heads.normal") for n in trainable)
    assert set(frozen.rows) == set(task_indexed_parameters(grown))

    freeze(grown, "none", NEW)
    assert all(p.requires_grad for p in grown.parameters())


def test_weight_decay_would_move_frozen_rows_without_attach(make_vit, randomize, images):
    """Why `attach`: AdamW decays every element of a parameter, including old rows whose gradient is masked."""
    grown = add_tasks(randomize(make_vit(OLD)), NEW)
    old_rows = grown.blocks[0].mlp.router.weight[:len(OLD)].detach().clone()
    frozen = freeze(grown, "experts", NEW)
    _train_new(grown, frozen, images, steps=1, attach=False)
    assert not torch.equal(grown.blocks[0].mlp.router.weight[:len(OLD)], old_rows)
    frozen.remove()


def test_add_tasks_errors(make_vit):
    model = make_vit(OLD)
    with pytest.raises(ConfigError, match="already has"):
        add_tasks(model, ["normal"])
    with pytest.raises(ConfigError, match="duplicate"):
        add_tasks(model, ["reshading", "reshading"])
    with pytest.raises(ConfigError, match="at least one"):
        add_tasks(model, [])
    with pytest.raises(UnknownNameError):
        add_tasks(model, ["reshadingg"])
    with pytest.raises(ConfigError, match="pascal_context suite"):
        add_tasks(model, ["semseg"])
    with pytest.raises(UnknownNameError, match="no task 'edge_texture'"):
        add_tasks(model, ["reshading"], router_init_from="edge_texture")
    with pytest.raises(ConfigError, match="freeze mode"):
        freeze(model, "heads", ["normal"])
