import pytest
import torch

from modsquad.moe import (
    count_selections,
    experts_for_mass,
    experts_for_mass_count,
    experts_over_threshold,
    usage_share,
)
from modsquad.moe.usage import add_selections_


def test_count_selections_hand_count():
    indices = torch.tensor([[0, 2], [2, 1], [0, 2], [3, 0]])
    task_ids = torch.tensor([1, 1, 0, 1])
    expected = torch.tensor([[1, 0, 1, 0], [2, 1, 2, 1], [0, 0, 0, 0]])
    assert torch.equal(count_selections(indices, task_ids, num_tasks=3, num_experts=4), expected)


def test_usage_share_rows_sum_to_one():
    share = usage_share(torch.tensor([[1, 3, 0, 4], [0, 0, 0, 0]]))
    assert share.dtype == torch.float64
    torch.testing.assert_close(share[0], torch.tensor([0.125, 0.375, 0.0, 0.5], dtype=torch.float64))
    assert share[1].sum() == 0


COUNTS = torch.tensor([50, 0, 30, 5, 10, 5])  # shares .5 0 .3 .05 .1 .05


@pytest.mark.parametrize(("threshold", "min_keep", "expected"), [
    (0.1, 1, [0, 2, 4]),
    (0.05, 1, [0, 2, 3, 4, 5]),
    (0.0, 1, [0, 1, 2, 3, 4, 5]),
    (0.4, 2, [0, 2]),     # only expert 0 passes; the next most used fills up to min_keep
    (0.9, 3, [0, 2, 4]),
    (0.2, 4, [0, 2, 3, 4]),  # experts 3 and 5 tie at 5: the lower id wins
])
def test_experts_over_threshold(threshold, min_keep, expected):
    assert experts_over_threshold(COUNTS, threshold, min_keep).tolist() == expected


@pytest.mark.parametrize(("mass", "count", "expected"), [
    (0.5, 1, [0, 2]),  # min_keep=2
    (0.8, 2, [0, 2]),
    (0.81, 3, [0, 2, 4]),
    (0.9, 3, [0, 2, 4]),
    (0.95, 4, [0, 2, 3, 4]),
    (0.99, 5, [0, 2, 3, 4, 5]),
    (1.0, 5, [0, 2, 3, 4, 5]),  # the never used expert 1 is never needed for mass
])
def test_experts_for_mass(mass, count, expected):
    assert experts_for_mass_count(COUNTS, mass) == count
    assert experts_for_mass(COUNTS, mass, min_keep=2).tolist() == expected


def test_unused_task_keeps_min_keep_lowest_ids():
    zeros = torch.zeros(6, dtype=torch.long)
    assert experts_for_mass_count(zeros, 0.9) == 0
    assert experts_for_mass(zeros, 0.9, min_keep=2).tolist() == [0, 1]
    assert experts_over_threshold(zeros, 0.1, min_keep=2).tolist() == [0, 1]


def test_mass_float_rounding_and_validation():
    counts = torch.tensor([1, 1, 1])  # thirds: 3 * (1/3) must still reach mass 1.0
    assert experts_for_mass_count(counts, 1.0) == 3
    assert experts_for_mass_count([7, 3], 0.7) == 1
    with pytest.raises(ValueError, match="mass"):
        experts_for_mass_count(counts, 1.5)


def test_add_selections_in_place_equals_count_selections():
    gen = torch.Generator().manual_seed(0)
    indices, task_ids = torch.randint(0, 5, (30, 2), generator=gen), torch.randint(0, 3, (30,), generator=gen)
    usage = torch.full((3, 5), 7, dtype=torch.long)
    out = add_selections_(usage, indices, task_ids)
    assert out is usage
    assert torch.equal(usage, 7 + count_selections(indices, task_ids, 3, 5))
