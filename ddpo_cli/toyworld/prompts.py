"""Prompt sets of the toy world: "{count word} {colour} {shape}[s]" with metadata ``{"count", "colour", "shape"}``.

The 48 combos (counts 1-4 x 4 colours x 3 shapes) are split into a training set and a fixed held-out set of 10
combos (21%). Every count, colour and shape still appears in training, so the held-out set measures whether RL
generalises to new *combinations*. (The pretrained model itself saw all 48 captions.)
"""
from __future__ import annotations

from ..prompts import PromptSet
from ..errors import UserError
from .render import COLOURS, COUNTS, SHAPES, caption, metadata

HELDOUT = [
    (1, "red", "triangle"), (1, "blue", "square"),
    (2, "green", "circle"), (2, "yellow", "triangle"), (2, "red", "square"),
    (3, "blue", "circle"), (3, "yellow", "square"),
    (4, "green", "triangle"), (4, "red", "circle"), (4, "blue", "triangle"),
]


def _combos(low: int, high: int, colours, shapes) -> list[tuple[int, str, str]]:
    """All ``(count, colour, shape)`` with ``low <= count <= high`` over the given colours/shapes (None = all)."""
    colours, shapes = list(colours or COLOURS), list(shapes or SHAPES)
    if not COUNTS[0] <= low <= high <= COUNTS[-1]:
        raise UserError(f"shape counts {low}..{high} are invalid: need {COUNTS[0]} <= low <= high <= {COUNTS[-1]}")
    for value, known, what in [(c, COLOURS, "colour") for c in colours] + [(s, SHAPES, "shape") for s in shapes]:
        if value not in known:
            raise UserError(f"unknown {what} '{value}' in the shapes prompt set: choose from {known}")
    return [(n, c, s) for n in range(low, high + 1) for c in colours for s in shapes]


def _prompt_set(combos, name: str) -> PromptSet:
    return PromptSet([(caption(*combo), metadata(*combo)) for combo in combos], name=name)


def shapes_train(low: int = 1, high: int = 4, colours: list[str] | None = None, shapes: list[str] | None = None,
                 include_heldout: bool = False) -> PromptSet:
    """Training prompts: the combos in the range minus :data:`HELDOUT` (38 of 48 by default)."""
    combos = [c for c in _combos(low, high, colours, shapes) if include_heldout or c not in HELDOUT]
    return _prompt_set(combos, "shapes_train")


def shapes_heldout(low: int = 1, high: int = 4, colours: list[str] | None = None,
                   shapes: list[str] | None = None) -> PromptSet:
    """Held-out prompts: the :data:`HELDOUT` combos in the range (10 by default)."""
    return _prompt_set([c for c in _combos(low, high, colours, shapes) if c in HELDOUT], "shapes_heldout")
