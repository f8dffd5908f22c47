"""Advantages: per-prompt tracker, batch and group normalisation."""
import numpy as np
import pytest

from ddpo_cli.advantages import PerPromptStatTracker, batch_advantages, group_advantages


def test_batch_advantages():
    adv = batch_advantages(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(adv, np.array([-1, 0, 1]) / (np.sqrt(2 / 3) + 1e-6))


def test_tracker_uses_batch_stats_below_min_count_then_prompt_stats():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    # first call: 'a' has 1 reward (< 2) -> batch stats over [1, 3]: mean 2, std 1
    adv = tracker.update(["a", "b"], np.array([1.0, 3.0]))
    np.testing.assert_allclose(adv, [-1 / (1 + 1e-6), 1 / (1 + 1e-6)])
    # second call: 'a' buffer [1, 5] -> mean 3, std 2 -> (5 - 3) / 2 = 1
    adv = tracker.update(["a"], np.array([5.0]))
    np.testing.assert_allclose(adv, [2 / (2 + 1e-6)])


def test_tracker_buffer_is_bounded_and_round_trips():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    for value in range(6):
        tracker.update(["p"], np.array([float(value)]))
    assert list(tracker.buffers["p"]) == [3.0, 4.0, 5.0]
    copy = PerPromptStatTracker(3, 1)
    copy.load_state_dict(tracker.state_dict())
    np.testing.assert_allclose(copy.update(["p"], np.array([7.0])), tracker.update(["p"], np.array([7.0])))


def test_group_advantages_normalise_within_groups():
    adv = group_advantages(np.array([1.0, 3.0, 10.0, 10.0]), group_size=2)
    np.testing.assert_allclose(adv, [-1 / (1 + 1e-6), 1 / (1 + 1e-6), 0, 0])
    with pytest.raises(ValueError):
        group_advantages(np.array([1.0, 2.0, 3.0]), group_size=2)
