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

    @classmethod
    def from_config(cls, sampler_cfg) -> "SDEWindow":
        return cls(sampler_cfg.num_steps, tuple(sampler_cfg.sde_window) if sampler_cfg.sde_window else None,
                   sampler_cfg.sde_window_slide_every)

    def positions(self) -> int:
        """How many places the window takes (1 unless it slides): offsets ``0 .. positions - 1``."""
        if not self.slide_every:
            return 1
        return max(1, self.num_steps - (self.end - self.first) + 1 - self.first)

    def offset_at(self, epoch: int) -> int:
        return (epoch // self.slide_every) % self.positions() if self.slide_every else 0

    def set_epoch(self, epoch: int) -> None:
        self.offset = self.offset_at(epoch)

    def bounds(self, offset: int | None = None) -> tuple[int, int]:
        """The window at ``offset`` (None: at the current epoch)."""
        offset = self.offset if offset is None else offset
        return self.first + offset, self.end + offset

    def steps(self, offset: int = 0) -> list[int]:
        first, end = self.bounds(offset)
        return list(range(first, end))

    def __contains__(self, i: int) -> bool:
        first, end = self.bounds()
        return first <= i < end
