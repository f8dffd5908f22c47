"""Prompt sets of the toy world: "{count word} {colour} {shape}[s]" with metadata ``{"count", "colour", "shape"}``.

The 48 combos (counts 1-4 x 4 colours x 3 shapes) are split into a training set and a fixed held-out set of 10
combos (21%). Every count, colour and shape still appears in training, so the held-out set measures whether RL
generalises to new *combinations*. (The pretrained model itself saw all 48 captions.) ``shapes_geneval`` and
``shapes_geneval_heldout`` are the same sets with GenEval metadata, for ``reward=geneval reward.detector=shapes``.
"""
from __future__ import annotations

from ..errors import UserError
from ..prompts.sets import PromptSet
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


def toy_geneval_metadata(meta: dict) -> dict:
    """Toy metadata ``{"count", "colour", "shape"}`` -> the same plus GenEval's: exactly ``count`` shapes of that
    kind, all in that colour (``include`` with the colour, ``exclude`` count + 1 as GenEval's counting prompts)."""
    count, colour, shape = meta["count"], meta["colour"], meta["shape"]
    return {**meta, "tag": "counting", "include": [{"class": shape, "count": count, "color": colour}],
            "exclude": [{"class": shape, "count": count + 1}]}


def _with_geneval(prompts: PromptSet, name: str) -> PromptSet:
    return PromptSet([(prompt, toy_geneval_metadata(meta)) for prompt, meta in prompts.items], name=name)


def shapes_geneval(low: int = 1, high: int = 4, colours: list[str] | None = None, shapes: list[str] | None = None,
                   include_heldout: bool = False) -> PromptSet:
    """The toy world's training prompts (``shapes_train``) with GenEval metadata."""
    return _with_geneval(shapes_train(low, high, colours, shapes, include_heldout), "shapes_geneval")


def shapes_geneval_heldout(low: int = 1, high: int = 4, colours: list[str] | None = None,
                           shapes: list[str] | None = None) -> PromptSet:
    """The toy world's held-out prompts (``shapes_heldout``) with GenEval metadata."""
    return _with_geneval(shapes_heldout(low, high, colours, shapes), "shapes_geneval_heldout")
