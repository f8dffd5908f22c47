"""Prompt sets made at run time (``prompts=llm``) live in files of the run folder.

Such a set is built empty by the preflight (the run folder does not exist yet) and has two more methods:
``prepare(path, device, resuming)`` (training: generate the set into the file, or read it back; never regenerated
on resume) and ``load(path)`` (``ddpo sample`` / ``ddpo eval``: read a run's file, never generate).
:func:`prepare_run_sets` and :func:`load_run_set` are how the trainer and the other commands call them; the file
format (JSON: prompts, their metadata, the settings that made them and their hash) is read and written here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError, brief

FILE_FORMAT = 1
PROMPTS_FILE = "prompts.json"                  # a run's generated training prompt set
HELDOUT_PROMPTS_FILE = "prompts_heldout.json"  # a run's generated log.paired.heldout set


def made_at_run_time(prompt_set) -> bool:
    return hasattr(prompt_set, "prepare")


def prepare_run_sets(sets: list[tuple[object, str]], run_dir: Path, device, is_main: bool, wait_for_everyone,
                     resuming: bool) -> None:
    """Training: each ``(prompt set, file name)`` made at run time is generated (a fresh run) or checked (a resumed
    one) by the main process in ``run_dir``; the other processes then read the file."""
    for prompt_set, name in [(s, n) for s, n in sets if made_at_run_time(s)]:
        if is_main:
            prompt_set.prepare(Path(run_dir) / name, device, resuming=resuming)
        wait_for_everyone()
        if not is_main:
            prompt_set.prepare(Path(run_dir) / name, device, resuming=True)


def load_run_set(prompt_set, run: str | None):
    """``ddpo sample`` / ``ddpo eval``: a set made at run time is read from the run's file (or its own cache)."""
    if made_at_run_time(prompt_set):
        prompt_set.load(Path(run) / PROMPTS_FILE if run else None)
    return prompt_set


def read_prompts_file(path: Path) -> dict:
    """The content of a prompts file written by :func:`write_prompts_file`. UserError if missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"prompts file {path} not found: prompts=llm sets are made by ddpo train; give run=<a run "
                        f"trained with prompts=llm> or prompts.cache=<its prompts.json>") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"prompts file {path} cannot be read ({brief(error, 120)}): restore it from a copy, or "
                        f"start a new run to generate a new one") from None
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT or not data.get("prompts"):
        raise UserError(f"prompts file {path} is not a prompts=llm file (format {FILE_FORMAT} with prompts): give "
                        f"the prompts.json of a run trained with prompts=llm")
    problem = schema_problem(data)
    if problem:
        raise UserError(f"prompts file {path} is damaged or from another version ({problem}): restore it from a "
                        f"copy, or start a new run to generate a new one")
    return data


def schema_problem(data: dict) -> str | None:
    """What in a prompts file breaks its schema (``prompts``: a list of ``{"prompt": text, "metadata": {...}}``;
    ``settings``: a mapping), or None."""
    if not isinstance(data["prompts"], list):
        return f"'prompts' is a {type(data['prompts']).__name__}, not a list"
    for i, row in enumerate(data["prompts"]):
        if not isinstance(row, dict):
            return f"prompts[{i}] is a {type(row).__name__}, not {{prompt, metadata}}"
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            return f"prompts[{i}].prompt is {'missing' if 'prompt' not in row else repr(row['prompt'])}, not text"
        if not isinstance(row.get("metadata"), dict):
            return f"prompts[{i}].metadata is {'missing' if 'metadata' not in row else repr(row['metadata'])}, " \
                   f"not a mapping"
    if not isinstance(data.get("settings", {}), dict):
        return f"'settings' is a {type(data['settings']).__name__}, not a mapping"
    return None


def write_prompts_file(path: Path, data: dict) -> None:
    """Write ``data`` as JSON, atomically (a crash leaves the old file or none, never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, path)


# ----------------------------------------------------------------------------------------------- the prompt set
