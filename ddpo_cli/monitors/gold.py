"""A gold reward (``monitor.gold``): another reward, the one the user cares about, scored on the monitor's images.

The trained reward rising while the gold one falls is reward hacking; ``checkpoint.best_by: gold_reward`` keeps the
checkpoint the gold reward prefers.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import build, group_option
from ..errors import UserError
from ..rewards.base import score_in_batches
from .base import Drawn, Monitor


class GoldReward(Monitor):
    def __init__(self, reward: str = "aesthetic", metric: str = "reward", batch_size: int = 8) -> None:
        if batch_size < 1:
            raise UserError(f"monitor.gold.batch_size={batch_size}: use >= 1")
        self.reward_fn = build(group_option("reward", reward), "monitor.gold.reward")
        self.option, self.metric, self.batch_size = reward, metric, batch_size
        self.produces = (self.key,)

    @property
    def key(self) -> str:
        return "gold_reward" if self.metric == "reward" else f"gold_{self.metric}"

    def setup(self, device: torch.device) -> None:
        self.reward_fn.setup(device, torch.float32)

    def measure(self, drawn: Drawn) -> dict[str, float]:
        metadata = [dict(m) for m in drawn.metadata]
        rewards, info = score_in_batches(self.reward_fn, drawn.images, drawn.prompts, metadata, self.batch_size)
        values = rewards if self.metric == "reward" else info.get(self.metric)
        if values is None:
            raise UserError(f"monitor.gold.metric={self.metric!r}: reward {self.option} reports reward, "
                            f"{', '.join(sorted(info))}; choose one of them")
        return {self.key: float(np.nanmean(np.asarray(values, dtype=np.float64)))}
