"""The prompt lists of text-to-image benchmarks: PartiPrompts ships with the package, DrawBench and GenEval are read
from your copy.

- **PartiPrompts** (P2, Yu et al. 2022, github.com/google-research/parti, file ``PartiPrompts.tsv``; Apache-2.0):
  1632 prompts, tab-separated columns ``Prompt``, ``Category`` (Animals, Artifacts, Arts, ..., World Knowledge),
  ``Challenge`` (Basic, Complex, Fine-grained Detail, Imagination, Linguistic Structures, Perspective, Properties &
  Positioning, Quantity, Simple Detail, Style & Format, Writing & Symbols), ``Note``. A copy ships in ``ddpo_cli/assets`` (with its
  licence, ``PartiPrompts.LICENSE``) and is the default.
- **DrawBench** (Saharia et al. 2022, the Imagen paper; published as a Google Sheet without a stated licence, so it
  is not shipped here): 200 prompts, comma-separated columns ``Prompts`` and ``Category`` (Colors, Conflicting,
  Count, DALL-E, Descriptions, Gary Marcus et al., Misspellings, Positional, Rare Words, Reddit, Text); export the
  sheet as CSV.

- **GenEval** (Ghosh et al. 2023, github.com/djghosh13/geneval, ``prompts/evaluation_metadata.jsonl``): one JSON
  object per line, ``{"tag", "prompt", "include": [...], "exclude": [...]}``; the prompt is its ``prompt`` and its
  metadata the whole object (what ``reward=geneval`` checks).

For DrawBench and GenEval give the path of your copy. A table row's other columns become the prompt's metadata;
``categories`` / ``challenges`` keep only the rows with one of the given values.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import UserError
from .sets import ASSETS, PromptSet


def read_table(path: str, delimiter: str, prompt_column: str, what: str) -> list[dict]:
    """The rows of a delimited text file with a header (``prompt_column`` required), as dicts."""
    file = Path(path).expanduser()
    file = file if file.is_file() else ASSETS / str(path)  # a bare name: a file shipped with the package
    if not file.is_file():
        raise UserError(f"{what} file '{path}' not found: download it once and give its path with prompts.path=...")
    with open(file, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter=delimiter))
    if not rows or prompt_column not in rows[0]:
        columns = ", ".join(rows[0]) if rows else "none"
        raise UserError(f"{what} file '{path}' has no '{prompt_column}' column (columns: {columns}): give the "
                        f"original {what} file")
    return rows


def keep(rows: list[dict], column: str, values: list[str] | None, what: str) -> list[dict]:
    """The rows whose ``column`` is one of ``values`` (all rows when ``values`` is empty)."""
    if not values:
        return rows
    known = sorted({row.get(column) or "" for row in rows})
    unknown = [v for v in values if v not in known]
    if unknown:
        raise UserError(f"{what} has no {column.lower()} {unknown}: choose from {known}")
    return [row for row in rows if row.get(column) in values]


def to_prompt_set(rows: list[dict], prompt_column: str, name: str) -> PromptSet:
    """Rows -> prompts (stripped, blank ones dropped) with the other non-empty columns as metadata (lower-case keys)."""
    items = [(row[prompt_column].strip(), {key.lower(): value for key, value in row.items()
                                           if key != prompt_column and key and value})
             for row in rows if (row[prompt_column] or "").strip()]
    return PromptSet(items, name=name)


def parti_prompts(path: str = "PartiPrompts.tsv", categories: list[str] | None = None,
                  challenges: list[str] | None = None) -> PromptSet:
    """PartiPrompts from ``path`` (default: the copy shipped with the package; see the module docstring)."""
    rows = read_table(path, "\t", "Prompt", "PartiPrompts")
    rows = keep(keep(rows, "Category", categories, "PartiPrompts"), "Challenge", challenges, "PartiPrompts")
    return to_prompt_set(rows, "Prompt", "parti_prompts")


def drawbench(path: str, categories: list[str] | None = None) -> PromptSet:
    """DrawBench from your CSV export of the sheet (see the module docstring)."""
    rows = keep(read_table(path, ",", "Prompts", "DrawBench"), "Category", categories, "DrawBench")
    return to_prompt_set(rows, "Prompts", "drawbench")


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
