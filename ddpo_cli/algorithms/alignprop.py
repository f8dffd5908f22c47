"""AlignProp (Prabhudesai et al. 2023) and DRaFT-K (Clark et al. 2023): backpropagate the reward through the
sampling chain into the LoRA weights.

Which steps keep the gradient of their UNet call (a detached UNet output still passes gradient along the latent
chain, as in the paper's code):

- ``per_step_random``: step i (0 = noisiest) keeps it with probability (i+1)/(T+1), a fresh draw per step (the
  paper's code); the last step always keeps it, so a batch never ends without gradient;
- ``last_k``: the last ``k`` steps (DRaFT-K; ``k=1`` is the cheapest);
- ``random_last_k``: the last K steps with K drawn uniformly from [``k_min``, ``k``] once per batch (AlignProp v2);
- ``fixed``: exactly the step indices in ``keep_steps``.
"""
from __future__ import annotations

import random

import torch

from ..errors import UserError
from .base import Algorithm

TRUNCATIONS = ("per_step_random", "last_k", "random_last_k", "fixed")


def steps_with_gradient(mode: str, num_steps: int, rng: random.Random, k: int = 1, k_min: int = 1,
                        keep_steps: list[int] | None = None) -> list[bool]:
    """``[T]`` flags: does step i keep the gradient of its UNet call."""
    if mode == "per_step_random":
        keep = [rng.randint(0, num_steps) <= i for i in range(num_steps)]
        keep[-1] = True
        return keep
    if mode == "last_k":
        return [i >= num_steps - k for i in range(num_steps)]
    if mode == "random_last_k":
        drawn = rng.randint(k_min, k)
        return [i >= num_steps - drawn for i in range(num_steps)]
    if mode == "fixed":
        return [i in set(keep_steps or []) for i in range(num_steps)]
    raise ValueError(f"unknown truncation {mode!r}")


def check_truncation(mode: str, num_steps: int, k: int, k_min: int, keep_steps: list[int]) -> str | None:
    """A message if the truncation settings leave a batch with no gradient or point outside the chain."""
    if mode not in TRUNCATIONS:
        return f"algo.truncation={mode!r}: choose one of {', '.join(TRUNCATIONS)}"
    if mode in ("last_k", "random_last_k") and not 1 <= k <= num_steps:
        return f"algo.k={k} with sampler.num_steps={num_steps}: need 1 <= k <= num_steps"
    if mode == "random_last_k" and not 1 <= k_min <= k:
        return f"algo.k_min={k_min}: need 1 <= k_min <= k={k}"
    if mode == "fixed":
        if not keep_steps:
            return "algo.truncation=fixed needs algo.keep_steps, e.g. [49] (a batch must keep some gradient)"
        if any(not 0 <= s < num_steps for s in keep_steps):
            return f"algo.keep_steps={list(keep_steps)}: every step index must be in [0, {num_steps - 1}]"
    return None


class AlignProp(Algorithm):
    rollout = "backprop"
    needs = ()

    def __init__(self, name: str = "alignprop", truncation: str = "per_step_random", k: int = 1, k_min: int = 1,
                 keep_steps: list[int] | None = None, loss: str = "neg_reward", target: float = 10.0,
                 loss_scale: float = 1.0, checkpoint_unet: bool = True) -> None:
        super().__init__(name)
        if loss not in ("neg_reward", "distance_to_target"):
            raise ValueError(f"algo.loss={loss!r}: choose neg_reward or distance_to_target")
        self.truncation, self.k, self.k_min, self.keep_steps = truncation, k, k_min, list(keep_steps or [])
        self.loss_form, self.target, self.loss_scale = loss, target, loss_scale
        self.checkpoint_unet = checkpoint_unet

    def check(self, cfg, reward) -> None:
        """The truncation must leave some gradient, eta may be 0, and the reward must be differentiable."""
        if cfg.sampler.eta < 0:
            raise UserError(f"sampler.eta={cfg.sampler.eta}: must be >= 0")
        problem = check_truncation(self.truncation, cfg.sampler.num_steps, self.k, self.k_min, self.keep_steps)
        if problem:
            raise UserError(problem)
        if not getattr(reward, "differentiable", False):
            raise UserError(f"reward {cfg.reward._target_} is not differentiable, so {self.name} cannot "
                            f"backpropagate it: choose a differentiable reward (aesthetic, clip_score, ...) or a "
                            f"sample-based algo (ddpo_is, rwr, dpok)")

    def steps_with_gradient(self, num_steps: int, rng: random.Random) -> list[bool]:
        return steps_with_gradient(self.truncation, num_steps, rng, self.k, self.k_min, self.keep_steps)

    def loss(self, rewards: torch.Tensor, **_) -> tuple[torch.Tensor, dict]:
        """``rewards`` ``[B]`` with graph -> ``loss_scale * mean(-r)`` or ``loss_scale * mean(|r - target|)``."""
        per_sample = -rewards if self.loss_form == "neg_reward" else (rewards - self.target).abs()
        return self.loss_scale * per_sample.mean(), {}
