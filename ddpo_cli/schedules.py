"""Learning-rate schedules as pure functions of the optimizer step, so a resumed run continues exactly."""
from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def learning_rate(base: float, schedule: str, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``: ``constant``, or ``cosine`` from
    ``base`` at step 0 down to 0 after the last step (the last update still moves: its rate is above 0)."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
