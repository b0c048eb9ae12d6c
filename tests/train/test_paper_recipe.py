"""The official Mod-Squad training recipe's knobs: per-task loss swaps, the total-loss clamp, AdamW eps."""

import pytest
import torch

from modsquad.config import load_config
from modsquad.core.errors import ConfigError
from modsquad.evaluate.evaluator import batch_to_device
from modsquad.tasks import get_task
from modsquad.tasks.losses import mse_loss, task_loss
from modsquad.train.trainer import Trainer


def test_mse_loss_hand_computed():
    pred = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 4.0]]]])  # [2, 1, 1, 2]
    target = torch.tensor([[[[0.0, 0.0]]], [[[0.0, 1.0]]]])
    mask = torch.tensor([[[True, True]], [[True, False]]])
    assert mse_loss(pred, target, mask).item() == pytest.approx((1 + 4 + 0) / 3)
    logits, soft = torch.tensor([[2.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert mse_loss(logits, soft).item() == pytest.approx(((1 + 0) / 2 + (0.25 + 0.25) / 2) / 2)
    assert mse_loss(logits, soft, torch.tensor([True, False])).item() == pytest.approx(0.5)


def test_task_loss_swaps_by_name():
    spec = get_task("principal_curvature")
    pred, target = torch.ones(1, 2, 4, 4) * 3, torch.ones(1, 2, 4, 4)
    assert task_loss(spec, pred, target).item() == pytest.approx(2.0)  # the task's own l1
    assert task_loss(spec, pred, target, loss="mse").item() == pytest.approx(4.0)


def test_recipe_keys_reach_the_optimizer_and_loss(make_cfg, tmp_path):
    cfg = make_cfg(train={"steps": 2, "adam_eps": 1e-4, "loss_clamp": 0.5,
                          "task_losses": {"depth_euclidean": "mse"}})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert all(g["eps"] == 1e-4 for g in trainer.optimizer.param_groups)
    images, targets, masks = batch_to_device(next(iter(trainer.data.loader(epoch=0))), trainer.device)
    loss = trainer._loss(images, targets, masks)
    terms = loss.terms
    assert terms["loss"].item() > 0.5 and loss.total.item() == pytest.approx(0.5)  # logged unclamped, trained clamped
    spec = get_task("depth_euclidean")
    with torch.no_grad():
        preds = trainer.model(images, tasks=trainer.tasks)
    expected = task_loss(spec, preds["depth_euclidean"], targets["depth_euclidean"], masks.get("depth_euclidean"),
                         loss="mse")
    torch.testing.assert_close(terms["loss/depth_euclidean"].detach(), expected)


@pytest.mark.parametrize("override,field", [("train.task_losses={normal: bogus}", "train.task_losses.normal"),
                                            ("train.task_losses={class_scene: mse}", "train.task_losses.class_scene"),
                                            ("train.loss_clamp=0", "train.loss_clamp"),
                                            ("train.adam_eps=-1", "train.adam_eps")])
def test_recipe_keys_are_checked(make_cfg, tmp_path, override, field):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(make_cfg(as_dict=True)))
    with pytest.raises(ConfigError, match=field):
        load_config(path, [override])
