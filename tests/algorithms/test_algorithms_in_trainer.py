"""RWR, DPOK and AlignProp maths by hand, and their gradients inside the real trainer on the tiny model."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from conftest import lora_and_frozen_grads, perturb_lora
from ddpo_cli.algorithms.alignprop import AlignProp, check_truncation, steps_with_gradient
from ddpo_cli.algorithms.dpok import DPOK
from ddpo_cli.algorithms.rwr import RWR, softmax_weights, top_fraction_weights
from ddpo_cli.samplers.gaussian import gaussian_kl


def test_softmax_weights_by_hand():
    # beta = 1, r = [0, ln 3] -> softmax = [1/4, 3/4] -> x N=2 -> [0.5, 1.5]
    np.testing.assert_allclose(softmax_weights(np.array([0.0, math.log(3)]), 1.0), [0.5, 1.5])
    np.testing.assert_allclose(softmax_weights(np.array([5.0, 5.0, 5.0]), 0.2), [1, 1, 1])


def test_top_fraction_weights_keep_the_best_unweighted():
    # keep ceil(0.5 * 4) = 2 best of [3, 1, 4, 2] -> indices 2 and 0, each weight 1 / 0.5 = 2
    np.testing.assert_allclose(top_fraction_weights(np.array([3.0, 1.0, 4.0, 2.0]), 0.5), [2, 0, 2, 0])
    np.testing.assert_allclose(top_fraction_weights(np.array([1.0, 2.0]), 0.1), [0, 2])  # at least one kept


def test_rwr_loss_is_weighted_mean_error():
    loss, _ = RWR().loss(errors=torch.tensor([1.0, 3.0]), weights=torch.tensor([0.5, 1.5]))
    assert loss.item() == pytest.approx((0.5 + 4.5) / 2)
    assert RWR(sparse=True, keep_fraction=0.5).weights(np.array([1.0, 0.0])).tolist() == [2.0, 0.0]


def test_gaussian_kl_by_hand():
    # means differ by 1 everywhere, std 2 -> 1 / (2 * 4) = 0.125 per dim; mean over dims 0.125
    mean, base = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    std = torch.full((2, 1, 1, 1), 2.0)
    torch.testing.assert_close(gaussian_kl(mean, base, std), torch.tensor([0.125, 0.125]))
    # equals torch's KL between the two Gaussians averaged over dims
    torch_kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std.expand_as(mean)),
                                                 torch.distributions.Normal(base, std.expand_as(base)))
    torch.testing.assert_close(gaussian_kl(mean, base, std), torch_kl.mean(dim=(1, 2, 3)))


def test_dpok_loss_adds_beta_kl_and_beta_zero_is_score_function():
    logp, adv = torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([1.0, -1.0])
    mean = torch.ones(2, 1, 1, 1, requires_grad=True)
    kwargs = dict(mean=mean, base_mean=torch.zeros(2, 1, 1, 1), std=torch.ones(2, 1, 1, 1))
    loss, metrics = DPOK(kl_beta=0.5).loss(logp, logp.detach(), adv, **kwargs)
    # score function: -(1 * -1 + -1 * -2) / 2 = -0.5 ; KL = 1 / 2 = 0.5 ; total = -0.5 + 0.5 * 0.5 = -0.25
    assert loss.item() == pytest.approx(-0.25) and metrics["kl_penalty"].item() == pytest.approx(0.5)
    loss0, _ = DPOK(kl_beta=0.0).loss(logp, logp.detach(), adv, **kwargs)
    from ddpo_cli.algorithms.ddpo import score_function_loss

    assert loss0.item() == pytest.approx(score_function_loss(logp, logp.detach(), adv, 5.0)[0].item())
    loss.backward()
    assert mean.grad.abs().sum() > 0  # the KL term has a gradient when beta > 0


def test_truncation_modes():
    rng = random.Random(0)
    assert steps_with_gradient("last_k", 5, rng, k=2) == [False, False, False, True, True]
    assert steps_with_gradient("fixed", 4, rng, keep_steps=[0, 2]) == [True, False, True, False]
    drawn = steps_with_gradient("random_last_k", 10, rng, k=4, k_min=2)
    assert 2 <= sum(drawn) <= 4 and drawn[-1] and drawn == sorted(drawn)
    # per-step random keeps step i with probability (i+1)/(T+1); the last step always
    counts = np.zeros(10)
    for _ in range(4000):
        counts += steps_with_gradient("per_step_random", 10, rng)
    expected = np.array([(i + 1) / 11 for i in range(10)])
    expected[-1] = 1.0
    np.testing.assert_allclose(counts / 4000, expected, atol=0.03)


def test_truncation_validation():
    assert check_truncation("last_k", 10, 0, 1, []) and check_truncation("last_k", 10, 11, 1, [])
    assert check_truncation("fixed", 10, 1, 1, []) and check_truncation("fixed", 10, 1, 1, [10])
    assert check_truncation("last_k", 10, 1, 1, []) is None and check_truncation("fixed", 10, 1, 1, [9]) is None


def test_alignprop_loss_forms():
    r = torch.tensor([2.0, 4.0])
    assert AlignProp().loss(r)[0].item() == pytest.approx(-3.0)
    assert AlignProp(loss="distance_to_target", target=10.0, loss_scale=0.01).loss(r)[0].item() == \
        pytest.approx(0.07)


# ------------------------------------------------------------------------------------------ inside the trainer
def test_dpok_kl_is_zero_at_init_and_has_gradient_after_a_change(make_trainer):
    trainer = make_trainer("algo=dpok", "algo.kl_beta=1.0")
    samples, _ = trainer.sample(0)
    rows, cols = torch.tensor([0, 1]), torch.tensor([0, 2])
    targets = torch.zeros(2)  # zero advantages: the loss is the KL term alone
    loss, metrics = trainer.algo.loss(**trainer.pair_tensors(samples, targets, rows, cols))
    assert metrics["kl_penalty"].item() == 0.0 and trainer.kl_reading(samples) == 0.0
    perturb_lora(trainer)
    loss, metrics = trainer.algo.loss(**trainer.pair_tensors(samples, targets, rows, cols))
    assert metrics["kl_penalty"].item() > 0 and trainer.kl_reading(samples) > 0
    loss.backward()
    lora, frozen = lora_and_frozen_grads(trainer)
    assert sum(g.abs().sum() for g in lora if g is not None) > 0
    assert all(g is None for g in frozen)


def test_rwr_gradients_reach_lora_only(make_trainer):
    trainer = make_trainer("algo=rwr")
    samples, _ = trainer.sample(0)
    loss, _ = trainer.algo.loss(**trainer.pair_tensors(samples, torch.ones(2), torch.tensor([0, 1]),
                                                       torch.tensor([0, 0])))
    loss.backward()
    lora, frozen = lora_and_frozen_grads(trainer)
    assert sum(g.abs().sum() for g in lora if g is not None) > 0 and all(g is None for g in frozen)


@pytest.mark.parametrize("truncation", ["last_k", "per_step_random"])
def test_alignprop_gradients_reach_lora_only(make_trainer, truncation):
    trainer = make_trainer("algo=alignprop", "reward=custom", f"algo.truncation={truncation}", "train.lr=1e-2")
    before = {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.denoiser).named_parameters()}
    _, _, metrics, _ = trainer.backprop_epoch(0)
    after = dict(trainer.accelerator.unwrap_model(trainer.denoiser).named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all("lora" in n for n in changed)
    assert metrics["grad_norm"] > 0 and trainer.global_step == 1


def test_timestep_window_trains_only_the_window(make_trainer, monkeypatch):
    # 4 steps, window [0, 0.5]: every trained (sample, step) pair is one of the first two denoising steps
    import ddpo_cli.pairs

    trainer = make_trainer("sampler.num_steps=4", "train.timestep_window=[0,0.5]")
    samples, _ = trainer.sample(0)
    seen, original = [], ddpo_cli.pairs.policy_step

    def recording(model, sampler, denoiser, latents, next_latents, steps, cond, guidance):
        seen.extend(int(i) for i in steps.tolist())
        return original(model, sampler, denoiser, latents, next_latents, steps, cond, guidance)

    monkeypatch.setattr(ddpo_cli.pairs, "policy_step", recording)
    trainer.update_epoch(0, samples, torch.ones(2))
    assert sorted(seen) == [0, 0, 1, 1]  # 2 samples x both window steps, nothing else


def test_reward_thread_runs_torch_with_its_own_thread_count(make_trainer):
    # a full-size torch thread team in the reward thread slows the main thread's ops ~1.7x on small CPUs
    trainer = make_trainer("log.reward_worker_threads=1")
    assert trainer.executor.submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == 2  # the main thread keeps `threads`


def test_ddpo_is_with_one_update_per_epoch_trains_exactly_like_ddpo_sf(make_trainer):
    # at ratio 1 the PPO gradient is the score-function gradient, and with one update per batch the ratio is always 1
    # (with two updates per epoch, train.batch_size=1, the weights differ: the test can fail)
    def lora_after_training(algo):
        trainer = make_trainer(f"algo={algo}", "train.num_epochs=2", "train.lr=1e-2", "seed=3")
        trainer.train()
        unet = trainer.accelerator.unwrap_model(trainer.denoiser)
        return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora" in n}

    is_weights, sf_weights = lora_after_training("ddpo_is"), lora_after_training("ddpo_sf")
    assert any(not torch.equal(w, torch.zeros_like(w)) for n, w in is_weights.items() if "lora_B" in n)
    assert all(torch.allclose(is_weights[n], sf_weights[n], atol=1e-6) for n in is_weights)
