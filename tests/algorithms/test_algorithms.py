"""DDPO losses against values derived by hand."""
import math

import pytest
import torch

from ddpo_cli.algorithms.ddpo import DDPO, ppo_loss, score_function_loss


def test_ppo_loss_at_ratio_one_is_minus_mean_clamped_advantage():
    adv = torch.tensor([1.0, -2.0, 7.0])  # 7 is clamped to 5
    logp = torch.zeros(3)
    loss, metrics = ppo_loss(logp, logp, adv, clip_range=1e-4, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(-(1 - 2 + 5) / 3)
    assert metrics["approx_kl"].item() == 0 and metrics["clipfrac"].item() == 0


def test_ppo_loss_clips_by_hand():
    # ratio = e^0.1 = 1.105171, clip range 0.05 -> clipped ratio 1.05
    # A = +1: max(-1.105171, -1.05) = -1.05 ;  A = -1: max(1.105171, 1.05) = 1.105171
    logp, old = torch.tensor([0.1, 0.1]), torch.zeros(2)
    loss, metrics = ppo_loss(logp, old, torch.tensor([1.0, -1.0]), clip_range=0.05, adv_clip_max=5.0)
    assert loss.item() == pytest.approx((-1.05 + math.exp(0.1)) / 2, abs=1e-6)  # fp32
    assert metrics["clipfrac"].item() == 1.0
    assert metrics["approx_kl"].item() == pytest.approx(0.5 * 0.01)


def test_ppo_gradient_at_ratio_one_equals_score_function_gradient():
    adv = torch.tensor([0.5, -1.5, 2.0])
    logp1 = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    logp2 = logp1.detach().clone().requires_grad_(True)
    ppo_loss(logp1, logp1.detach(), adv, 1e-4, 5.0)[0].backward()
    score_function_loss(logp2, logp2.detach(), adv, 5.0)[0].backward()
    torch.testing.assert_close(logp1.grad, logp2.grad)
    torch.testing.assert_close(logp1.grad, -adv / 3)


def test_score_function_loss_by_hand():
    # -(2 * -1 + -1 * -3) / 2 = -(-2 + 3) / 2 = -0.5
    loss, _ = score_function_loss(torch.tensor([-1.0, -3.0]), torch.zeros(2), torch.tensor([2.0, -1.0]), 5.0)
    assert loss.item() == pytest.approx(-0.5)


def test_ddpo_dispatch():
    logp, adv = torch.tensor([0.2]), torch.tensor([1.0])
    assert DDPO(importance_sampling=True, clip_range=0.1).loss(logp, torch.zeros(1), adv)[0].item() == \
        pytest.approx(-1.1)
    assert DDPO(importance_sampling=False).loss(logp, torch.zeros(1), adv)[0].item() == pytest.approx(-0.2)
