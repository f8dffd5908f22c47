"""The books of one epoch: what it sampled and scored on this process, batch by batch, kept the same way whether the
epoch samples and then updates, or backpropagates the reward as it generates."""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .report import merge_info
from .rollout import Trajectory


@dataclass
class EpochSamples:
    """Everything one epoch sampled and scored on one process (B = samples per process)."""

    trajectory: Trajectory | None  # tensors [B, T, ...]; None for reward backprop
    prompts: list[str]
    metadata: list[dict]
    rewards: torch.Tensor        # [B]
    images: torch.Tensor         # [n, 3, H, W] the first few images (for the grid), CPU
    info: dict = field(default_factory=dict)


class EpochBooks:
    """Add each batch as it is drawn (its rewards, or the Future of a reward call in flight); :meth:`close` waits for
    the rewards and returns the epoch's :class:`EpochSamples` with the seconds spent waiting for them."""

    def __init__(self, grid_images: int) -> None:
        self.grid_images = grid_images
        self.prompts: list[str] = []
        self.metadata: list[dict] = []
        self.results: list = []            # per batch: (rewards [b], info) or a Future of it
        self.images: list[torch.Tensor] = []
        self.trajectories: list[Trajectory] = []

    def add(self, prompts: list[str], metadata: list[dict], result, images: torch.Tensor,
            trajectory: Trajectory | None = None) -> None:
        self.prompts += prompts
        self.metadata += metadata
        self.results.append(result)
        if sum(len(kept) for kept in self.images) < self.grid_images:
            self.images.append(images.detach().cpu())
        if trajectory is not None:
            self.trajectories.append(trajectory)

    def close(self, device) -> tuple[EpochSamples, float]:
        start = time.perf_counter()
        results = [r.result() if isinstance(r, Future) else r for r in self.results]
        waited = time.perf_counter() - start
        rewards = torch.cat([rewards.detach() for rewards, _ in results]).to(device)
        trajectory = Trajectory.cat(self.trajectories) if self.trajectories else None
        samples = EpochSamples(trajectory, self.prompts, self.metadata, rewards,
                               torch.cat(self.images)[: self.grid_images], merge_info([info for _, info in results]))
        return samples, waited
