"""DPOK (Fan et al. 2023): policy gradient plus ``beta * KL(p_theta || p_base)`` at every trained step.

Both step distributions are Gaussians with the same std, so the KL is closed form:
``KL = ||mean_theta - mean_base||^2 / (2 std^2)``, averaged over latent dims like the log-prob. The base is the same
denoiser with its LoRA adapter disabled (no second copy in memory). ``kl_weighting=eps`` instead uses DPOK's code
form, ``mean((out_theta - out_base)^2)`` of the denoiser outputs (uniform over timesteps).
"""
from __future__ import annotations

import torch

from ..samplers.gaussian import gaussian_kl
from .ddpo import DDPO


class DPOK(DDPO):

    def __init__(self, name: str = "dpok", importance_sampling: bool = False, clip_range: float = 1e-4,
                 adv_clip_max: float = 5.0, kl_beta: float = 0.01, kl_weighting: str = "gaussian") -> None:
        super().__init__(name, importance_sampling, clip_range, adv_clip_max)
        if kl_weighting not in ("gaussian", "eps"):
            raise ValueError(f"algo.kl_weighting={kl_weighting!r}: choose gaussian or eps")
        if kl_beta < 0:
            raise ValueError(f"algo.kl_beta={kl_beta}: must be >= 0")
        self.kl_beta, self.kl_weighting = kl_beta, kl_weighting
        extra = ("output", "base_output") if kl_weighting == "eps" else ("mean", "base_mean", "std")
        self.needs = (*self.needs, *extra)

    def kl(self, mean, base_mean, std, output=None, base_output=None) -> torch.Tensor:
        if self.kl_weighting == "eps":
            return ((output - base_output) ** 2).mean(dim=tuple(range(1, output.ndim)))
        return gaussian_kl(mean, base_mean, std)

    def loss(self, log_prob, old_log_prob, advantages, mean=None, base_mean=None, std=None, output=None,
             base_output=None, **_) -> tuple[torch.Tensor, dict]:
        policy_loss, metrics = self.policy_loss(log_prob, old_log_prob, advantages)
        kl = self.kl(mean, base_mean, std, output, base_output).mean()
        metrics = {**metrics, "kl_penalty": kl.detach(), "policy_loss": policy_loss.detach()}
        return policy_loss + self.kl_beta * kl, metrics
