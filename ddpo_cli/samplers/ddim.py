"""DDIM (Song et al. 2021) as a stochastic policy with exact per-step log-probs (DDPO paper), and its inference step.

The step maths re-derives diffusers' ``DDIMScheduler.step`` (diffusers >= 0.32, ``scheduling_ddim.py``) as pure
functions of tensors, changed in three ways: it takes per-sample timesteps (training evaluates many (sample, step)
pairs in one call), it returns the Gaussian log-density of ``x_prev`` (mean over C,H,W) and it never clips x0.
``tests/test_sampling.py`` pins it to ``DDIMScheduler.step(..., eta, variance_noise=z)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from .gaussian import gaussian_log_prob
from ..errors import UserError
from .base import StochasticChain
from .window import SDEWindow


@dataclass
class NoiseSchedule:
    """What the step maths needs from a scheduler, in fp32: ``alphas_cumprod [1000]``, the alpha used after the last
    step, the timestep spacing, the prediction type and the inference timesteps ``[T]`` (descending)."""

    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float
    step_ratio: int
    prediction_type: str
    timesteps: torch.Tensor

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int, device: torch.device | str = "cpu") -> "NoiseSchedule":
        scheduler.set_timesteps(num_steps)
        return cls(
            alphas_cumprod=scheduler.alphas_cumprod.to(device=device, dtype=torch.float32),
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
            step_ratio=scheduler.config.num_train_timesteps // num_steps,
            prediction_type=scheduler.config.prediction_type,
            timesteps=scheduler.timesteps.to(device),
        )

    def alphas(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``a_t`` and ``a_prev`` for integer timesteps of any shape (prev = t - step_ratio, or the final alpha)."""
        prev = timesteps - self.step_ratio
        a_t = self.alphas_cumprod[timesteps.long()]
        a_prev = torch.where(prev >= 0, self.alphas_cumprod[prev.clamp(min=0).long()],
                             torch.full_like(a_t, self.final_alpha_cumprod))
        return a_t, a_prev


