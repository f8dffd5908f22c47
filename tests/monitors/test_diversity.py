"""In-group diversity on hand-made items."""
import pytest
import torch

from ddpo_cli.monitors.diversity import mean_pairwise_rms


def test_the_rms_distance_of_two_items_and_the_mean_over_groups():
    items = torch.stack([torch.zeros(4), torch.ones(4),                    # group 0: distance 1
                         torch.zeros(4), torch.full((4,), 3.0), torch.zeros(4)])  # group 1: 3, 0, 3
    assert mean_pairwise_rms(items[:2], [0, 0]) == pytest.approx(1.0)
    assert mean_pairwise_rms(items, [0, 0, 1, 1, 1]) == pytest.approx((1.0 + 2.0) / 2)


def test_groups_of_one_have_no_pair_and_identical_images_have_no_diversity():
    items = torch.rand(3, 2, 2, 2)
    assert mean_pairwise_rms(items, [0, 1, 2]) == 0.0
    same = items[:1].repeat(4, 1, 1, 1)
    assert mean_pairwise_rms(same, [0, 0, 0, 0]) == pytest.approx(0.0, abs=1e-6)
