"""The interface every reward shares.

A reward is called as ``reward(images, prompts, metadata) -> (rewards, info)``:

- ``images``: float tensor ``[B, 3, H, W]`` in ``[0, 1]`` on the trainer's device (graph kept for differentiable use);
- ``prompts``: ``list[str]`` of length B; ``metadata``: ``list[dict]`` of length B (from the prompt source);
- ``rewards``: float tensor ``[B]`` (on the images' device; differentiable w.r.t. ``images`` when ``differentiable``);
- ``info``: ``dict[str, list | tensor]`` of per-image extras (logged, never used for the update).

Every reward declares what it reads and returns (the contract test in ``tests/reward_contract.py`` checks it):

- ``input_range``: the pixel values it expects, always ``(0.0, 1.0)`` (a reward that needs another range converts);
- ``output_range``: ``(low, high)`` of the values it returns, ``None`` for an unbounded end (``mix`` with
  ``normalize: range`` maps this interval to [0, 1]; logs and docs quote it as the reward's scale);
- ``differentiable``: whether the rewards carry gradients to the images (AlignProp / DRaFT need it).

Models load lazily: the trainer calls ``setup(device, dtype)`` once before the first call; nothing is downloaded or
moved to a GPU in ``__init__``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError, brief


class Reward:
    """Base class. Subclasses set ``differentiable`` and implement ``score``; ``setup`` loads models if any."""

    differentiable: bool = False
    name: str = "reward"
    input_range: tuple[float, float] = (0.0, 1.0)
    output_range: tuple[float | None, float | None] = (None, None)

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self._ready = False

    def setup(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "Reward":
        """Load models onto ``device`` in ``dtype`` (idempotent). Called by the trainer, never by ``__init__``."""
        self.device, self.dtype = torch.device(device), dtype
        if not self._ready:
            self.load()
            self._ready = True
        return self

    def load(self) -> None:
        """Override to load models (onto ``self.device`` / ``self.dtype``)."""

    def model_parameters(self) -> int | None:
        """Parameters of the model ``load`` would load, counted without loading it (``ddpo plan``): 0 for a reward
        without a model, None when it cannot be known here."""
        return 0 if type(self).load is Reward.load else None

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> tuple[torch.Tensor, dict]:
        if not self._ready:
            self.setup(images.device)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"reward expects images [B,3,H,W], got {tuple(images.shape)}")
        if not (len(prompts) == len(metadata) == images.shape[0]):
            raise ValueError("reward needs one prompt and one metadata dict per image")
        if self.differentiable:
            rewards, info = self.score(images, prompts, metadata)
        else:
            with torch.no_grad():
                rewards, info = self.score(images.detach(), prompts, metadata)
        return self.checked(rewards, images.shape[0]), info

    def checked(self, rewards, n: int) -> torch.Tensor:
        """``rewards`` as a float tensor ``[n]``; anything else (None, text, a scalar, the wrong length) is a UserError
        naming the reward, not a traceback from deep inside the trainer."""
        numeric = torch.is_tensor(rewards) and (rewards.is_floating_point() or rewards.dtype in (torch.int32,
                                                                                             torch.int64))
        if not numeric or rewards.numel() != n:
            shown = f"a tensor of shape {tuple(rewards.shape)}" if torch.is_tensor(rewards) else type(rewards).__name__
            raise UserError(f"reward {self.name} returned {shown} for {n} images: a reward returns one number per "
                            f"image (a float tensor or list of length {n})")
        return rewards.float().reshape(-1)


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[B,3,H,W]`` -> ``[B,3,size,size]`` (area interpolation when shrinking, bilinear when enlarging)."""
    if images.shape[-2:] == (size, size):
        return images
    mode = "area" if images.shape[-1] > size else "bilinear"
    return F.interpolate(images.float(), size=(size, size), mode=mode)


class FunctionReward(Reward):
    """Wraps any callable ``fn(images, prompts, metadata) -> rewards | (rewards, info)`` as a Reward.

    This is how custom rewards plug in through ``_target_`` without subclassing.
    """

    def __init__(self, fn, differentiable: bool = False, name: str | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.differentiable = differentiable
        self.name = name or getattr(fn, "__name__", "custom")

    def score(self, images, prompts, metadata):
        try:
            out = self.fn(images, prompts, metadata)
        except UserError:
            raise
        except Exception as error:  # the user's code: one line naming it, not a traceback from inside the trainer
            raise UserError(f"reward {self.name} raised {type(error).__name__} ({brief(error)}): fix the reward; the "
                            f"checkpoints written so far are intact") from None
        rewards, info = out if isinstance(out, tuple) and len(out) == 2 else (out, {})
        try:
            rewards = torch.as_tensor(rewards, device=images.device, dtype=torch.float32)
            info = dict(info or {})
        except (TypeError, ValueError, RuntimeError):
            raise UserError(f"reward {self.name} returned {type(rewards).__name__} (info {type(info).__name__}): a "
                            f"custom reward returns one number per image, or (numbers, info dict)") from None
        return rewards, info


def score_in_batches(reward_fn, images: torch.Tensor, prompts: list[str], metadata: list[dict],
                     batch_size: int) -> tuple[list[float], dict[str, list]]:
    """Rewards ``[N]`` (a list) and every reward-info column of ``images [N,3,H,W]``, in batches of ``batch_size``
    (the paired measure, ``ddpo sample``, ``ddpo eval`` and the reward server score with it)."""
    values, info = [], {}
    for first in range(0, len(prompts), batch_size):
        rewards, extra = reward_fn(images[first:first + batch_size].to(reward_fn.device),
                                   prompts[first:first + batch_size],
                                   metadata[first:first + batch_size])
        values += rewards.detach().float().cpu().tolist()
        for key, value in extra.items():
            info.setdefault(key, []).extend(value.tolist() if torch.is_tensor(value) else list(value))
    return values, info
