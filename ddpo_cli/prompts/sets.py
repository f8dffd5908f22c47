"""The prompt sets of word lists and files: each a finite list of ``(prompt, metadata)`` pairs, drawn uniformly.

Word lists live in ``ddpo_cli/assets``; every set is built by a function named in ``conf/prompts/*.yaml``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .words import NUMBER_WORDS, article, plural

ASSETS = Path(__file__).resolve().parent.parent / "assets"


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
