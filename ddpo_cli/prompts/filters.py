"""Reading and filtering the prompts an LLM writes (``prompts=llm``): one per line, the user's rules, de-duplication
exactly and by meaning (cosine similarity of mean-pooled sentence embeddings)."""
from __future__ import annotations

import re
from collections import Counter

import torch
import torch.nn.functional as F
import transformers

from ..errors import UserError, loading
from .words import number_value, singular

LEADER = re.compile(r"^\s*(?:[-*+•]+|\(?\d+\s*[.):\]]|#\d+:?|prompt\s*\d*\s*:)\s*", re.IGNORECASE)
QUOTES = "\"'`“”‘’*"
SLOT = re.compile(r"\{(\w+)\}")


def parse_lines(reply: str) -> list[str]:
    """The prompts of an LLM reply, one per line: leading numbering (``1.``, ``2)``, ``(3)``, ``#4``, ``Prompt 5:``),
    bullets and surrounding quotes or ``**`` stripped; empty lines and headings (ending in ``:``) dropped."""
    prompts = []
    for line in reply.splitlines():
        text = LEADER.sub("", line.strip()).strip().strip(QUOTES).strip()
        if text and not text.endswith(":"):
            prompts.append(text)
    return prompts


def normalise(prompt: str) -> str:
    """The key of exact de-duplication: lower case, single spaces, no final ``.``/``!``."""
    return " ".join(prompt.lower().split()).rstrip(".!")


def slot_value(text: str) -> int | str:
    """A slot's value: digits or a number word (``zero`` .. ``twelve``) become an int, anything else stays text."""
    value = number_value(text)
    return text if value is None else value


class Template:
    """A prompt pattern with named slots, ``"{number} {things}"``: parses prompts into slot values and fills slots.

    Metadata of a parsed prompt is ``{slot: value}`` (numbers as ints); with slots ``number`` and ``things`` it also
    gets ``noun`` (the singular), the keys of the counting reward."""

    def __init__(self, text: str) -> None:
        self.text, self.slots = text, SLOT.findall(text)
        if not self.slots or len(set(self.slots)) != len(self.slots):
            raise UserError(f"prompts.template={text!r}: name each slot once in braces, e.g. '{{number}} {{things}}'")
        parts = re.split(r"\{\w+\}", text)
        pattern = re.escape(parts[0]) + "".join(f"(?P<{slot}>.+?)" + re.escape(literal)
                                                for slot, literal in zip(self.slots, parts[1:]))
        self.pattern = re.compile(pattern, re.IGNORECASE)

    def parse(self, prompt: str) -> dict | None:
        """``{slot: value}`` of a prompt of this form; None when it does not have the form."""
        match = self.pattern.fullmatch(prompt.strip().rstrip(".!"))
        if match is None:
            return None
        values = {slot: slot_value(match.group(slot).strip()) for slot in self.slots}
        if isinstance(values.get("number"), int) and isinstance(values.get("things"), str) and "noun" not in values:
            values["noun"] = singular(values["things"].lower())
        return values

    def fill(self, line: str) -> str | None:
        """The prompt of a reply line of slot values separated by ``|`` (None when the count is wrong)."""
        values = [value.strip().strip(QUOTES).strip() for value in line.split("|")]
        if len(values) != len(self.slots) or not all(values):
            return None
        return self.text.format(**dict(zip(self.slots, values)))


def has_word(text: str, word: str) -> bool:
    """Whether ``word`` (or a phrase) occurs in ``text`` as whole words, ignoring case."""
    return re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", text, re.IGNORECASE) is not None


class Rules:
    """The user's filters: word counts, required words (all or any), forbidden words, the template's form."""

    def __init__(self, min_words: int = 1, max_words: int | None = None, required_words: list[str] = (),
                 require: str = "all", forbidden_words: list[str] = (), template: Template | None = None) -> None:
        self.min_words, self.max_words, self.template = min_words, max_words, template
        self.required_words, self.require, self.forbidden_words = list(required_words), require, list(forbidden_words)

    def rejects(self, prompt: str) -> str | None:
        """Why ``prompt`` breaks a rule (``"too short"``, ...), or None when it passes them all."""
        words = len(prompt.split())
        if words < self.min_words:
            return "too short"
        if self.max_words is not None and words > self.max_words:
            return "too long"
        found = [has_word(prompt, word) for word in self.required_words]
        if found and not (all(found) if self.require == "all" else any(found)):
            return "missing a required word"
        if any(has_word(prompt, word) for word in self.forbidden_words):
            return "a forbidden word"
        if self.template is not None and self.template.parse(prompt) is None:
            return "not of the template"
        return None


class Embedder:
    """Sentence embeddings from a ``transformers`` encoder (hub id or local folder): token states mean-pooled over
    the attention mask, unit length; ``embedder(texts) -> [N, D]`` float32 on the CPU."""

    def __init__(self, model: str, device: torch.device, batch_size: int = 64) -> None:
        with loading(f"the embedding model {model!r}", "give a hub id or local folder of a transformers encoder as "
                     "prompts.embedding_model, or turn near-duplicate removal off with "
                     "prompts.near_duplicate_threshold=null"):
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model)
            self.model = transformers.AutoModel.from_pretrained(model).to(device).eval().requires_grad_(False)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=128, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()            # [b, L, D]
            mask = batch["attention_mask"].unsqueeze(-1).float()              # [b, L, 1]
            chunks.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1).cpu())
        return torch.cat(chunks)


class Deduplicator:
    """Remembers the prompts kept so far and drops a new one that equals one of them (after :func:`normalise`) or,
    given ``embed`` and ``threshold``, whose embedding's cosine similarity to one of them exceeds ``threshold``."""

    def __init__(self, threshold: float | None = None, embed=None) -> None:
        self.threshold, self.embed = threshold, embed
        self.seen: set[str] = set()
        self.kept: torch.Tensor | None = None  # [K, D] unit embeddings of the prompts kept

    def keep(self, prompts: list[str]) -> tuple[list[str], Counter]:
        """The prompts to keep, in order, and the count of each reason to drop one."""
        dropped, fresh = Counter(), []
        for prompt in prompts:
            key = normalise(prompt)
            if key in self.seen:
                dropped["duplicate"] += 1
            else:
                self.seen.add(key)
                fresh.append(prompt)
        if self.threshold is None or not fresh:
            return fresh, dropped
        kept = []
        for prompt, vector in zip(fresh, self.embed(fresh)):
            if self.kept is not None and float((self.kept @ vector).max()) > self.threshold:
                dropped["near duplicate"] += 1
                continue
            self.kept = vector[None] if self.kept is None else torch.cat([self.kept, vector[None]])
            kept.append(prompt)
        return kept, dropped


# ----------------------------------------------------------------------------------------------- language models
