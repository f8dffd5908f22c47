"""Minimal edits of a prompt that change its meaning: the wrong count, another colour, another object, a negation.

A caption can be close to a prompt in wording and still contradict it ("two red squares" for "three red squares").
The textual-inconsistency-aware alignment score (``rewards/alignment.py``) compares a caption with the prompt *and*
with these edits: a caption that fits an edit better than the prompt is evidence against the image.

:func:`minimal_edits` is pure text processing: word lists, no model. Each edit changes one thing:

- ``count``: the first number (word or digits, 1-12) -> every other number within ``count_span`` of it (>= 1), with
  the counted noun made singular or plural when the metadata names it (``noun``/``things``, or the toy world's
  ``shape``);
- ``colour``: each colour word -> every other colour of ``COLOURS`` (or of the ``colours`` given);
- ``object``: the metadata's object (``noun``, ``animal``, ``shape`` or ``object``) -> every other object given in
  ``objects`` (by default: the other objects of the batch, like ``clip_zero_shot``'s contrast);
- ``negation``: ``"no <rest>"``, the prompt with its leading number or article replaced by "no".
"""
from __future__ import annotations

import re

from ..prompts.words import NUMBER_WORDS, number_value, plural

EDIT_KINDS = ("count", "colour", "object", "negation")
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "gray"]
OBJECT_KEYS = ("noun", "animal", "shape", "object")
_WORD = re.compile(r"[A-Za-z]+|\d+")


def words_of(prompt: str) -> list[str]:
    """The prompt's words and numbers, in order (punctuation dropped)."""
    return _WORD.findall(prompt)


def count_value(word: str) -> int | None:
    """``"three"`` / ``"3"`` -> 3 for the counts 1-12 edits are made of; anything else -> None."""
    value = number_value(word)
    return value if value is not None and 1 <= value < len(NUMBER_WORDS) else None


def object_of(metadata: dict) -> str | None:
    """The object a prompt is about, from its metadata (None if it names none)."""
    return next((str(metadata[key]) for key in OBJECT_KEYS if metadata.get(key)), None)


def replace_word(prompt: str, old: str, new: str) -> str:
    """``prompt`` with the first whole-word occurrence of ``old`` replaced by ``new``."""
    return re.sub(rf"\b{re.escape(old)}\b", new, prompt, count=1)


def count_edits(prompt: str, metadata: dict, span: int) -> list[str]:
    """The prompt with its first number changed to each other number within ``span`` (and the noun re-inflected)."""
    number_word = next((w for w in words_of(prompt) if count_value(w) is not None), None)
    if number_word is None:
        return []
    n, noun = count_value(number_word), object_of(metadata)
    edits = []
    for m in range(max(1, n - span), min(len(NUMBER_WORDS) - 1, n + span) + 1):
        if m == n:
            continue
        edit = replace_word(prompt, number_word, str(m) if number_word.isdigit() else NUMBER_WORDS[m])
        if noun:
            singular, many = noun, metadata.get("things") or plural(noun)
            edit = replace_word(edit, many if n > 1 else singular, many if m > 1 else singular)
        edits.append(edit)
    return edits


def colour_edits(prompt: str, colours: list[str]) -> list[str]:
    """The prompt with each colour word it holds changed to each other colour of ``colours``."""
    found = [w for w in words_of(prompt) if w.lower() in colours]
    return [replace_word(prompt, word, other) for word in found for other in colours if other != word.lower()]


def object_edits(prompt: str, metadata: dict, objects: list[str]) -> list[str]:
    """The prompt with its object (from the metadata) changed to each other object, in the same number."""
    noun = object_of(metadata)
    if not noun:
        return []
    many = metadata.get("things") or plural(noun)
    edits = []
    for other in objects:
        if other == noun:
            continue
        edit = replace_word(prompt, many, plural(other)) if re.search(rf"\b{re.escape(many)}\b", prompt) else \
            replace_word(prompt, noun, other)
        if edit != prompt:
            edits.append(edit)
    return edits


def negation_edit(prompt: str) -> list[str]:
    """``"three red squares"`` -> ``"no red squares"``; ``"a cat riding a bike"`` -> ``"no cat riding a bike"``."""
    words = prompt.split()
    if not words:
        return []
    if count_value(words[0]) is not None or words[0].lower() in ("a", "an", "the", "some"):
        words = words[1:]
    return [" ".join(["no", *words])] if words else []


def minimal_edits(prompt: str, metadata: dict, kinds=EDIT_KINDS, objects: list[str] | None = None,
                  colours: list[str] | None = None, count_span: int = 2) -> list[str]:
    """Distinct meaning-changing edits of ``prompt`` (never the prompt itself), in the order of ``kinds``."""
    unknown = set(kinds) - set(EDIT_KINDS)
    if unknown:
        raise ValueError(f"unknown edit kinds {sorted(unknown)}: choose from {EDIT_KINDS}")
    made = {"count": lambda: count_edits(prompt, metadata, count_span),
            "colour": lambda: colour_edits(prompt, list(colours or COLOURS)),
            "object": lambda: object_edits(prompt, metadata, list(objects or [])),
            "negation": lambda: negation_edit(prompt)}
    edits = [edit for kind in kinds for edit in made[kind]()]
    return list(dict.fromkeys(e for e in edits if e.lower() != prompt.lower()))
