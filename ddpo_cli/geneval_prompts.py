"""Prompt sets with GenEval metadata (for ``reward=geneval``).

- :func:`geneval`: GenEval's own ``evaluation_metadata.jsonl`` (github.com/djghosh13/geneval, ``prompts/``): one JSON
  object per line, ``{"tag", "prompt", "include": [...], "exclude": [...]}``; the prompt is its ``prompt`` and its
  metadata the whole object.
- :func:`shapes_geneval`: the toy world's prompts ("three blue squares") with GenEval metadata added, so that
  ``ddpo train model=tiny_shapes prompts=shapes_geneval reward=geneval reward.detector=shapes`` trains out of the
  box; ``shapes_geneval_heldout`` is its held-out set (``log.paired.heldout=shapes_geneval_heldout``).
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .prompts import PromptSet
from .toyworld.prompts import shapes_heldout, shapes_train


def read_record(line: str, where: str) -> tuple[str, dict]:
    """One line of evaluation_metadata.jsonl -> ``(prompt, metadata)``; UserError naming ``where`` if malformed."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(f"{where} is not JSON ({error.msg}): give GenEval's evaluation_metadata.jsonl") from None
    if not (isinstance(record, dict) and isinstance(record.get("prompt"), str) and record.get("include")):
        raise UserError(f"{where} has no prompt and include list: give GenEval's evaluation_metadata.jsonl")
    return record["prompt"], record


def geneval(path: str) -> PromptSet:
    """The prompts of a GenEval ``evaluation_metadata.jsonl`` at ``path``, each with its line as metadata."""
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"prompts.path={path!r} cannot be read ({type(error).__name__}): give the path of GenEval's "
                        "prompts/evaluation_metadata.jsonl") from None
    items = [read_record(line, f"line {number} of {path}") for number, line in enumerate(lines, 1) if line.strip()]
    return PromptSet(items, name=file.stem)


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
