"""Advantages from rewards: per-prompt running statistics (DDPO), whole-batch statistics, or per-group (GRPO-style).

All functions take and return numpy float arrays ``[N]`` (rewards gathered from every process, in rank order).
"""
from __future__ import annotations

from collections import deque

import numpy as np

EPS = 1e-6        # DDPO's (r - mean) / (std + 1e-6): per-prompt and batch statistics
GROUP_EPS = 1e-4  # Flow-GRPO's and DanceGRPO's group normalisation: rewards equal but for float noise stay near 0


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    """``(r - mean) / (std + 1e-6)`` over the whole batch."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + EPS)


def group_advantages(rewards: np.ndarray, group_size: int, mirrored_pairs: bool = False) -> np.ndarray:
    """``(r - baseline) / (std + 1e-4)`` within consecutive groups of ``group_size`` (the k images of one prompt and
    one initial noise); NaN rewards (dropped samples) take no part and get 0.

    The baseline is the group's mean. With ``mirrored_pairs`` (``sampler.antithetic``: images ``2j`` and ``2j+1``
    mirror each other's noise) a partner's reward depends on the image's own noise, so a mean that holds it biases
    every trained step after the first; the baseline of a pair is then the mean of its group's other pairs (the
    pair's own mean when the group is one pair, which is exact at the first trained step only)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.size % group_size:
        raise ValueError(f"{rewards.size} rewards do not split into groups of {group_size}")
    groups = rewards.reshape(-1, group_size)                      # [G, k]
    valid = np.isfinite(groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        count = valid.sum(1, keepdims=True)
        values = np.where(valid, groups, 0.0)
        mean = values.sum(1, keepdims=True) / count
        std = np.sqrt((np.where(valid, groups - mean, 0.0) ** 2).sum(1, keepdims=True) / count)
        baseline = pair_baselines(values, valid) if mirrored_pairs else mean
        advantages = (groups - baseline) / (std + GROUP_EPS)
    return np.where(valid, advantages, 0.0).reshape(-1)


def pair_baselines(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``[G, k]`` rewards (0 where not ``valid``) -> each image's baseline: the mean of the valid rewards of the other
    pairs of its group, or of its own pair when no other pair has one."""
    groups, k = values.shape
    pair_sum = values.reshape(groups, k // 2, 2).sum(2)           # [G, k/2]
    pair_count = valid.reshape(groups, k // 2, 2).sum(2)
    other_sum = pair_sum.sum(1, keepdims=True) - pair_sum
    other_count = pair_count.sum(1, keepdims=True) - pair_count
    with np.errstate(invalid="ignore", divide="ignore"):
        baseline = np.where(other_count > 0, other_sum / other_count, pair_sum / pair_count)
    return baseline.repeat(2, axis=1)


class PerPromptStatTracker:
    """Per-prompt deque of the last ``buffer_size`` rewards; the current rewards join the deque before use.

    A prompt with fewer than ``min_count`` stored rewards is normalised with the current batch's statistics.
    The state round-trips through :meth:`state_dict` / :meth:`load_state_dict` (saved in checkpoints).
    """

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        prompts = np.asarray(prompts, dtype=object)
        advantages = np.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std() + EPS
        for prompt in dict.fromkeys(prompts.tolist()):  # unique, first-seen order
            mask = prompts == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buffer), np.std(buffer) + EPS
            advantages[mask] = (rewards[mask] - mean) / std
        return advantages

    def stats(self) -> dict[str, dict[str, float]]:
        return {p: {"mean": float(np.mean(b)), "std": float(np.std(b)), "count": len(b)} for p, b in self.buffers.items()}

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {p: deque(values, maxlen=self.buffer_size) for p, values in state["buffers"].items()}


def compute_advantages(mode: str, rewards: np.ndarray, prompts: list[str], tracker: PerPromptStatTracker | None,
                       group_size: int = 1, mirrored_pairs: bool = False) -> np.ndarray:
    """Dispatch on ``advantage.mode``: per_prompt | batch | group (``mirrored_pairs``: see :func:`group_advantages`).

    Non-finite rewards (samples dropped by ``train.nonfinite_rewards=drop``) get advantage 0 and take no part in any
    statistic: not in the batch's or the group's mean and std, and never in the per-prompt buffers."""
    rewards = np.asarray(rewards, dtype=np.float64)
    valid = np.isfinite(rewards)
    if mode == "group":
        return group_advantages(np.where(valid, rewards, np.nan), group_size, mirrored_pairs)
    out = np.zeros_like(rewards)
    if valid.any():
        kept = [p for p, ok in zip(prompts, valid) if ok]
        out[valid] = tracker.update(kept, rewards[valid]) if mode == "per_prompt" else batch_advantages(rewards[valid])
    return out
