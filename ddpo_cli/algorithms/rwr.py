"""Reward-weighted regression (DDPO paper baselines): the ordinary denoising loss on the collected samples,
weighted per sample.

- ``rwr``: weights ``softmax(beta * r) * N`` (mean weight 1);
- ``rwr_sparse``: keep the top ``keep_fraction`` of each batch, unweighted (weights ``mask / mean(mask)``).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Algorithm


def softmax_weights(rewards: np.ndarray, beta: float) -> np.ndarray:
    """``softmax(beta * r) * N``: exponential weights that average to 1."""
    logits = beta * np.asarray(rewards, dtype=np.float64)
    weights = np.exp(logits - logits.max())
    return weights / weights.sum() * len(weights)


def top_fraction_weights(rewards: np.ndarray, keep_fraction: float) -> np.ndarray:
    """1/keep for the top ``ceil(keep_fraction * N)`` rewards (ties broken by order), 0 for the rest."""
    rewards = np.asarray(rewards, dtype=np.float64)
    keep = max(1, int(np.ceil(keep_fraction * rewards.size)))
    mask = np.zeros_like(rewards)
    mask[np.argsort(-rewards, kind="stable")[:keep]] = 1.0
    return mask / mask.mean()


class RWR(Algorithm):
    targets = "weights"
    needs = ("errors",)

    def __init__(self, name: str = "rwr", beta: float = 0.2, sparse: bool = False, keep_fraction: float = 0.1) -> None:
        super().__init__(name)
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"algo.keep_fraction={keep_fraction}: must be in (0, 1]")
        self.beta, self.sparse, self.keep_fraction = beta, sparse, keep_fraction

    def weights(self, rewards: np.ndarray) -> np.ndarray:
        """Per-sample weights over the gathered batch of rewards ``[N]``; a non-finite reward (a sample dropped by
        ``train.nonfinite_rewards=drop``) gets weight 0 and takes no part in the others' weights."""
        rewards = np.asarray(rewards, dtype=np.float64)
        valid = np.isfinite(rewards)
        weights = np.zeros_like(rewards)
        if valid.any():
            kept = rewards[valid]
            weights[valid] = top_fraction_weights(kept, self.keep_fraction) if self.sparse else \
                softmax_weights(kept, self.beta)
        return weights

    def warnings(self, cfg, counts) -> list[str]:
        if cfg.advantage.mode != "group":
            return []
        return [f"{self.name} weights the rewards of the whole batch (its own weights, not advantages): "
                f"advantage.mode={cfg.advantage.mode} is not used"]

    def targets_from_rewards(self, rewards: np.ndarray, group_size: int) -> np.ndarray:
        return self.weights(rewards)

    def loss(self, errors: torch.Tensor, weights: torch.Tensor, **_) -> tuple[torch.Tensor, dict]:
        """``errors`` ``[N]`` per-pair mean squared denoising error; ``weights`` ``[N]`` its sample's weight."""
        loss = (weights * errors).mean()
        return loss, {"denoising_mse": errors.detach().mean(), "weight_max": weights.max()}
