"""The SDE window (MixGRPO / Flow-GRPO-Fast): only the steps ``first <= i < end`` of a chain are stochastic policy
steps (trained, with a log-prob); the others take the sampler's deterministic step. Outcomes then vary only through
the noise of the trained steps, so each sample's advantage is credited to the steps that made it."""
from __future__ import annotations


class SDEWindow:
    """Steps ``[first, end)`` of ``num_steps`` (None: all of them); ``slide_every = k > 0`` moves the window one step
    later every ``k`` epochs, from where it starts to the end of the chain, then wraps (:meth:`set_epoch`)."""

    def __init__(self, num_steps: int, window: tuple[int, int] | None = None, slide_every: int = 0) -> None:
        self.num_steps = num_steps
        self.first, self.end = tuple(window) if window is not None else (0, num_steps)
        self.slide_every, self.offset = slide_every, 0

    def set_epoch(self, epoch: int) -> None:
        if self.slide_every:
            positions = max(1, self.num_steps - (self.end - self.first) + 1 - self.first)
            self.offset = (epoch // self.slide_every) % positions

    def bounds(self) -> tuple[int, int]:
        """The window at the current epoch."""
        return self.first + self.offset, self.end + self.offset

    def __contains__(self, i: int) -> bool:
        first, end = self.bounds()
        return first <= i < end


def configured_steps(sampler_cfg) -> list[int]:
    """The window's steps at epoch 0 from a sampler config (checks before any model is loaded)."""
    first, end = sampler_cfg.sde_window or (0, sampler_cfg.num_steps)
    return list(range(first, end))
