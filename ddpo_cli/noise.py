"""How a batch's noise is drawn: its initial noise and the draw of every stochastic step.

A :class:`NoiseSource` gives step ``i``'s standard normal draw ``[B, C, h, w]`` (fp32), called in step order. The
strategies of a training batch (``sampler.group_size``, ``sampler.branch``, ``sampler.antithetic``) differ in what
the images of a group share:

- :class:`GroupNoise`: the initial noise (every image its own when ``group_size`` is 1); step noise is the image's;
- :class:`BranchedNoise`: also every step's noise but one trained step's, the group's branch step (TempFlow-GRPO);
- :class:`MirroredNoise`: antithetic pairs, the second image of a pair getting the negative of the first's draw at
  the trained steps and the same draw elsewhere.

Each image is still an ordinary sample of the policy. ``ddpo sample`` / ``ddpo eval`` and the paired measure draw
each image from its own generator (:func:`per_image_noise`), so an image does not depend on its batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import UserError

NoiseSource = Callable[[int], torch.Tensor]


def generator_noise(shape: tuple[int, ...], generator: torch.Generator | None, device) -> NoiseSource:
    """Draws of one generator (training: one generator per epoch and process)."""
    return lambda step=None: torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def per_image_noise(shape: tuple[int, ...], generators: list[torch.Generator], device) -> NoiseSource:
    """Draws of one CPU generator per image, so an image does not depend on its batch (``ddpo sample`` / eval)."""
    return lambda step=None: torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def branched_noise(shape: tuple[int, ...], group_size: int, branch: torch.Tensor, generator: torch.Generator | None,
                   device) -> NoiseSource:
    """Image ``b`` (of group ``b // group_size``) gets its own draw at step ``branch[b]`` and its group's shared draw
    at every other step. Both draws are made at every step (the stream does not depend on ``branch``)."""
    groups = shape[0] // group_size

    def draw(step: int) -> torch.Tensor:
        shared = torch.randn((groups, *shape[1:]), generator=generator, device=device, dtype=torch.float32)
        own = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        mine = (branch == step).reshape(-1, *([1] * (len(shape) - 1)))
        return torch.where(mine, own, shared.repeat_interleave(group_size, dim=0))

    return draw


def mirrored_noise(shape: tuple[int, ...], mirrored_steps: torch.Tensor, generator: torch.Generator | None,
                   device) -> NoiseSource:
    """Images ``2j`` and ``2j+1`` share every draw, except that at ``mirrored_steps`` (the trained steps) image
    ``2j+1`` gets the negative of image ``2j``'s draw, so a pair's rewards differ only through the trained steps'
    noise. At a step where the pair's states agree (the first trained step, after a shared initial noise) its two
    score-function terms add to ``(A(+eps) - A(-eps)) d log pi(+eps)``: the baseline cancels. At later trained steps
    it does not, so the baseline must not hold the partner's reward (:func:`ddpo_cli.advantages.group_advantages`,
    ``mirrored_pairs``)."""
    pairs = shape[0] // 2
    mirrored = {int(i) for i in mirrored_steps}

    def draw(step: int) -> torch.Tensor:
        first = torch.randn((pairs, *shape[1:]), generator=generator, device=device, dtype=torch.float32)
        second = -first if step in mirrored else first
        return torch.stack([first, second], dim=1).reshape(shape)

    return draw


@dataclass
class BatchNoise:
    """A training batch's noise: ``initial [B, C, h, w]``, the step draws, and each image's branch step ``[B]``
    (branched noise only: the one step its update trains)."""

    initial: torch.Tensor
    steps: NoiseSource
    branch: torch.Tensor | None = None


class GroupNoise:
    """Consecutive groups of ``group_size`` images share their initial noise; the step noise is each image's own."""

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def initial(self, batch: int, shape: tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor:
        noise = torch.randn((batch // self.group_size, *shape), generator=generator, device=device)
        return noise.repeat_interleave(self.group_size, dim=0)  # [B, C, h, w]

    def draw(self, batch: int, shape: tuple[int, ...], generator: torch.Generator, device,
             trained: torch.Tensor) -> BatchNoise:
        """The noise of a batch of ``batch`` images of latent ``shape``; ``trained``: this epoch's trained steps."""
        initial = self.initial(batch, shape, generator, device)
        return BatchNoise(initial, generator_noise(initial.shape, generator, device))


class BranchedNoise(GroupNoise):
    """A group also shares every step's noise but its branch step's: the trained steps in turn over the groups, from
    a random start (so the group's advantages measure that step's noise alone)."""

    def draw(self, batch: int, shape: tuple[int, ...], generator: torch.Generator, device,
             trained: torch.Tensor) -> BatchNoise:
        initial = self.initial(batch, shape, generator, device)
        groups = batch // self.group_size
        start = int(torch.randint(len(trained), (1,), generator=generator, device=generator.device))
        per_group = trained[(start + torch.arange(groups)) % len(trained)]
        branch = per_group.repeat_interleave(self.group_size).to(device)  # [B]
        return BatchNoise(initial, branched_noise(initial.shape, self.group_size, branch, generator, device), branch)


class MirroredNoise(GroupNoise):
    """Antithetic pairs inside each group: the trained steps' noise mirrored (:func:`mirrored_noise`)."""

    def draw(self, batch: int, shape: tuple[int, ...], generator: torch.Generator, device,
             trained: torch.Tensor) -> BatchNoise:
        initial = self.initial(batch, shape, generator, device)
        return BatchNoise(initial, mirrored_noise(initial.shape, trained, generator, device))


def batch_noise(sampler_cfg) -> GroupNoise:
    """The strategy of ``sampler_cfg`` (checked by :func:`check_noise`). A deterministic sampler's group would be
    ``group_size`` copies of one image: there each image of a group gets its own initial noise (the group is then
    the prompt's images, as forward-process algorithms draw them)."""
    from .samplers import stochastic_steps

    if not stochastic_steps(sampler_cfg):
        return GroupNoise(1)
    kind = BranchedNoise if sampler_cfg.branch else MirroredNoise if sampler_cfg.antithetic else GroupNoise
    return kind(sampler_cfg.group_size)


def check_noise(sampler_cfg, advantage_mode: str) -> None:
    """The strategy's settings against the advantages that compare a group's images. UserError naming the key."""
    s = sampler_cfg
    if s.branch and advantage_mode != "group":
        raise UserError(f"sampler.branch=true compares the images of a group, which differ only at one step: use "
                        f"advantage.mode=group (not {advantage_mode}) with sampler.group_size > 1")
    if s.antithetic and not (s.group_size % 2 == 0 and not s.branch and advantage_mode == "group"):
        raise UserError(f"sampler.antithetic=true pairs the images of a group (same initial noise) and takes each "
                        f"pair's baseline from the rest of its group: use an even sampler.group_size (not "
                        f"{s.group_size}), advantage.mode=group (not {advantage_mode}) and sampler.branch=false")
