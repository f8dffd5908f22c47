"""A file of preference pairs for offline Diffusion-DPO (``algo=dpo_offline``): JSON lines of

    {"prompt": "three blue squares", "chosen": "images/0001_a.png", "rejected": "images/0001_b.png"}

Image paths are relative to the file's folder (or absolute). Every line is checked before a run starts: a bad line
is one error naming the line and what is wrong with it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import UserError

KEYS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: Path
    rejected: Path


def read_pairs_file(path: str | Path) -> list[PreferencePair]:
    """All pairs of the file; UserError for a missing file, a bad line or a missing image."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"algo.pairs_file={path}: no such file; make one (JSON lines of {', '.join(KEYS)}; "
                        f"scripts/pairs_from_samples.py makes one from ddpo sample ... reward=<name>)")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            pairs.append(parse_line(line, number, path))
    if not pairs:
        raise UserError(f"algo.pairs_file={path} holds no pairs: one JSON object per line with {', '.join(KEYS)}")
    return pairs


def parse_line(line: str, number: int, path: Path) -> PreferencePair:
    where = f"{path} line {number}"
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where} is not JSON ({exc.msg}): one object per line with {', '.join(KEYS)}") from None
    if not isinstance(entry, dict) or any(not isinstance(entry.get(key), str) for key in KEYS):
        raise UserError(f"{where}: needs the string keys {', '.join(KEYS)}")
    images = []
    for key in ("chosen", "rejected"):
        image = Path(entry[key]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise UserError(f"{where}: the {key} image {image} does not exist (paths are relative to the file's "
                            f"folder)")
        images.append(image)
    return PreferencePair(entry["prompt"], *images)


def ranked_pairs(rewards) -> list[tuple[int, int]]:
    """``(best, worst)`` index pairs of one prompt's rewards: the k-th best finite reward with the k-th worst (ties
    in index order), a pair of equal rewards left out."""
    ranked = sorted((i for i, r in enumerate(rewards) if np.isfinite(r)), key=lambda i: -rewards[i])
    pairs = [(ranked[k], ranked[-1 - k]) for k in range(len(ranked) // 2)]
    return [(best, worst) for best, worst in pairs if rewards[best] > rewards[worst]]


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """``[3, resolution, resolution]`` float in [0, 1] (resized with bicubic filtering if its size differs)."""
    try:
        image = Image.open(path).convert("RGB")
    except OSError as exc:
        raise UserError(f"cannot read image {path} ({exc}): use PNG or JPEG files") from None
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def pairs_from_samples(samples_file: str | Path, out_file: str | Path | None = None) -> Path:
    """A pairs file from the ``samples.jsonl`` of ``ddpo sample ... reward=<name>`` (a reward's judgement of a model's
    own images, as preference datasets are made): within each prompt's images the k-th best is chosen over the k-th
    worst, as online DPO pairs a group, and equal rewards make no pair. Written beside the samples (image paths
    relative to it) unless ``out_file`` is given; returns its path."""
    samples_file = Path(samples_file).expanduser()
    rows = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    if not rows or any("reward" not in row for row in rows):
        raise UserError(f"{samples_file} has no rewards: sample with a reward, e.g. ddpo sample ... reward=aesthetic")
    by_prompt: dict[str, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt"], []).append(row)
    out_file = Path(out_file) if out_file else samples_file.parent / "pairs.jsonl"
    lines = []
    for prompt, images in by_prompt.items():
        for pair in ranked_pairs([row["reward"] for row in images]):
            chosen, rejected = (_relative(samples_file.parent / images[i]["file"], out_file) for i in pair)
            lines.append(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}))
    if not lines:
        raise UserError(f"{samples_file}: every prompt's images score the same, so no pair prefers one: sample more "
                        f"images per prompt (n=8) or use a finer reward")
    out_file.write_text("\n".join(lines) + "\n")
    return out_file


def _relative(image: Path, pairs_file: Path) -> str:
    try:
        return str(image.resolve().relative_to(pairs_file.resolve().parent))
    except ValueError:
        return str(image.resolve())
