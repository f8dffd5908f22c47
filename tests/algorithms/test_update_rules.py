"""The 2025-26 update rules (AWM, DiffusionNFT as published, Diffusion-DPO, GRPO-Guard, Flow-DPPO): each loss by hand
on made-up tensors, the reference term zero at the start, and gradients reaching only the trained parameters inside
the real trainer on both tiny families."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import lora_and_frozen_grads, perturb_lora
from ddpo_cli.algorithms.awm import AWM, awm_loss
from ddpo_cli.algorithms.dpo import DPO, dpo_loss, flipped_pairs, preference_pairs
from ddpo_cli.algorithms.dppo import trust_region_loss
from ddpo_cli.algorithms.grpo_guard import guarded_ratio_loss
from ddpo_cli.algorithms.nft import NFT
from ddpo_cli.old_policy import OldPolicy
from ddpo_cli.pairs import draw_forward
from ddpo_cli.samplers.gaussian import gaussian_kl, gaussian_log_prob


# ------------------------------------------------------------------------------------------ AWM
def test_awm_loss_by_hand():
    # errors: pair 0 mean((1, 3)^2) = 5, pair 1 mean((2, 0)^2) = 2; advantages clipped to [-1, 1]: (1, -1)
    prediction = torch.tensor([[1.0, 3.0], [2.0, 0.0]]).view(2, 1, 1, 2)
    loss, metrics = awm_loss(prediction, torch.zeros_like(prediction), torch.tensor([3.0, -1.0]), adv_clip_max=1.0)
    assert loss.item() == pytest.approx((5 - 2) / 2) and metrics["denoising_mse"].item() == pytest.approx(3.5)


def test_awm_with_zero_advantages_has_no_gradient():
    prediction = torch.randn(3, 2, 2, 2, requires_grad=True)
    loss, _ = AWM().loss(prediction, torch.randn(3, 2, 2, 2), torch.zeros(3))
    loss.backward()
    assert loss.item() == 0 and prediction.grad.abs().max() == 0


# ------------------------------------------------------------------------------------------ DPO
def test_dpo_loss_by_hand():
    # margin = (1 - 1.5) - (2 - 1.5) = -1; -log sigmoid(-beta/2 * -1) at beta 2 = log(1 + e^-1)
    loss = dpo_loss(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1.5]), torch.tensor([1.5]), beta=2.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    at_reference = dpo_loss(torch.tensor([0.3]), torch.tensor([0.7]), torch.tensor([0.3]), torch.tensor([0.7]), 5e3)
    assert at_reference.item() == pytest.approx(math.log(2))   # the reference term cancels: log 2 at the start


def test_preference_pairs_rank_inside_groups():
    rewards = np.array([3.0, 1.0, 2.0, 2.0, 5.0, 5.0, np.nan, 1.0])
    pairs = preference_pairs(rewards, group_size=4)
    # group 1: best 0 with worst 1; the middle two tie (2.0 = 2.0): unpaired. group 2: 6 is NaN; best 4 with worst 7
    assert pairs.tolist() == [[1, 1], [-1, -1], [0, 0], [0, 0], [3, 1], [0, 0], [0, 0], [-3, -1]]
    flipped = [flipped_pairs(pairs, np.random.default_rng(seed)) for seed in range(20)]
    assert all((f[:, 0] == pairs[:, 0]).all() and (f[:, 1] == -f[(np.arange(8) + f[:, 0]).astype(int), 1]).all()
               for f in flipped if f[:, 1].any())                 # partners kept, each pair still one up one down
    assert any((f[[0, 1], 1] == [-1, 1]).all() for f in flipped)  # and sometimes the other way round


def test_dpo_rows_of_a_pair_sum_to_the_pair_gradient():
    # row w: own output with gradient, partner's without; row l the other way: the two gradients add up to the
    # gradient of the pair's loss with both sides differentiable
    torch.manual_seed(0)
    out_w, out_l = torch.randn(1, 2, 2, 2, requires_grad=True), torch.randn(1, 2, 2, 2, requires_grad=True)
    y_w, y_l, base_w, base_l = (torch.randn(1, 2, 2, 2) for _ in range(4))
    algo = DPO(beta=50.0)
    row_w, _ = algo.loss(out_w, y_w, base_w, out_l.detach(), y_l, base_l, pairs=torch.tensor([[1.0, 1.0]]))
    row_l, _ = algo.loss(out_l, y_l, base_l, out_w.detach(), y_w, base_w, pairs=torch.tensor([[-1.0, -1.0]]))
    assert row_w.item() == pytest.approx(row_l.item())
    (row_w + row_l).backward()
    by_rows = (out_w.grad.clone(), out_l.grad.clone())
    out_w.grad, out_l.grad = None, None
    err = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
    dpo_loss(err(out_w, y_w), err(out_l, y_l), err(base_w, y_w), err(base_l, y_l), 50.0).sum().backward()
    torch.testing.assert_close(by_rows[0], out_w.grad)
    torch.testing.assert_close(by_rows[1], out_l.grad)


def test_a_pair_shares_its_noise_level_and_noise():
    class Uniform:
        def training_times(self, n, device, generator=None):
            return torch.rand(n, generator=generator)

    draws = draw_forward(Uniform(), 4, 2, (1, 2, 2), torch.Generator().manual_seed(0), "cpu",
                         partners=torch.tensor([3.0, 0.0, 0.0, -3.0]))
    assert torch.equal(draws.noise[0], draws.noise[3]) and torch.equal(draws.times[0], draws.times[3])
    assert not torch.equal(draws.noise[1], draws.noise[2])


def test_schedule_times_are_the_samplers_own_inside_the_window():
    from ddpo_cli.samplers.flow import FlowSampler

    shifted = torch.linspace(1, 0, 11) * 3 / (1 + 2 * torch.linspace(1, 0, 11))   # SD3's shift 3 on 10 steps
    sampler = FlowSampler(shifted, "flow_ode")
    draws = draw_forward(sampler, 50, 2, (1, 2, 2), torch.Generator().manual_seed(0), "cpu", window=(0, 5))
    allowed = set(sampler.timesteps[:5].tolist())
    assert set(draws.times.flatten().tolist()) == allowed  # 100 draws hit each of the first five steps' times
    uniform = draw_forward(sampler, 50, 2, (1, 2, 2), torch.Generator().manual_seed(0), "cpu")
    assert len(set(uniform.times.flatten().tolist())) == 100 and float(uniform.times.min()) < 500


# ------------------------------------------------------------------------------------------ NFT as published
def test_nft_at_the_old_policy_with_zero_advantages_has_no_gradient_and_kl_pulls_to_base():
    old, target = torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2, 2)
    prediction = old.clone().requires_grad_(True)
    loss, metrics = NFT().loss(prediction, target, old, torch.zeros(4))
    loss.backward()
    assert prediction.grad.abs().max() < 1e-6 and metrics["policy_shift"].item() == 0
    prediction.grad = None
    base = old + 1.0
    loss, metrics = NFT(kl_beta=0.5).loss(prediction, target, old, torch.zeros(4), base_prediction=base)
    assert metrics["kl_penalty"].item() == pytest.approx(1.0)  # mean (o - o_base)^2 = 1
    loss.backward()
    torch.testing.assert_close(prediction.grad, torch.full_like(old, -2 * 0.5 / old[0].numel() / 4), atol=1e-6,
                               rtol=1e-4)                         # d/do of 0.5 * mean_pairs mean_dims (o - b)^2


def test_old_policy_decay_update_and_swap_by_hand(tmp_path):
    param = torch.nn.Parameter(torch.zeros(3))
    old = OldPolicy([param], increment=0.3, max_decay=0.5)
    assert [old.decay(k) for k in (0, 1, 2, 3)] == [0.0, 0.3, 0.5, 0.5]
    with torch.no_grad():
        param.fill_(1.0)
    assert old.update() == pytest.approx(0.3)      # old = 0.3 * 0 + 0.7 * 1
    torch.testing.assert_close(old.copies[0], torch.full((3,), 0.7))
    with torch.no_grad():
        param.copy_(torch.tensor([1.0, 2.0, 3.0]))
    with old.swapped_in():
        torch.testing.assert_close(param.detach(), torch.full((3,), 0.7))
    assert param.tolist() == [1.0, 2.0, 3.0]      # back bit for bit
    old.save(tmp_path)
    again = OldPolicy([param], 0.3, 0.5)
    again.load(tmp_path)
    assert torch.equal(again.copies[0], old.copies[0]) and again.updates == 1


# ------------------------------------------------------------------------------------------ GRPO-Guard, DPPO
def test_guarded_ratio_removes_the_ratio_bias():
    # samples of the old step: the raw log-ratio's mean is -KL(old || theta) = -1/(2 * 0.5^2) * 0.25 = -0.5, the
    # re-normalised one's is 0 (Monte Carlo over 20k samples, 8 dims)
    torch.manual_seed(0)
    n, std = 20000, torch.full((20000, 1, 1, 1), 0.5)
    old_mean, mean = torch.zeros(n, 8, 1, 1), torch.full((n, 8, 1, 1), 0.5)
    x = old_mean + std * torch.randn(n, 8, 1, 1)
    log_ratio = gaussian_log_prob(x, mean, std) - gaussian_log_prob(x, old_mean, std)
    kl = gaussian_kl(mean, old_mean, std)
    assert kl[0].item() == pytest.approx(0.5)
    assert log_ratio.mean().item() == pytest.approx(-0.5, abs=0.02)
    assert (log_ratio + kl).mean().item() == pytest.approx(0.0, abs=0.02)


def test_guarded_ratio_loss_at_the_old_policy_by_hand():
    # ratio 1; weights std / mean(std) = (0.5, 1.5); loss = mean(-w A) = -(0.5 * 1 + 1.5 * -2) / 2 = 1.25
    mean = torch.zeros(2, 1, 1, 1, requires_grad=True)
    std = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    logp = gaussian_log_prob(torch.ones(2, 1, 1, 1), mean, std)
    loss, metrics = guarded_ratio_loss(logp, logp.detach(), mean, mean.detach(), std, torch.tensor([1.0, -2.0]),
                                       clip_range=0.1, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(1.25) and metrics["ratio_mean"].item() == pytest.approx(1.0)
    loss.backward()
    assert mean.grad.abs().sum() > 0


def test_trust_region_masks_only_pairs_outside_moving_on():
    # KL by hand: |d| = 1, std 1 -> 0.5 per dim. Pair 0: KL 0.5 > 0.1, A > 0, ratio > 1: masked.
    # Pair 1: KL 0.5, A < 0 with ratio > 1 (the update pulls back): kept. Pair 2: KL 0 (inside): kept.
    log_prob = torch.tensor([0.2, 0.2, 0.0], requires_grad=True)
    mean = torch.tensor([1.0, 1.0, 0.0]).view(3, 1, 1, 1)
    loss, metrics = trust_region_loss(log_prob, torch.zeros(3), mean, torch.zeros(3, 1, 1, 1), torch.ones(3, 1, 1, 1),
                                      torch.tensor([1.0, -1.0, 2.0]), kl_max=0.1, adv_clip_max=5.0)
    assert metrics["masked_fraction"].item() == pytest.approx(1 / 3)
    assert metrics["step_kl"].item() == pytest.approx(1 / 3)   # (0.5 + 0.5 + 0) / 3
    loss.backward()
    r = math.exp(0.2)
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, r / 3, -2 / 3]))


# ------------------------------------------------------------------------------------------ in the trainer
FAMILIES = {"sd": ["model=tiny"], "flow": ["model=tiny_sd3", "sampler=flow_sde"]}
RULES = {"nft": ["sampler.eta=0"], "awm": ["sampler.eta=0"], "dpo": ["sampler.group_size=2"],
         "grpo_guard": [], "dppo": []}


def _flow_ode(family, rule, overrides):
    """A deterministic sampler for the forward-process rules (any solver will do), on either family."""
    if RULES[rule] == ["sampler.eta=0"]:
        return ["sampler=flow_ode"] if family == "flow" else overrides
    return overrides


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rule", RULES)
def test_each_rule_starts_at_its_reference_and_trains_lora_only(make_trainer, family, rule):
    trainer = make_trainer(*FAMILIES[family], f"algo={rule}", *_flow_ode(family, rule, RULES[rule]),
                           "train.lr=1e-2")
    samples, _ = trainer.sample(0)
    n = len(samples.prompts)
    targets = trainer.training_targets(samples, np.array([1.0, 0.0]), 0) if rule == "dpo" else \
        torch.linspace(-1, 1, n)
    rows, cols = torch.arange(n), torch.zeros(n, dtype=torch.long)
    if trainer.algo.trains_on == "forward":
        trainer.draws = draw_forward(trainer.sampler, n, 1, trainer.model.latent_shape(),
                                     torch.Generator().manual_seed(0), trainer.device,
                                     targets[:, 0] if rule == "dpo" else None)
    else:
        cols = torch.full((n,), int(trainer.counts.trainable[0]))
    loss, metrics = trainer.algo.loss(**trainer.pair_tensors(samples, targets, rows, cols))
    start = {"dpo": ("loss", math.log(2)), "nft": ("policy_shift", 0.0), "grpo_guard": ("ratio_mean", 1.0),
             "dppo": ("step_kl", 0.0), "awm": ("kl_penalty", 0.0)}[rule]
    values = {"loss": loss, **metrics}
    assert values[start[0]].item() == pytest.approx(start[1], abs=1e-6), values
    loss.backward()
    lora, frozen = lora_and_frozen_grads(trainer)
    assert sum(g.abs().sum() for g in lora if g is not None) > 0 and all(g is None for g in frozen)


def test_dpo_reference_moves_apart_from_the_policy_after_a_change(make_trainer):
    trainer = make_trainer("algo=dpo", "sampler.group_size=2")
    samples, _ = trainer.sample(0)
    targets = trainer.training_targets(samples, np.array([1.0, 0.0]), 0)
    trainer.draws = draw_forward(trainer.sampler, 2, 1, trainer.model.latent_shape(), torch.Generator().manual_seed(0),
                                 trainer.device, targets[:, 0])
    perturb_lora(trainer)
    _, metrics = trainer.algo.loss(**trainer.pair_tensors(samples, targets, torch.arange(2), torch.zeros(2).long()))
    assert metrics["margin"].item() != 0


def test_nft_resumes_its_old_policy_exactly(tmp_path, cache_dir):
    from ddpo_cli.config import compose
    from ddpo_cli.trainer import Trainer

    def run(folder: Path, epochs: int, *extra: str):
        cfg = compose("train", ["model=tiny", "sampler.num_steps=3", "sampler.batch_size=2", "sampler.eta=0",
                                "sampler.num_batches_per_epoch=1", "train.batch_size=2", "advantage.mode=batch",
                                "log.tracker=none", "threads=2", "monitor.every=0", "algo=nft",
                                "algo.old_increment=0.3", "train.lr=1e-2", f"train.num_epochs={epochs}", *extra])
        trainer = Trainer(cfg, folder)
        trainer.setup()
        try:
            trainer.train()
            return ([p.detach().clone() for p in trainer.params], [c.clone() for c in trainer.old_policy.copies])
        finally:
            trainer.cleanup()

    whole = run(tmp_path / "whole", 3)
    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 3, f"resume={tmp_path / 'part'}")
    assert all(torch.equal(a, b) for a, b in zip(whole[0], resumed[0]))
    assert all(torch.equal(a, b) for a, b in zip(whole[1], resumed[1]))
    assert any(not torch.equal(a, b) for a, b in zip(whole[0], whole[1]))  # the old policy lags the trained one
