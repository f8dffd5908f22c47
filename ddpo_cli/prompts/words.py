"""English for prompts: number words, articles, plurals (the counting prompts, LLM templates and prompt edits)."""
from __future__ import annotations

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]
IRREGULAR_PLURALS = {"mouse": "mice", "goose": "geese", "sheep": "sheep", "deer": "deer", "fish": "fish",
                     "wolf": "wolves", "person": "people", "ox": "oxen", "moose": "moose", "bison": "bison"}


def number_value(word: str) -> int | None:
    """``"3"`` / ``"three"`` (any case) -> 3: digits, or a word of :data:`NUMBER_WORDS` (zero to twelve); else None."""
    lowered = word.lower()
    if lowered.isdigit():
        return int(lowered)
    return NUMBER_WORDS.index(lowered) if lowered in NUMBER_WORDS else None


def article(word: str) -> str:
    """'a' or 'an' for ``word`` by its first letter (enough for our word lists)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def plural(noun: str) -> str:
    """English plural of a simple noun (irregulars listed; -y, -s/-x/-ch/-sh endings handled)."""
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    return noun + "s"


def singular(things: str) -> str:
    """The inverse of :func:`plural` for the nouns it makes ("cats" -> "cat", "boxes" -> "box", "mice" -> "mouse");
    a word that does not look plural is returned as it is."""
    irregular = {many: one for one, many in IRREGULAR_PLURALS.items()}
    if things in irregular:
        return irregular[things]
    if things.endswith("ies") and len(things) > 3:
        return things[:-3] + "y"
    if things.endswith(("sses", "xes", "zes", "ches", "shes")):
        return things[:-2]
    if things.endswith("s") and not things.endswith("ss"):
        return things[:-1]
    return things