def _expand(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[N]`` -> ``[N, 1, 1, 1]`` (broadcast against ``like``)."""
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def x0_and_eps(model_output: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor,
               prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The predicted clean sample and noise from the model output (epsilon, v or sample prediction), fp32."""
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x_t - (1 - a_t).sqrt() * model_output
        eps = a_t.sqrt() * model_output + (1 - a_t).sqrt() * x_t
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return x0, eps


def ddim_mean_std(
    model_output: torch.Tensor,   # [N, C, H, W] denoiser output after CFG
    sample: torch.Tensor,         # [N, C, H, W] x_t
    alpha_prod_t: torch.Tensor,   # [N]
    alpha_prod_prev: torch.Tensor,  # [N]
    eta: float,
    prediction_type: str = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[N,C,H,W]`` and std ``[N,1,1,1]`` of the DDIM step distribution p(x_prev | x_t), in fp32.

    x0_hat = (x_t - sqrt(1-a_t) eps) / sqrt(a_t);  var = (1-a_prev)/(1-a_t) * (1 - a_t/a_prev);  std = eta sqrt(var)
    mean = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - std^2) eps
    """
    x_t = sample.float()
    a_t, a_prev = _expand(alpha_prod_t.float(), x_t), _expand(alpha_prod_prev.float(), x_t)
    x0, eps = x0_and_eps(model_output.float(), x_t, a_t, prediction_type)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return mean, std


def ddim_step_with_logprob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    alpha_prod_prev: torch.Tensor,
    eta: float,
    prediction_type: str = "epsilon",
    prev_sample: torch.Tensor | None = None,  # [N, C, H, W] given in training; drawn when None
    noise: torch.Tensor | None = None,        # [N, C, H, W] standard normal, used when prev_sample is None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DDIM step. Returns ``(x_prev, log_prob [N], mean, std [N,1,1,1])``; all maths in fp32."""
    if eta <= 0:
        raise ValueError("eta must be > 0 for a stochastic policy (the log-prob divides by std)")
    mean, std = ddim_mean_std(model_output, sample, alpha_prod_t, alpha_prod_prev, eta, prediction_type)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn_like(mean)
        prev_sample = mean + std * noise.float()
    prev_sample = prev_sample.detach().float()
    return prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std


class DDIMSampler(StochasticChain):
    """The sampler seam for DDPM-trained families (SD 1.x, SDXL): step ``i`` (0 = noisiest) goes from
    ``timesteps[i]`` to ``timesteps[i] - step_ratio``; ``eta > 0`` makes the steps of ``sde_window`` (default: all)
    stochastic policy steps, the others take the deterministic DDIM step; ``eta = 0`` is the deterministic DDIM of
    inference."""

    name = "ddim"
    model_kind = "diffusion"

    @classmethod
    def check(cls, sampler_cfg) -> None:
        super().check(sampler_cfg)
        if not 0 <= sampler_cfg.eta <= 1:
            raise UserError(f"sampler.eta={sampler_cfg.eta}: DDIM's eta is in [0, 1] (1 = DDPM-like noise, 0 = "
                            f"deterministic)")

    def __init__(self, scheduler_config: dict, num_steps: int, eta: float, device: torch.device | str = "cpu",
                 sde_window: tuple[int, int] | None = None, slide_every: int = 0) -> None:
        self.schedule = NoiseSchedule.from_scheduler(DDIMScheduler.from_config(scheduler_config), num_steps, device)
        self.eta, self.num_steps = float(eta), num_steps
        self.num_train_timesteps = len(self.schedule.alphas_cumprod)
        self.window = SDEWindow(num_steps, sde_window, slide_every)

    @classmethod
    def from_config(cls, sampler_cfg, model) -> "DDIMSampler":
        """``sampler_cfg``: conf/sampler/ddim.yaml (num_steps, eta, sde_window); ``model``: a family (its noise
        schedule)."""
        return cls(model.scheduler_config, sampler_cfg.num_steps, sampler_cfg.eta, model.device,
                   tuple(sampler_cfg.sde_window) if sampler_cfg.sde_window else None,
                   sampler_cfg.sde_window_slide_every)

    @staticmethod
    def stochastic_steps(sampler_cfg, offset: int = 0) -> list[int]:
        """The policy steps a config gives with its SDE window at ``offset`` (for checks before any model is
        loaded): the window's steps (default: all) when eta > 0."""
        return SDEWindow.from_config(sampler_cfg).steps(offset) if sampler_cfg.eta > 0 else []


    @property
    def timesteps(self) -> torch.Tensor:
        """``[T]`` the denoiser's time input at each step (integer DDPM timesteps, descending)."""
        return self.schedule.timesteps

    def model_time(self, steps: torch.Tensor) -> torch.Tensor:
        """Step indices ``[N]`` -> the denoiser's time input ``[N]``."""
        return self.schedule.timesteps[steps]

    def is_stochastic(self, i: int) -> bool:
        return self.eta > 0 and i in self.window

    def step_distribution(self, output: torch.Tensor, x_t: torch.Tensor,
                          steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``[N,C,h,w]`` and std ``[N,1,1,1]`` of the step from ``x_t`` at step indices ``steps [N]`` (fp32)."""
        a_t, a_prev = self.schedule.alphas(self.model_time(steps))
        return ddim_mean_std(output, x_t, a_t, a_prev, self.eta, self.schedule.prediction_type)

    def clean_estimate(self, output: torch.Tensor, x_t: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The clean latents ``x0_hat [N,C,h,w]`` the denoiser ``output`` implies at ``x_t`` (fp32; affine in
        ``output``)."""
        a_t, _ = self.schedule.alphas(self.model_time(steps))
        return x0_and_eps(output.float(), x_t.float(), _expand(a_t.float(), x_t), self.schedule.prediction_type)[0]

    def step(self, output: torch.Tensor, x_t: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The deterministic DDIM step (eta = 0) of inference."""
        a_t, a_prev = self.schedule.alphas(self.model_time(steps))
        return ddim_mean_std(output, x_t, a_t, a_prev, 0.0, self.schedule.prediction_type)[0]

    def training_times(self, n: int, device: torch.device | str,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """``[n]`` DDPM timesteps drawn uniformly from all training timesteps (``generator``, a CPU one, or torch's
        global generator)."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(device)

    def noisy_and_target(self, x0: torch.Tensor, noise: torch.Tensor,
                         t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward process at timesteps ``t [N]``: ``x_t = sqrt(a) x0 + sqrt(1 - a) noise`` and the regression
        target of the family's prediction type (noise, v = sqrt(a) noise - sqrt(1 - a) x0, or x0)."""
        a = _expand(self.schedule.alphas_cumprod[t], x0)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        prediction_type = self.schedule.prediction_type
        if prediction_type == "epsilon":
            return noisy, noise
        if prediction_type == "v_prediction":
            return noisy, a.sqrt() * noise - (1 - a).sqrt() * x0
        return noisy, x0
