import torch

from modsquad.moe import GroupedLinear, plan_dispatch


def test_grouped_linear_layout_init_and_forward():
    layer = GroupedLinear(4, 32, 16)
    assert layer.weight.shape == (4, 32, 16) and layer.bias.shape == (4, 16)
    assert layer.bias.abs().sum() == 0
    assert 0.015 < layer.weight.std() < 0.025  # trunc_normal_(std=.02), as timm
    assert GroupedLinear(4, 32, 16, bias=False).bias is None
    plan = plan_dispatch(torch.tensor([[3, 1], [1, 0], [3, 0]]), num_experts=4)
    x = torch.randn(6, 32)
    expected = torch.stack([x[s] @ layer.weight[e] + layer.bias[e] for s, e in enumerate(plan.expert_index.tolist())])
    torch.testing.assert_close(layer(x, plan), expected)
    assert "num_experts=4" in repr(layer)


def test_grouped_linear_slices_to_fewer_experts():
    """Extraction builds a layer with fewer experts from a slice of the weights (expert dim first)."""
    big = GroupedLinear(6, 8, 4)
    keep = torch.tensor([1, 4])
    small = GroupedLinear(2, 8, 4)
    small.load_state_dict({"weight": big.weight[keep], "bias": big.bias[keep]})
    x = torch.randn(3, 8)
    torch.testing.assert_close(small(x, plan_dispatch(torch.ones(3, 1, dtype=torch.long), 2)),
                               big(x, plan_dispatch(torch.full((3, 1), 4), 6)))
