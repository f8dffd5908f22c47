"""Prompt sets: each is a finite list of ``(prompt, metadata)`` pairs; training draws from it uniformly.

Word lists live in ``ddpo_cli/assets``. Every set is built by a function named in ``conf/prompts/*.yaml``
(``_target_``) and returns a :class:`PromptSet`.

A set made at run time (``prompts=llm``, :mod:`ddpo_cli.prompt_synthesis`) is built empty in the preflight, before
the run folder exists, and has two more methods: ``prepare(path, device, resuming)`` (``ddpo train``, once the run
folder is known: generate the set into ``<run>/prompts.json`` (PROMPTS_FILE), or read it back) and ``load(path)``
(``ddpo sample`` / ``ddpo eval``: read a run's file, never generate).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

ASSETS = Path(__file__).parent / "assets"
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]
IRREGULAR_PLURALS = {"mouse": "mice", "goose": "geese", "sheep": "sheep", "deer": "deer", "fish": "fish",
                     "wolf": "wolves", "person": "people", "ox": "oxen", "moose": "moose", "bison": "bison"}
PROMPTS_FILE = "prompts.json"                  # a run's generated training prompt set (prompts=llm)
HELDOUT_PROMPTS_FILE = "prompts_heldout.json"  # a run's generated log.paired.heldout set


@dataclass
class PromptSet:
    """A named, finite set of prompts with per-prompt metadata."""

    items: list[tuple[str, dict]]
    name: str = "prompts"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.items:
            raise UserError(f"prompt set '{self.name}' is empty: give it at least one prompt")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def prompts(self) -> list[str]:
        return [prompt for prompt, _ in self.items]

    def sample(self, n: int, rng: random.Random) -> list[tuple[str, dict]]:
        """``n`` pairs drawn uniformly with replacement using ``rng`` (deterministic given its state)."""
        return [self.items[rng.randrange(len(self.items))] for _ in range(n)]

    def draw(self, n: int, rng: random.Random, group: int = 1) -> tuple[list[str], list[dict]]:
        """A batch of ``n``: ``n / group`` prompts, each repeated ``group`` times (consecutive), and their metadata
        (copies: a reward may annotate them)."""
        pairs = [pair for pair in self.sample(n // group, rng) for _ in range(group)]
        return [p for p, _ in pairs], [dict(m) for _, m in pairs]


def read_lines(path: str | Path) -> list[str]:
    """Non-empty stripped lines of ``path``; a bare name is looked up in the package assets."""
    candidate = Path(path).expanduser()
    if not candidate.exists():
        candidate = ASSETS / str(path)
    if not candidate.exists():
        raise UserError(f"prompt file '{path}' not found: give an existing path (one prompt per line)")
    try:
        text = candidate.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompt file '{path}' is not UTF-8 text: save it as UTF-8 (one prompt per line)") from None
    except OSError as exc:
        raise UserError(f"prompt file '{path}' cannot be read ({exc.strerror})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


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


def simple_animals(file: str = "simple_animals.txt") -> PromptSet:
    """The DDPO paper's 45 common animals (aesthetic experiment)."""
    return PromptSet([(animal, {"animal": animal}) for animal in read_lines(file)], name="simple_animals")


def imagenet_animals(file: str = "imagenet_animals.txt") -> PromptSet:
    """The 398 animal classes of ImageNet-1k (classes 0-397, tench .. puffer; compressibility experiments)."""
    return PromptSet([(name, {"class": name}) for name in read_lines(file)], name="imagenet_animals")


def animal_activities(animals_file: str = "simple_animals.txt", activities_file: str = "activities.txt") -> PromptSet:
    """'{a|an} {animal} {activity}': 45 animals x 3 activities (alignment experiment)."""
    items = [(f"{article(animal)} {animal} {activity}", {"animal": animal, "activity": activity})
             for animal in read_lines(animals_file) for activity in read_lines(activities_file)]
    return PromptSet(items, name="animal_activities")


def counting(nouns_file: str = "simple_animals.txt", low: int = 1, high: int = 6) -> PromptSet:
    """'{number word} {plural noun}' for numbers ``low..high`` inclusive; metadata holds the number and noun."""
    if not 1 <= low <= high < len(NUMBER_WORDS):
        raise UserError(f"counting range {low}..{high} is invalid: need 1 <= low <= high <= {len(NUMBER_WORDS) - 1}")
    items = []
    for noun in read_lines(nouns_file):
        for number in range(low, high + 1):
            things = noun if number == 1 else plural(noun)
            items.append((f"{NUMBER_WORDS[number]} {things}", {"number": number, "noun": noun, "things": plural(noun)}))
    return PromptSet(items, name="counting")


def from_file(path: str, low: int = 0, high: int | None = None) -> PromptSet:
    """One prompt per line of ``path`` (lines ``low:high``)."""
    lines = read_lines(path)[low:high]
    return PromptSet([(line, {}) for line in lines], name=Path(path).stem)


def from_list(prompts: list[str]) -> PromptSet:
    """Prompts given inline in the config (``prompts.prompts=[a cat,a dog]``)."""
    return PromptSet([(str(p), {}) for p in prompts], name="inline")
