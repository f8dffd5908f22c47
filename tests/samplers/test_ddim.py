"""The DDIM step with log-prob: parity with diffusers, the Gaussian density, and guards."""
import pytest
import torch
from diffusers import DDIMScheduler

from ddpo_cli.models import Conditioning
from ddpo_cli.models.tiny import SCHEDULER_CONFIG
from ddpo_cli.noise import generator_noise
from ddpo_cli.rollout import run_chain
from ddpo_cli.samplers.ddim import DDIMSampler, NoiseSchedule, ddim_step_with_logprob


def make_schedule(num_steps=10, **overrides):
    scheduler = DDIMScheduler(**{**SCHEDULER_CONFIG, **overrides})
    return scheduler, NoiseSchedule.from_scheduler(scheduler, num_steps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_step_matches_diffusers_ddim_scheduler(prediction_type, eta):
    scheduler, schedule = make_schedule(10, prediction_type=prediction_type)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    for t in scheduler.timesteps:
        out, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
        expected = scheduler.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        a_t, a_prev = schedule.alphas(t.expand(3))
        mine, _, _, _ = ddim_step_with_logprob(out, x, a_t, a_prev, eta, prediction_type, noise=noise)
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-5)


def test_last_step_uses_final_alpha():
    scheduler, schedule = make_schedule(10)
    a_t, a_prev = schedule.alphas(torch.tensor([1]))  # timesteps end at 1; prev = -99 -> final alpha
    assert a_prev.item() == pytest.approx(float(scheduler.final_alpha_cumprod))
    assert a_t.item() == pytest.approx(float(scheduler.alphas_cumprod[1]))


def test_log_prob_is_gaussian_density_averaged_over_latent_dims():
    _, schedule = make_schedule(10)
    gen = torch.Generator().manual_seed(1)
    x, eps, x_prev = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    a_t, a_prev = schedule.alphas(torch.tensor([501, 301]))
    _, log_prob, mean, std = ddim_step_with_logprob(eps, x, a_t, a_prev, 1.0, prev_sample=x_prev)
    expected = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected)


def test_step_by_hand_scalar_case():
    # a_t = 0.25, a_prev = 0.5, eps = 1, x_t = 1 (every element), eta = 1:
    # x0 = (1 - sqrt(.75)) / .5 = 0.267949; var = (.5/.75)(1 - .5) = 1/3; std = 0.577350
    # mean = sqrt(.5) * 0.267949 + sqrt(1 - .5 - 1/3) * 1 = 0.189469 + 0.408248 = 0.597717
    # x_prev = mean -> log_prob = -log(std) - log(sqrt(2 pi)) = 0.549306 - 0.918939 = -0.369632
    one = torch.ones(1, 1, 2, 2)
    x_prev, log_prob, mean, std = ddim_step_with_logprob(one, one, torch.tensor([0.25]), torch.tensor([0.5]), 1.0,
                                                          prev_sample=torch.full_like(one, 0.597717))
    assert mean.flatten()[0].item() == pytest.approx(0.597717, abs=1e-6)
    assert std.item() == pytest.approx(0.577350, abs=1e-6)
    assert log_prob.item() == pytest.approx(-0.369632, abs=1e-5)


def test_eta_zero_is_refused():
    one = torch.ones(1, 1, 2, 2)
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(one, one, torch.tensor([0.25]), torch.tensor([0.5]), 0.0)


class ConstantModel:
    """A model family whose prediction is eps = 0.1 * x, conditioned on nothing: enough to check the chain's
    bookkeeping."""

    negative = Conditioning(torch.zeros(1, 3, 8))

    def predict(self, denoiser, x, t, cond, uncond, guidance):
        return 0.1 * x


def test_trajectory_chains_and_log_probs_recompute():
    _, schedule = make_schedule(5)
    sampler = DDIMSampler(SCHEDULER_CONFIG, 5, eta=1.0)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    _, traj = run_chain(ConstantModel(), sampler, None, noise, Conditioning(torch.zeros(2, 3, 8)), 5.0,
                        generator_noise(noise.shape, generator, "cpu"), record=True)
    assert traj.latents.shape == (2, 5, 4, 4, 4) and traj.log_probs.shape == (2, 5)
    torch.testing.assert_close(traj.latents[:, 1:], traj.next_latents[:, :-1])
    torch.testing.assert_close(traj.final, traj.next_latents[:, -1])
    # recomputing the log-prob of the stored step gives the stored value exactly (ratio == 1)
    t = sampler.model_time(traj.steps[:, 2])
    a_t, a_prev = schedule.alphas(t)
    _, log_prob, _, _ = ddim_step_with_logprob(0.1 * traj.latents[:, 2], traj.latents[:, 2], a_t, a_prev, 1.0,
                                               prev_sample=traj.next_latents[:, 2])
    assert torch.equal(log_prob, traj.log_probs[:, 2])
