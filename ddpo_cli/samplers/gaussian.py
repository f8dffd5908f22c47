"""Gaussian policy-step maths shared by every stochastic sampler (DDIM today; flow SDEs next).

Every stochastic step is ``x_next ~ N(mean, std^2 I)``. Log-probs and KLs are MEANS over the latent dimensions (a
sum overflows the PPO ratio) and are computed in fp32.
"""
from __future__ import annotations

import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _mean_over_dims(values: torch.Tensor) -> torch.Tensor:
    """``[N, ...]`` -> ``[N]``."""
    return values.mean(dim=tuple(range(1, values.ndim)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[N,C,h,w]`` sample and mean, ``[N,1,1,1]`` std -> ``[N]`` mean over dims of ``log N(x; mean, std^2)``."""
    log_prob = -((x - mean) ** 2) / (2 * std**2) - std.log() - LOG_SQRT_2PI
    return _mean_over_dims(log_prob)


def gaussian_kl(mean: torch.Tensor, base_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[N,C,h,w]`` means, ``[N,1,1,1]`` std -> ``[N]`` KL between N(mean, std^2) and N(base_mean, std^2)
    (two Gaussians with the same std: ``||mean - base_mean||^2 / (2 std^2)``, averaged over dims)."""
    return _mean_over_dims((mean - base_mean) ** 2 / (2 * std**2))


LOG_PROB_FORMS = ("exact", "unscaled")


def unscaled_log_prob(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``[N,C,h,w]`` -> ``[N]`` ``-mean((x - mean)^2)``: the Gaussian log-density without its ``1 / (2 std^2)`` scale
    and ``log std`` term (Flow-CPS's code). Its ratios do not grow as ``1 / std^2`` on near-deterministic steps;
    they are not the policy's likelihood ratios."""
    return _mean_over_dims(-((x - mean) ** 2))


def step_log_prob(form: str, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The log-prob of a stochastic step in ``form`` (``sampler.log_prob``): ``exact`` or ``unscaled``."""
    return unscaled_log_prob(x, mean) if form == "unscaled" else gaussian_log_prob(x, mean, std)
