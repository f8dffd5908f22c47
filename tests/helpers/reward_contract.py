"""The contract every reward keeps (``ddpo_cli/rewards/base.py``), as one function the reward tests call.

``check_contract(reward, images, prompts, metadata)`` scores a batch and asserts: one finite float per image, on the
images' device, inside the declared ``output_range``; ``input_range`` is [0, 1]; a reward declared differentiable
passes a non-zero, finite gradient back to the images, and one that is not returns values without a graph.
"""
from __future__ import annotations

import torch


def check_contract(reward, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> tuple[torch.Tensor, dict]:
    """Score ``images`` with ``reward`` and check the contract; returns ``(rewards, info)``."""
    assert tuple(reward.input_range) == (0.0, 1.0), f"{reward.name} declares input_range {reward.input_range}"
    low, high = reward.output_range
    images = images.detach().clone().requires_grad_(reward.differentiable)
    rewards, info = reward(images, prompts, metadata)
    assert rewards.shape == (images.shape[0],), f"{reward.name}: shape {tuple(rewards.shape)}"
    assert rewards.dtype == torch.float32 and rewards.device == images.device
    assert torch.isfinite(rewards).all(), f"{reward.name}: non-finite rewards {rewards.tolist()}"
    assert low is None or (rewards >= low - 1e-5).all(), f"{reward.name}: {rewards.tolist()} below {low}"
    assert high is None or (rewards <= high + 1e-5).all(), f"{reward.name}: {rewards.tolist()} above {high}"
    assert isinstance(info, dict)
    for key, values in info.items():
        assert len(values) == images.shape[0], f"{reward.name}: info[{key!r}] has {len(values)} entries"
    if reward.differentiable:
        rewards.sum().backward()
        assert images.grad is not None and torch.isfinite(images.grad).all(), f"{reward.name}: no finite gradient"
        assert images.grad.abs().sum() > 0, f"{reward.name} is declared differentiable but its gradient is zero"
    else:
        assert not rewards.requires_grad, f"{reward.name} is not declared differentiable but returns a graph"
    return rewards.detach(), info
