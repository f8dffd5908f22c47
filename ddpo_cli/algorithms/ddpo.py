"""DDPO (Black et al. 2023): score-function (REINFORCE) and importance-sampling (PPO-clip) policy gradients."""
from __future__ import annotations

import torch

from .base import Algorithm


def ppo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
             adv_clip_max: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate ``mean(max(-A r, -A clip(r, 1-c, 1+c)))`` with ``A`` clamped to ``[-adv_clip_max, +]``.

    All inputs ``[N]`` (one entry per (sample, timestep) pair). Returns the loss and per-pair diagnostics.
    """
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        metrics = {"approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean(),
                   "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
                   "ratio_mean": ratio.mean()}
    return loss, metrics


def score_function_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        adv_clip_max: float) -> tuple[torch.Tensor, dict]:
    """REINFORCE ``-mean(A log_prob)`` with the same advantage clamp; KL/clipfrac reported for comparison."""
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    loss = -(adv * log_prob).mean()
    with torch.no_grad():
        ratio = torch.exp(log_prob - old_log_prob)
        metrics = {"approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean(),
                   "clipfrac": torch.zeros((), device=log_prob.device), "ratio_mean": ratio.mean()}
    return loss, metrics


class DDPO(Algorithm):
    """``importance_sampling=True`` is DDPO-IS (PPO clip), ``False`` is DDPO-SF (score function)."""

    def __init__(self, name: str = "ddpo_is", importance_sampling: bool = True, clip_range: float = 1e-4,
                 adv_clip_max: float = 5.0) -> None:
        super().__init__(name)
        if not clip_range > 0:
            raise ValueError(f"algo.clip_range={clip_range}: must be > 0 (the PPO ratio is kept in [1 - c, 1 + c])")
        if not adv_clip_max > 0:
            raise ValueError(f"algo.adv_clip_max={adv_clip_max}: must be > 0")
        self.importance_sampling = importance_sampling
        self.clip_range, self.adv_clip_max = clip_range, adv_clip_max

    def warnings(self, cfg, counts) -> list[str]:
        if self.importance_sampling or counts.updates_per_epoch == 1:
            return []
        return [f"{self.name} has no importance weight, but each epoch's samples feed {counts.updates_per_epoch} "
                f"updates: every update after the first follows a policy that no longer sampled them (one update "
                f"per epoch: train.batch_size x train.gradient_accumulation_steps = samples per process and "
                f"train.num_inner_epochs=1; or algo=ddpo_is)"]

    def policy_loss(self, log_prob, old_log_prob, advantages) -> tuple[torch.Tensor, dict]:
        if self.importance_sampling:
            return ppo_loss(log_prob, old_log_prob, advantages, self.clip_range, self.adv_clip_max)
        return score_function_loss(log_prob, old_log_prob, advantages, self.adv_clip_max)

    def loss(self, log_prob, old_log_prob, advantages, **_) -> tuple[torch.Tensor, dict]:
        return self.policy_loss(log_prob, old_log_prob, advantages)
