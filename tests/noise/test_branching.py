"""Trajectory branching (``sampler.branch``): a group shares every noise draw but its branch step's, and trains only
that step."""
from __future__ import annotations

import pytest
import torch

from ddpo_cli.config import compose, plan_run
from ddpo_cli.errors import UserError
from ddpo_cli.noise import branched_noise



def test_branched_noise_shares_all_but_the_branch_step():
    branch = torch.tensor([0, 0, 2, 2])    # two groups of 2: group 0 branches at step 0, group 1 at step 2
    noise = branched_noise((4, 3), 2, branch, torch.Generator().manual_seed(0), "cpu")
    step0, step1, step2 = noise(0), noise(1), noise(2)
    assert not torch.equal(step0[0], step0[1]) and torch.equal(step0[2], step0[3])
    assert torch.equal(step1[0], step1[1]) and torch.equal(step1[2], step1[3]) and not torch.equal(step1[0], step1[2])
    assert torch.equal(step2[0], step2[1]) and not torch.equal(step2[2], step2[3])


def test_branched_noise_draws_the_same_stream_whatever_the_branch():
    # the shared and the own draws are both made at every step, so the branch choice does not move the stream:
    # image b's draw at a step is the same as in a batch where every image owns (or shares) that step
    def draws(branch):
        noise = branched_noise((4, 3), 2, torch.tensor(branch), torch.Generator().manual_seed(0), "cpu")
        return noise(0), noise(1)

    mixed, all0, all1 = draws([0, 0, 1, 1]), draws([0, 0, 0, 0]), draws([1, 1, 1, 1])
    torch.testing.assert_close(mixed[0][:2], all0[0][:2])   # step 0: group 0 owns it, group 1 shares it
    torch.testing.assert_close(mixed[0][2:], all1[0][2:])
    torch.testing.assert_close(mixed[1][:2], all0[1][:2])   # step 1: the other way round
    torch.testing.assert_close(mixed[1][2:], all1[1][2:])


def test_branching_needs_group_advantages():
    cfg = compose("train", ["experiment=quickstart", "sampler.branch=true", "advantage.mode=batch"])
    with pytest.raises(UserError, match="sampler.branch=true"):
        plan_run(cfg)
    counts = plan_run(compose("train", ["experiment=quickstart", "sampler.branch=true"])).counts
    assert counts.train_timesteps == 1 and counts.pairs_per_update == 64   # 64 samples per update, one step each


def test_a_branched_group_differs_only_after_its_branch_step_and_trains_it(make_trainer):
    trainer = make_trainer("sampler.branch=true", "advantage.mode=group", "sampler.group_size=2",
                           "sampler.batch_size=4", "train.batch_size=4")
    samples, _ = trainer.sample(0)
    traj = samples.trajectory
    assert traj.branch is not None and traj.branch.shape == (4,)
    assert torch.equal(traj.branch[0::2], traj.branch[1::2])            # one branch step per group
    for first in (0, 2):
        k = int(traj.branch[first])
        a, b = traj.next_latents[first], traj.next_latents[first + 1]
        assert torch.equal(a[:k], b[:k]) and not torch.equal(a[k], b[k])  # identical up to the branch step
    seen = []
    trainer.update = lambda s, t, ids, steps: seen.append((ids.clone(), steps.clone())) or {}
    trainer.update_epoch(0, samples, torch.zeros(4))
    for ids, steps in seen:
        assert steps.shape[1] == 1 and torch.equal(steps[:, 0], traj.branch[ids].cpu())
