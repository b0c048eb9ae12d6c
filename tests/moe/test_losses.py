import math

import pytest
import torch

from modsquad.moe import (
    MoEAttention,
    MoEMlp,
    mi_loss,
    moe_aux_losses,
    mutual_information,
    router_z_loss,
    switch_balance_loss,
)


def test_mi_zero_when_tasks_and_experts_independent():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4]).expand(12, 4)
    task_ids = torch.arange(3).repeat(4)
    assert mutual_information(probs, task_ids, 3).abs() < 1e-6


@pytest.mark.parametrize("num", [2, 3, 5])
def test_mi_one_to_one_is_log_tasks(num):
    probs = torch.eye(num).repeat(2, 1)  # task t's tokens all use expert t
    task_ids = torch.arange(num).repeat(2)
    torch.testing.assert_close(mutual_information(probs, task_ids, num), torch.tensor(math.log(num)))
    torch.testing.assert_close(mi_loss(probs, task_ids, num), -torch.tensor(math.log(num)))


def test_mi_hand_case_both_priors():
    # task 0 (1 token): P(e|0) = [1, 0]; task 1 (3 tokens): P(e|1) = mean([.2,.8], [.6,.4], [.7,.3]) = [.5, .5]
    probs = torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]], dtype=torch.float64)
    task_ids = torch.tensor([0, 1, 1, 1])
    # uniform prior: P(t,e) = [[.5, 0], [.25, .25]], P(e) = [.75, .25]
    uniform = 0.5 * math.log(0.5 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.75)) \
        + 0.25 * math.log(0.25 / (0.5 * 0.25))
    # token prior: P(t) = [.25, .75], P(t,e) = [[.25, 0], [.375, .375]], P(e) = [.625, .375]
    tokens = 0.25 * math.log(1 / 0.625) + 0.375 * math.log(0.5 / 0.625) + 0.375 * math.log(0.5 / 0.375)
    assert mutual_information(probs, task_ids, 2).item() == pytest.approx(uniform, abs=1e-7)
    assert mutual_information(probs, task_ids, 2, task_prior="tokens").item() == pytest.approx(tokens, abs=1e-7)


def test_mi_ignores_absent_tasks_and_is_differentiable():
    logits = torch.randn(6, 4, requires_grad=True)
    task_ids = torch.tensor([0, 0, 0, 2, 2, 2])
    mi = mutual_information(logits.softmax(-1), task_ids, num_tasks=5)
    mi_present = mutual_information(logits.softmax(-1), torch.tensor([0, 0, 0, 1, 1, 1]), num_tasks=2)
    torch.testing.assert_close(mi, mi_present)
    mi.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="task_prior"):
        mutual_information(logits, task_ids, 5, task_prior="equal")


def test_switch_balance_loss_hand_cases():
    uniform = torch.full((4, 4), 0.25)
    balanced = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    assert switch_balance_loss(uniform, balanced, 4).item() == pytest.approx(1.0)
    collapsed_probs = torch.tensor([[1.0, 0, 0, 0]]).expand(4, 4)
    collapsed = torch.zeros(4, 1, dtype=torch.long)
    assert switch_balance_loss(collapsed_probs, collapsed, 4).item() == pytest.approx(4.0)
    # f = [.5, .5, 0], P = [.5, .3, .2]: 3 * (.25 + .15) = 1.2
    probs = torch.tensor([[0.6, 0.2, 0.2], [0.4, 0.4, 0.2]])
    assert switch_balance_loss(probs, torch.tensor([[0], [1]]), 3).item() == pytest.approx(1.2)


def test_router_z_loss_hand_case():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp = log 2, log 4
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_moe_aux_losses_average_over_layers_and_find_layers_in_models():
    torch.manual_seed(0)
    mlp = MoEMlp(16, 32, 4, 2, 3)
    attn = MoEAttention(16, 8, 4, 2, 3, router="task_conditioned")
    model = torch.nn.ModuleList([attn, mlp, torch.nn.Linear(2, 2)])
    assert moe_aux_losses(model) == {"mi": 0.0, "balance": 0.0, "z": 0.0}  # nothing routed yet
    x, task_ids = torch.randn(3, 5, 16), torch.tensor([0, 1, 2])
    mlp(x, task_ids)
    attn(x, task_ids)
    losses = moe_aux_losses([mlp, attn])
    per_layer = []
    for layer in (mlp, attn):
        routing, tokens = layer.last_routing
        per_layer.append([mi_loss(routing.probs, tokens, 3), switch_balance_loss(routing.probs, routing.indices, 4),
                          router_z_loss(routing.logits)])
    for i, name in enumerate(("mi", "balance", "z")):
        torch.testing.assert_close(losses[name], (per_layer[0][i] + per_layer[1][i]) / 2)
    assert moe_aux_losses(model, balance=False, z=False).keys() == {"mi"}
    torch.testing.assert_close(moe_aux_losses(model)["z"], losses["z"])
    sum(losses.values()).backward()
    assert attn.router.task_embed.grad is not None
