"""GRPO-Guard (2025): Flow-GRPO's clipped ratio with the ratio re-normalised step by step.

On a Gaussian policy step the log importance ratio of a sample drawn by the old policy is, per latent dimension,

    log r = (2 (x' - mu_old) . d - ||d||^2) / (2 std^2),     d = mu_theta - mu_old,

so its mean under sampling is ``-||d||^2 / (2 std^2) = -KL(old || theta)``: negative as soon as the policy moves, and
growing as ``1/std^2`` toward the low-noise steps. The clip then acts on a biased ratio, most at the steps where
over-optimisation starts. Re-normalisation (the paper's RatioNorm) as computed here: the bias is added back,
``log r~ = log r + KL``, leaving the zero-mean part ``(x' - mu_old) . d / std^2``; and each pair's surrogate is
weighted by its step's std relative to the mean std of the update's pairs, so that steps of different noise level
give gradients of one size (the paper's gradient reweighting). With the policy at the old one (``d = 0``) this is
Flow-GRPO's loss, gradient included, up to the per-step weights.
"""
from __future__ import annotations

import torch

from ..samplers.gaussian import gaussian_kl
from .ddpo import DDPO


def guarded_ratio_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor, old_mean: torch.Tensor,
                       std: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                       adv_clip_max: float) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate on the re-normalised ratio, weighted per step. ``log_prob`` / ``old_log_prob`` /
    ``advantages`` [P], ``mean`` (with gradient) / ``old_mean`` [P,C,h,w], ``std`` [P,1,1,1]."""
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    bias = gaussian_kl(mean, old_mean.detach(), std)                  # KL(old || theta): the same std both ways
    ratio = torch.exp(log_prob - old_log_prob + bias)
    step_std = std.detach().float().flatten()
    weight = step_std / step_std.mean()
    surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))
    loss = (weight * surrogate).mean()
    with torch.no_grad():
        raw = torch.exp(log_prob - old_log_prob)
        metrics = {"ratio_mean": ratio.mean(), "raw_ratio_mean": raw.mean(),
                   "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
                   "approx_kl": bias.mean()}
    return loss, metrics


class GRPOGuard(DDPO):

    def __init__(self, name: str = "grpo_guard", clip_range: float = 1e-4, adv_clip_max: float = 5.0) -> None:
        super().__init__(name, True, clip_range, adv_clip_max)
        self.needs = ("log_prob", "old_log_prob", "mean", "old_mean", "std")

    def loss(self, log_prob, old_log_prob, mean, old_mean, std, advantages, **_) -> tuple[torch.Tensor, dict]:
        return guarded_ratio_loss(log_prob, old_log_prob, mean, old_mean, std, advantages, self.clip_range,
                                  self.adv_clip_max)
