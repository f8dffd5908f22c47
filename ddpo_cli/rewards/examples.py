"""Example custom reward functions, referenced by ``conf/reward/custom.yaml`` (see docs/rewards.md).

A custom reward is any importable callable ``fn(images, prompts, metadata) -> rewards`` or ``(rewards, info)``
with ``images`` a ``[B,3,H,W]`` float tensor in [0,1]; ``FunctionReward`` wraps it.
"""
from __future__ import annotations

import torch


def brightness(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> tuple[torch.Tensor, dict]:
    """Mean pixel value of each image, in [0, 1] (differentiable): a toy reward that prefers bright images."""
    values = images.mean(dim=(1, 2, 3))  # [B]
    return values, {"brightness": values.detach().tolist()}


def darkness(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> tuple[torch.Tensor, dict]:
    """One minus the mean pixel value (differentiable): brightness's opposite, the control of a brightness claim."""
    values = 1 - images.mean(dim=(1, 2, 3))  # [B]
    return values, {"darkness": values.detach().tolist()}
