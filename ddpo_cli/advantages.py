"""Advantages from rewards: per-prompt running statistics (DDPO), whole-batch statistics, or per-group (GRPO-style).

All functions take and return numpy float arrays ``[N]`` (rewards gathered from every process, in rank order).
"""
from __future__ import annotations

from collections import deque

import numpy as np

EPS = 1e-6


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    """``(r - mean) / (std + 1e-6)`` over the whole batch."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + EPS)


def group_advantages(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """Normalise within consecutive groups of ``group_size`` (the k images of one prompt and one initial noise)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.size % group_size:
        raise ValueError(f"{rewards.size} rewards do not split into groups of {group_size}")
    groups = rewards.reshape(-1, group_size)
    return ((groups - groups.mean(1, keepdims=True)) / (groups.std(1, keepdims=True) + EPS)).reshape(-1)


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
                       group_size: int = 1) -> np.ndarray:
    """Dispatch on ``advantage.mode``: per_prompt | batch | group.

    Non-finite rewards (samples dropped by ``train.nonfinite_rewards=drop``) get advantage 0 and take no part in any
    statistic: not in the batch's or the group's mean and std, and never in the per-prompt buffers."""
    rewards = np.asarray(rewards, dtype=np.float64)
    valid = np.isfinite(rewards)
    if mode == "group":
        groups, valid_groups = rewards.reshape(-1, group_size), valid.reshape(-1, group_size)
        out = np.zeros_like(groups)
        for g, (row, ok) in enumerate(zip(groups, valid_groups)):
            if ok.any():
                out[g, ok] = group_advantages(row[ok], int(ok.sum()))
        return out.reshape(-1)
    out = np.zeros_like(rewards)
    if valid.any():
        kept = [p for p, ok in zip(prompts, valid) if ok]
        out[valid] = tracker.update(kept, rewards[valid]) if mode == "per_prompt" else batch_advantages(rewards[valid])
    return out
