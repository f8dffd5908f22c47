"""The control for comparisons: sample and score exactly like the other algorithms, never update.

Runs with the same seed draw the same prompts and initial noise each epoch, so a sweep that includes ``algo=baseline``
can subtract, seed by seed, how much of an algorithm's reward curve is only the luck of the prompt draw.
"""
from __future__ import annotations

from .base import Algorithm


class NoUpdate(Algorithm):
    rollout = "none"
    needs = ()
