"""DDIM sampling with per-step log-probabilities (DDPO paper, eq. for a Gaussian policy step).

The step maths re-derives diffusers' ``DDIMScheduler.step`` (diffusers >= 0.32, ``scheduling_ddim.py``) as a pure
function of tensors, changed in three ways: it takes per-sample timesteps (training evaluates many (sample, timestep)
pairs in one call), it returns the Gaussian log-density of ``x_prev`` (mean over C,H,W) and it never clips x0.
``tests/test_sampling.py`` pins it to ``DDIMScheduler.step(..., eta, variance_noise=z)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


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


def ddim_mean_std(
    model_output: torch.Tensor,   # [N, C, H, W] UNet output after CFG
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
    out = model_output.float()
    a_t, a_prev = _expand(alpha_prod_t.float(), x_t), _expand(alpha_prod_prev.float(), x_t)
    if prediction_type == "epsilon":
        eps = out
        x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x_t - (1 - a_t).sqrt() * out
        eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x_t
    elif prediction_type == "sample":
        x0 = out
        eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
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
    """One DDIM step. Returns ``(x_prev, log_prob [N], mean, std [N,1,1,1])``; all maths in fp32.

    log_prob = mean over C,H,W of log N(x_prev; mean, std^2) (the mean, not the sum: a sum overflows the PPO ratio).
    """
    if eta <= 0:
        raise ValueError("eta must be > 0 for a stochastic policy (the log-prob divides by std)")
    mean, std = ddim_mean_std(model_output, sample, alpha_prod_t, alpha_prod_prev, eta, prediction_type)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn_like(mean)
        prev_sample = mean + std * noise.float()
    prev_sample = prev_sample.detach().float()
    log_prob = -((prev_sample - mean) ** 2) / (2 * std**2) - std.log() - LOG_SQRT_2PI
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), mean, std


def guided_noise_pred(unet, latents, timesteps, cond_embeds, uncond_embeds, guidance_scale: float,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CFG as one batched UNet call: ``eps_u + w (eps_c - eps_u)``; plain conditional when ``w == 1``.

    latents ``[N,C,H,W]``, timesteps ``[N]``, cond/uncond embeds ``[N,L,D]`` -> ``[N,C,H,W]`` (fp32).
    ``dtype`` is the UNet's compute dtype (fp16/bf16 on GPU): inputs are cast to it, the output back to fp32.
    """
    if guidance_scale == 1.0:
        return unet(latents.to(dtype), timesteps, encoder_hidden_states=cond_embeds.to(dtype)).sample.float()
    both = unet(torch.cat([latents, latents]).to(dtype), torch.cat([timesteps, timesteps]),
                encoder_hidden_states=torch.cat([uncond_embeds, cond_embeds]).to(dtype)).sample.float()
    eps_uncond, eps_cond = both.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@dataclass
class Trajectory:
    """A batch of sampled denoising chains (detached). B samples, T steps."""

    latents: torch.Tensor       # [B, T, C, h, w]  x_t before each step
    next_latents: torch.Tensor  # [B, T, C, h, w]  x_{t-1} after each step
    log_probs: torch.Tensor     # [B, T]           log pi_old(x_{t-1} | x_t, c)
    timesteps: torch.Tensor     # [B, T]
    final: torch.Tensor         # [B, C, h, w]     x_0 latents (for decoding)


@torch.no_grad()
def sample_trajectory(unet, schedule: NoiseSchedule, initial_noise: torch.Tensor, cond_embeds: torch.Tensor,
                      uncond_embeds: torch.Tensor, guidance_scale: float, eta: float,
                      generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Trajectory:
    """Run the DDIM chain from ``initial_noise [B,C,h,w]`` and keep every step's latents and log-prob."""
    x = initial_noise.float()
    steps, before, after, log_probs = [], [], [], []
    for t in schedule.timesteps:
        t_batch = t.expand(x.shape[0]).to(x.device)
        eps = guided_noise_pred(unet, x, t_batch, cond_embeds, uncond_embeds, guidance_scale, dtype)
        a_t, a_prev = schedule.alphas(t_batch)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        x_prev, log_prob, _, _ = ddim_step_with_logprob(eps, x, a_t, a_prev, eta, schedule.prediction_type,
                                                        noise=noise)
        steps.append(t_batch)
        before.append(x)
        after.append(x_prev)
        log_probs.append(log_prob)
        x = x_prev
    return Trajectory(latents=torch.stack(before, 1), next_latents=torch.stack(after, 1),
                      log_probs=torch.stack(log_probs, 1), timesteps=torch.stack(steps, 1), final=x)


def sample_with_grad(unet, schedule: NoiseSchedule, initial_noise: torch.Tensor, cond_embeds: torch.Tensor,
                     uncond_embeds: torch.Tensor, guidance_scale: float, eta: float, keep_grad: list[bool],
                     generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                     checkpoint_unet: bool = True) -> torch.Tensor:
    """The DDIM chain with the autograd graph kept (reward backprop). Returns the final latents ``[B,C,h,w]``.

    ``keep_grad[i]`` says whether step i's UNet output keeps its gradient; detached outputs still pass gradient
    along the latent chain. Each kept UNet call is gradient-checkpointed when ``checkpoint_unet`` (eta may be 0).
    """
    from torch.utils.checkpoint import checkpoint

    def predict(x, t_batch):
        return guided_noise_pred(unet, x, t_batch, cond_embeds, uncond_embeds, guidance_scale, dtype)

    x = initial_noise.float()
    for i, t in enumerate(schedule.timesteps):
        t_batch = t.expand(x.shape[0]).to(x.device)
        if keep_grad[i]:
            eps = checkpoint(predict, x, t_batch, use_reentrant=False) if checkpoint_unet else predict(x, t_batch)
        else:
            with torch.no_grad():
                eps = predict(x, t_batch)
        a_t, a_prev = schedule.alphas(t_batch)
        mean, std = ddim_mean_std(eps, x, a_t, a_prev, eta, schedule.prediction_type)
        if eta > 0:
            mean = mean + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        x = mean
    return x
