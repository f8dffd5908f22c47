"""DiffusionNFT: the loss by hand, its gradient at the sampling policy, the clean estimates against diffusers, and
the update inside the real trainer."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from ddpo_cli.algorithms.nft import nft_loss, optimality_probability
from ddpo_cli.algorithms.nft_chain import NFTChain as NFT
from ddpo_cli.models.tiny import SCHEDULER_CONFIG
from ddpo_cli.rollout import Trajectory
from ddpo_cli.samplers.ddim import DDIMSampler
from ddpo_cli.samplers.flow import FlowSampler

from conftest import lora_and_frozen_grads, perturb_lora


def test_optimality_probability_by_hand():
    # c = 2: A = -3 (clipped to -2) -> 0, A = 0 -> 1/2, A = 1 -> 1/2 + 1/4
    torch.testing.assert_close(optimality_probability(torch.tensor([-3.0, 0.0, 1.0]), 2.0),
                               torch.tensor([0.0, 0.5, 0.75]))


def test_loss_by_hand_one_dimension():
    # one pair, one dimension: x0 = 0, old estimate 1, current 2, beta 0.5, c 1, A 0.5 -> r 0.75
    # positive 0.5*2 + 0.5*1 = 1.5 (error 1.5, weight 1.5), negative 1.5*1 - 0.5*2 = 0.5 (error 0.5, weight 0.5)
    # loss = 1/0.5 * (0.75 * 1.5^2/1.5 + 0.25 * 0.5^2/0.5) = 2 * (1.125 + 0.125) = 2.5
    args = (torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([0.5]))
    loss, _ = nft_loss(*args, beta=0.5, adv_clip_max=1.0)
    assert loss.item() == pytest.approx(2.5)
    # without the adaptive weight: 2 * (0.75 * 2.25 + 0.25 * 0.25) = 3.5
    assert nft_loss(*args, beta=0.5, adv_clip_max=1.0, adaptive_weight=False)[0].item() == pytest.approx(3.5)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_gradient_at_the_sampling_policy_is_the_advantage_weighted_denoising_gradient(beta):
    # at current == old the gradient per element is 2 clip(A) (old - x0) / (D w) / P, w = mean |old - x0|:
    # the ordinary denoising gradient weighted by the advantage, whatever beta
    gen = torch.Generator().manual_seed(0)
    old, x0 = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    adv = torch.tensor([1.5, -0.5, 7.0])   # the last is clipped to c = 5
    current = old.clone().requires_grad_(True)
    nft_loss(current, old, x0, adv, beta=beta, adv_clip_max=5.0)[0].backward()
    d, w = old[0].numel(), (old - x0).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = 2 * adv.clamp(-5, 5).view(-1, 1, 1, 1) * (old - x0) / (d * w) / 3
    torch.testing.assert_close(current.grad, expected)


def test_zero_advantages_pull_back_to_the_sampling_policy_only():
    # r = 1/2 everywhere: no gradient at the sampling policy (no drift from training on one's own samples), and
    # away from it the gradient points back to it
    gen = torch.Generator().manual_seed(1)
    old, x0 = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    at_old = old.clone().requires_grad_(True)
    nft_loss(at_old, old, x0, torch.zeros(4), beta=1.0, adv_clip_max=5.0)[0].backward()
    assert at_old.grad.abs().max().item() < 1e-6
    away = (old + 0.1).requires_grad_(True)
    nft_loss(away, old, x0, torch.zeros(4), beta=1.0, adv_clip_max=5.0, adaptive_weight=False)[0].backward()
    assert (away.grad > 0).all()   # descending moves the estimate back down to old


def test_the_constructor_checks_its_settings():
    with pytest.raises(ValueError, match="algo.beta"):
        NFT(beta=0.0)
    with pytest.raises(ValueError, match="algo.adv_clip_max"):
        NFT(adv_clip_max=-1.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_clean_estimate_is_diffusers_pred_original_sample(prediction_type):
    config = {**SCHEDULER_CONFIG, "prediction_type": prediction_type}
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(10)
    sampler = DDIMSampler(config, 10, eta=1.0)
    gen = torch.Generator().manual_seed(0)
    for i, t in enumerate(scheduler.timesteps):
        x, out = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        expected = scheduler.step(out, t, x, eta=0.0).pred_original_sample
        torch.testing.assert_close(sampler.clean_estimate(out, x, torch.full((2,), i)), expected, rtol=1e-5,
                                   atol=1e-5)


def test_flow_clean_estimate_by_hand():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(4)
    sampler = FlowSampler(scheduler.sigmas, "flow_sde")
    x, v = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)
    s = float(scheduler.sigmas[1])   # 0.75
    torch.testing.assert_close(sampler.clean_estimate(v, x, torch.tensor([1])), x - s * v)


def test_trajectories_concatenate_with_and_without_outputs():
    part = dict(latents=torch.zeros(1, 2, 1), next_latents=torch.zeros(1, 2, 1), log_probs=torch.zeros(1, 2),
                steps=torch.zeros(1, 2, dtype=torch.long), final=torch.zeros(1, 1))
    assert Trajectory.cat([Trajectory(**part), Trajectory(**part)]).outputs is None
    joined = Trajectory.cat([Trajectory(**part, outputs=torch.ones(1, 2, 1)), Trajectory(**part, outputs=torch.ones(1, 2, 1))])
    assert joined.outputs.shape == (2, 2, 1)


def test_nft_in_the_trainer_starts_at_the_recorded_policy_and_trains_lora_only(make_trainer):
    trainer = make_trainer("algo=nft_chain", "advantage.mode=batch")
    perturb_lora(trainer)   # a policy that is not the base model
    samples, _ = trainer.sample(0)
    assert samples.trajectory.outputs is not None
    rows, cols = torch.tensor([0, 1]), torch.tensor([0, 2])
    tensors = trainer.pair_tensors(samples, torch.tensor([1.0, -1.0]), rows, cols)
    # before any update the recomputed clean estimate is the one recorded when sampling
    torch.testing.assert_close(tensors["clean_estimate"], tensors["old_clean_estimate"], rtol=1e-4, atol=1e-4)
    loss, metrics = trainer.algo.loss(**tensors)
    assert metrics["policy_shift"].item() < 1e-8
    loss.backward()
    lora, frozen = lora_and_frozen_grads(trainer)
    assert sum(g.abs().sum() for g in lora if g is not None) > 0 and all(g is None for g in frozen)
