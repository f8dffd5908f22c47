"""Flow-DPPO: the policy gradient with a trust region on the exact per-step KL instead of PPO's ratio clip.

Each trained step is a Gaussian, so ``KL(theta || old) = ||mu_theta - mu_old||^2 / (2 std^2)`` (mean over latent
dimensions) is exact, where the ratio of one sample is a noisy estimate of it. A pair leaves the trust region when
its KL exceeds ``kl_max``; it then stops pulling further (its gradient is masked) if its update would move the ratio
on in its advantage's direction (``A (r - 1) > 0``), as PPO's clip does, and keeps pulling back otherwise:

    loss = -mean( A r m ),    m = 0 where KL > kl_max and A (r - 1) > 0, else 1

At the first update of a batch (``theta = old``) the KL is 0 and this is the plain importance-sampled policy
gradient.
"""
from __future__ import annotations

import torch

from ..samplers.gaussian import gaussian_kl
from .ddpo import DDPO


def trust_region_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor, old_mean: torch.Tensor,
                      std: torch.Tensor, advantages: torch.Tensor, kl_max: float,
                      adv_clip_max: float) -> tuple[torch.Tensor, dict]:
    """``-mean(A r m)`` with the KL mask ``m`` above. [P] tensors, ``mean`` / ``old_mean`` [P,C,h,w], ``std``
    [P,1,1,1]."""
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    kl = gaussian_kl(mean.detach(), old_mean.detach(), std.detach())
    outside = (kl > kl_max) & (adv * (ratio.detach() - 1.0) > 0)
    loss = -(adv * ratio * (~outside).float()).mean()
    with torch.no_grad():
        metrics = {"ratio_mean": ratio.mean(), "step_kl": kl.mean(), "masked_fraction": outside.float().mean(),
                   "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean()}
    return loss, metrics


class DPPO(DDPO):

    def __init__(self, name: str = "dppo", kl_max: float = 1e-4, adv_clip_max: float = 5.0) -> None:
        super().__init__(name, True, 1.0, adv_clip_max)
        if not kl_max > 0:
            raise ValueError(f"algo.kl_max={kl_max}: must be > 0 (the trust region's per-step KL)")
        self.kl_max = kl_max
        self.needs = ("log_prob", "old_log_prob", "mean", "old_mean", "std")

    def loss(self, log_prob, old_log_prob, mean, old_mean, std, advantages, **_) -> tuple[torch.Tensor, dict]:
        return trust_region_loss(log_prob, old_log_prob, mean, old_mean, std, advantages, self.kl_max,
                                 self.adv_clip_max)
