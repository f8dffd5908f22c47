"""Rectified-flow samplers: parity with FlowMatchEulerDiscreteScheduler, the shift by hand, the zero-noise limits, the
Gaussian log-prob, the SDE window, and a check that every stochastic sampler keeps the ODE's marginals."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ddpo_cli.config import compose, validate
from ddpo_cli.errors import UserError
from ddpo_cli.samplers import stochastic_steps
from ddpo_cli.samplers.flow import FlowSampler, flow_sigmas
from ddpo_cli.samplers.gaussian import gaussian_log_prob

SD3_SCHEDULE = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULE = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                 "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def test_static_shift_by_hand():
    # SD3 (what StableDiffusion3Pipeline gets from set_timesteps(N)): the scheduler's own range, from 1 to the
    # shifted smallest training level 3 (1/1000) / (1 + 2/1000), spaced evenly, then shifted: s' = 3 s / (1 + 2 s);
    # the chain ends at 0
    sigmas = flow_sigmas(SD3_SCHEDULE, {"num_inference_steps": 4})
    raw = np.linspace(1.0, 3 * 0.001 / (1 + 2 * 0.001), 4)
    expected = [3 * s / (1 + 2 * s) for s in raw] + [0.0]
    np.testing.assert_allclose(sigmas.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert sigmas[0].item() == pytest.approx(1.0)


def test_dynamic_shift_by_hand():
    # FLUX: custom sigmas linspace(1, 1/N, N) and mu from the image sequence length: s' = e^mu / (e^mu + 1/s - 1)
    n, mu = 5, 0.5 + (1.15 - 0.5) / (4096 - 256) * (1024 - 256)                 # 1024 tokens (512 px)
    raw = np.linspace(1.0, 1 / n, n)
    sigmas = flow_sigmas(FLUX_SCHEDULE, {"sigmas": raw, "mu": mu})
    expected = [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in raw] + [0.0]
    np.testing.assert_allclose(sigmas.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_ode_step_matches_flow_match_euler_scheduler_over_a_chain():
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULE)
    scheduler.set_timesteps(8)
    sampler = FlowSampler(flow_sigmas(SD3_SCHEDULE, {"num_inference_steps": 8}), "flow_ode")
    assert torch.equal(sampler.timesteps, scheduler.timesteps)
    gen = torch.Generator().manual_seed(0)
    ours = theirs = torch.randn(2, 4, 8, 8, generator=gen)
    worst = 0.0
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(2, 4, 8, 8, generator=gen)
        theirs = scheduler.step(v, t, theirs).prev_sample
        ours = sampler.step(v, ours, torch.full((2,), i))
        worst = max(worst, float((ours - theirs).abs().max()))
    assert worst == 0.0  # measured: identical (the same fp32 operations)
    assert not any(sampler.is_stochastic(i) for i in range(8))


@pytest.mark.parametrize("kind", ["flow_sde", "dance_sde", "flow_cps"])
def test_zero_noise_is_the_euler_step(kind):
    sigmas = flow_sigmas(SD3_SCHEDULE, {"num_inference_steps": 6})
    ode = FlowSampler(sigmas, "flow_ode")
    gen = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    for i in range(5):  # the last step of flow_cps is deterministic anyway
        steps = torch.full((3,), i)
        if kind == "flow_cps":  # algebraically identical at a = 0
            mean, std = FlowSampler(sigmas, kind, 0.0).step_distribution(v, x, steps)
            torch.testing.assert_close(mean, ode.step(v, x, steps), rtol=1e-5, atol=1e-6)
            assert float(std.abs().max()) == 0.0
        else:               # tends to it as a -> 0
            mean, std = FlowSampler(sigmas, kind, 1e-5).step_distribution(v, x, steps)
            torch.testing.assert_close(mean, ode.step(v, x, steps), rtol=1e-4, atol=1e-5)
            assert float(std.max()) < 1e-4


def test_flow_grpo_step_by_hand():
    # s = 0.5, s_next = 0.25, dt = -0.25, a = 0.7: sig = 0.7 sqrt(0.5 / 0.5) = 0.7, std = 0.7 * 0.5 = 0.35
    # mean = x (1 + 0.49 * -0.25 / 1) + v (1 + 0.49 * 0.5 / 1) * -0.25 = 0.8775 x - 0.31125 v  (x = 1, v = 2: 0.255)
    sampler = FlowSampler(torch.tensor([1.0, 0.5, 0.25, 0.0]), "flow_sde", 0.7)
    one = torch.ones(1, 1, 2, 2)
    mean, std = sampler.step_distribution(2 * one, one, torch.tensor([1]))
    assert mean.flatten()[0].item() == pytest.approx(0.255, abs=1e-6) and std.item() == pytest.approx(0.35)
    # at s = 1 the denominator 1 - s uses the second level, 0.5: sig = 0.7 sqrt(1 / 0.5)
    _, std0 = sampler.step_distribution(one, one, torch.tensor([0]))
    assert std0.item() == pytest.approx(0.7 * math.sqrt(2) * math.sqrt(0.5), abs=1e-6)
    x_next = mean + std * torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    expected = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(x_next, mean, std), expected)


@pytest.mark.parametrize("kind,noise", [("flow_sde", 0.7), ("dance_sde", 0.5)])
def test_the_sdes_keep_the_odes_marginals(kind, noise):
    # Data x0 ~ N(m, c^2) in 1-D: the exact velocity is linear, v(x, s) = -m + (s - (1 - s) c^2) / V(s) (x - (1 - s) m)
    # with V(s) = (1 - s)^2 c^2 + s^2. From x_1 ~ N(0, 1), 100 steps of either SDE must end at N(m, c^2): the score
    # correction in their mean is what keeps the marginals of the ODE.
    m, c, n = 1.5, 0.4, 40_000
    sampler = FlowSampler(torch.linspace(1, 0, 101), kind, noise)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 1, 1, generator=gen)
    for i in range(100):
        s = sampler.sigmas[i]
        v = -m + (s - (1 - s) * c**2) / ((1 - s) ** 2 * c**2 + s**2) * (x - (1 - s) * m)
        steps = torch.full((n,), i)
        if sampler.is_stochastic(i):
            mean, std = sampler.step_distribution(v, x, steps)
            x = mean + std * torch.randn(x.shape, generator=gen)
        else:
            x = sampler.step(v, x, steps)
    assert float(x.mean()) == pytest.approx(m, abs=0.02) and float(x.std()) == pytest.approx(c, abs=0.02)


def test_cps_preserves_the_coefficients_of_data_and_noise():
    # With the true x0 (a point mass at m: v = -m + (x - (1 - s) m) / s gives x0_hat = m, eps_hat = the true noise),
    # a CPS step keeps x_s = (1 - s) m + s N(0, 1) exactly at every level, whatever its noise level. (With a posterior
    # mean instead of the true x0 its fresh noise does not shrink with the step size, so unlike the SDEs it does not
    # keep a spread-out data distribution's marginals: 100 steps at a = 0.7 on N(1.5, 0.4^2) end with std 0.33.)
    m, n = 1.5, 40_000
    sampler = FlowSampler(torch.linspace(1, 0, 11), "flow_cps", 0.7)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 1, 1, generator=gen)
    for i in range(5):  # levels 1.0 -> 0.5
        v = -m + (x - (1 - sampler.sigmas[i]) * m) / sampler.sigmas[i]
        mean, std = sampler.step_distribution(v, x, torch.full((n,), i))
        x = mean + std * torch.randn(x.shape, generator=gen)
    assert float(x.mean()) == pytest.approx(0.5 * m, abs=0.01) and float(x.std()) == pytest.approx(0.5, abs=0.01)


def test_sde_window_fixed_and_sliding():
    sampler = FlowSampler(torch.linspace(1, 0, 11), "flow_sde", 0.7, sde_window=(0, 2), slide_every=3)
    assert [i for i in range(10) if sampler.is_stochastic(i)] == [0, 1]
    sampler.set_epoch(3)
    assert [i for i in range(10) if sampler.is_stochastic(i)] == [1, 2]
    sampler.set_epoch(3 * 9)  # 9 positions (0..8), so the window wraps back to the start
    assert [i for i in range(10) if sampler.is_stochastic(i)] == [0, 1]
    cps = FlowSampler(torch.linspace(1, 0, 11), "flow_cps", 0.7)
    assert cps.is_stochastic(8) and not cps.is_stochastic(9)  # the last step has no noise left


@pytest.mark.parametrize("kind", ["flow_sde", "dance_sde", "flow_cps"])
def test_the_final_step_of_every_flow_sampler_is_the_euler_step(kind):
    # issue #23: the step to s = 0 (std 0.006 on SD3's 10 steps, the chain's most sensitive log-ratio) was trained;
    # Flow-GRPO leaves it untrained (timestep_fraction 0.99); here it is the ODE step, neither noisy nor trained
    sampler = FlowSampler(torch.linspace(1, 0, 11), kind, 0.7)
    assert [i for i in range(10) if sampler.is_stochastic(i)] == list(range(9))
    cfg = compose("train", ["model=tiny_sd3", f"sampler={kind}", "sampler.num_steps=10"])
    assert stochastic_steps(cfg.sampler) == list(range(9))
    with pytest.raises(UserError, match=r"sampler.sde_window=\[9, 10\] holds no stochastic step"):
        validate(compose("train", ["model=tiny_sd3", f"sampler={kind}", "sampler.sde_window=[9,10]"]))


def test_flow_matching_forward_process_by_hand():
    sampler = FlowSampler(torch.linspace(1, 0, 11), "flow_sde")
    x0, noise = torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), -1.0)
    noisy, target = sampler.noisy_and_target(x0, noise, torch.tensor([250.0, 1000.0]))
    assert noisy.flatten().tolist() == [0.75 * 2 - 0.25, -1.0] and target.flatten().tolist() == [-3.0, -3.0]
    t = sampler.training_times(1000, "cpu")
    assert 0 <= float(t.min()) and float(t.max()) <= 1000


def test_a_ddim_sde_window_makes_only_its_steps_stochastic():
    # the same window for DDIM: steps outside it are the deterministic DDIM step (eta 0), inside it the eta step
    from ddpo_cli.samplers.ddim import DDIMSampler

    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "prediction_type": "epsilon"}
    whole = DDIMSampler(config, 10, 1.0)
    windowed = DDIMSampler(config, 10, 1.0, sde_window=(0, 3))
    assert [i for i in range(10) if whole.is_stochastic(i)] == list(range(10))
    assert [i for i in range(10) if windowed.is_stochastic(i)] == [0, 1, 2]
    sliding = DDIMSampler(config, 10, 1.0, sde_window=(0, 3), slide_every=2)
    sliding.set_epoch(4)
    assert [i for i in range(10) if sliding.is_stochastic(i)] == [2, 3, 4]


def test_the_unscaled_log_prob_of_flow_cps_by_hand():
    # issue #23: Flow-CPS's code scores a step by -(x - mean)^2 (mean over dims), without the Gaussian's 1 / (2 std^2)
    # and log std; with the exact form a step of std 0.008 moves the PPO ratio ~700x more than the first step
    sampler = FlowSampler(torch.linspace(1, 0, 11), "flow_cps", 0.7)
    mean, std = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 1, 1), 0.01)
    x = mean + torch.tensor([0.1, 0.2]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(sampler.log_prob(x, mean, std), gaussian_log_prob(x, mean, std))
    sampler.log_prob_form = "unscaled"
    torch.testing.assert_close(sampler.log_prob(x, mean, std), torch.tensor([-0.01, -0.04]))
    with pytest.raises(UserError, match="sampler.log_prob='scaled': choose exact or unscaled"):
        validate(compose("train", ["model=tiny_sd3", "sampler=flow_cps", "sampler.log_prob=scaled"]))
