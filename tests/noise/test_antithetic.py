"""Antithetic pairs (``sampler.antithetic``): the two images of a pair share every noise draw, except that the second
gets the negative of the first's draw at the trained steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpo_cli.advantages import group_advantages
from ddpo_cli.config import compose, plan_run
from ddpo_cli.errors import UserError
from ddpo_cli.noise import mirrored_noise
from ddpo_cli.rollout import policy_step, trained_steps



def test_mirrored_noise_negates_the_trained_steps_and_shares_the_rest():
    noise = mirrored_noise((4, 3), torch.tensor([1]), torch.Generator().manual_seed(0), "cpu")
    step0, step1 = noise(0), noise(1)
    assert torch.equal(step0[0], step0[1]) and torch.equal(step0[2], step0[3])      # step 0 shared in each pair
    assert torch.equal(step1[1], -step1[0]) and torch.equal(step1[3], -step1[2])    # step 1 mirrored
    assert not torch.equal(step0[0], step0[2]) and not torch.equal(step1[0], step1[2])   # pairs differ
    # one standard normal draw per pair and step: the same stream as a plain generator's
    generator = torch.Generator().manual_seed(0)
    torch.testing.assert_close(step0[0::2], torch.randn((2, 3), generator=generator))
    torch.testing.assert_close(step1[0::2], torch.randn((2, 3), generator=generator))


def test_antithetic_pairs_need_an_even_group():
    with pytest.raises(UserError, match="sampler.antithetic=true"):
        plan_run(compose("train", ["experiment=quickstart", "sampler.antithetic=true", "sampler.group_size=3",
                                   "sampler.batch_size=30"]))
    with pytest.raises(UserError, match="sampler.antithetic=true"):
        plan_run(compose("train", ["experiment=quickstart", "sampler.antithetic=true", "sampler.branch=true"]))
    plan_run(compose("train", ["experiment=quickstart", "sampler.antithetic=true"]))


def test_a_pair_shares_its_untrained_steps_and_mirrors_its_trained_step_about_the_policy_mean(make_trainer):
    trainer = make_trainer("sampler.antithetic=true", "advantage.mode=group", "sampler.group_size=4",
                           "sampler.batch_size=4", "train.batch_size=4", "train.timestep_window=[0.3,0.7]")
    assert trained_steps(trainer.sampler, trainer.counts.window).tolist() == [1]
    samples, _ = trainer.sample(0)
    traj = samples.trajectory
    for a in (0, 2):
        b = a + 1
        assert torch.equal(traj.latents[a, 0], traj.latents[b, 0])          # one initial noise per group
        assert torch.equal(traj.next_latents[a, 0], traj.next_latents[b, 0])  # untrained step 0: shared draw
        assert not torch.equal(traj.next_latents[a, 1], traj.next_latents[b, 1])
        step = policy_step(trainer.model, trainer.sampler, trainer.accelerator.unwrap_model(trainer.denoiser),
                           traj.latents[a:a + 1, 1], traj.next_latents[a:a + 1, 1], traj.steps[a:a + 1, 1],
                           trainer.model.encode(samples.prompts[a:a + 1]), trainer.cfg.sampler.guidance_scale)
        # trained step 1: the two draws are mean +- std * eps
        torch.testing.assert_close((traj.next_latents[a, 1] + traj.next_latents[b, 1]) / 2, step["mean"][0],
                                   atol=1e-5, rtol=1e-5)

    # each pair's baseline is the other pair's mean (issue #23: the group mean, partner included, biased every
    # trained step after the first)
    rewards = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(trainer.training_targets(samples, rewards, 0).numpy(),
                               group_advantages(rewards, 4, mirrored_pairs=True), rtol=1e-6)
