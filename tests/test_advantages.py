"""Advantages: per-prompt tracker, batch and group normalisation."""
import numpy as np
import pytest

from ddpo_cli.advantages import PerPromptStatTracker, batch_advantages, group_advantages, pair_baselines


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
    # Flow-GRPO's (r - mean) / (std + 1e-4): a group equal but for float noise stays near 0 (with 1e-6 it gave +-0.9)
    adv = group_advantages(np.array([1.0, 3.0, 10.0, 10.0]), group_size=2)
    np.testing.assert_allclose(adv, [-1 / (1 + 1e-4), 1 / (1 + 1e-4), 0, 0])
    noise = group_advantages(np.array([1.0, 1.0 + 2e-6]), group_size=2)
    assert np.abs(noise).max() < 0.01
    with pytest.raises(ValueError):
        group_advantages(np.array([1.0, 2.0, 3.0]), group_size=2)


def test_mirrored_pairs_take_their_baseline_from_the_other_pairs_of_the_group():
    # pairs (1, 3) and (5, 7): baselines 6 and 2; the group's std sqrt(5) as usual
    adv = group_advantages(np.array([1.0, 3.0, 5.0, 7.0]), group_size=4, mirrored_pairs=True)
    np.testing.assert_allclose(adv, np.array([-5.0, -3.0, 3.0, 5.0]) / (np.sqrt(5) + 1e-4))
    # a group of one pair: its own mean (the plain group mean)
    np.testing.assert_allclose(group_advantages(np.array([1.0, 3.0]), 2, mirrored_pairs=True),
                               group_advantages(np.array([1.0, 3.0]), 2))
    # a dropped (NaN) reward takes no part: pair 0 keeps 1 valid reward, pair 1 two
    adv = group_advantages(np.array([1.0, np.nan, 5.0, 7.0]), group_size=4, mirrored_pairs=True)
    valid = np.array([1.0, 5.0, 7.0])
    np.testing.assert_allclose(adv, np.array([1.0 - 6.0, 0.0, 5.0 - 1.0, 7.0 - 1.0]) / (valid.std() + 1e-4))


def mirrored_toy_gradient(baseline, group_size: int, groups: int = 100_000) -> np.ndarray:
    """Issue #23's two-step toy chain at theta = (0.5, 0): x1 = th1 + e1, x2 = x1 + th2 x1 + e2, R = x2^2 with unit
    Gaussian steps, so d log pi / d th1 = e1 and d log pi / d th2 = e2 x1. True gradient
    (2 (1 + th2)^2 th1, 2 (1 + th2)(th1^2 + 1)) = (1.0, 2.5). Images 2j and 2j+1 of a group mirror both draws;
    returns the mean score-function estimate ``(R - baseline(R)) d log pi``."""
    rng = np.random.default_rng(0)
    e1, e2 = (np.stack([d, -d], axis=2).reshape(groups, group_size)
              for d in rng.standard_normal((2, groups, group_size // 2)))
    x1 = 0.5 + e1
    rewards = (x1 + e2) ** 2
    centred = rewards - baseline(rewards)
    return np.array([(centred * e1).mean(), (centred * e2 * x1).mean()])


def test_mirrored_pairs_with_the_other_pairs_as_baseline_are_unbiased_at_every_step():
    def other_pairs(r):
        return pair_baselines(r, np.ones_like(r, dtype=bool))

    def group_mean(r):
        return r.mean(1, keepdims=True)

    np.testing.assert_allclose(mirrored_toy_gradient(other_pairs, 8), [1.0, 2.5], atol=0.06)
    np.testing.assert_allclose(mirrored_toy_gradient(other_pairs, 4), [1.0, 2.5], atol=0.06)
    # what the issue measured: the group mean (partner included) is right at the first step, wrong after it
    biased = mirrored_toy_gradient(group_mean, 2)
    assert biased[0] == pytest.approx(1.0, abs=0.06) and biased[1] == pytest.approx(0.5, abs=0.06)
    assert mirrored_toy_gradient(group_mean, 8)[1] < 2.5 - 0.3
