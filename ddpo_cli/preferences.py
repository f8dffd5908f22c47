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
                        f"scripts/toy_preference_pairs.py writes one for the toy world)")
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
            raise UserError(f"{where}: the {key} image {image} does not exist (paths are relative to the file's folder)")
        images.append(image)
    return PreferencePair(entry["prompt"], *images)


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """``[3, resolution, resolution]`` float in [0, 1] (resized with bicubic filtering if its size differs)."""
    try:
        image = Image.open(path).convert("RGB")
    except OSError as exc:
        raise UserError(f"cannot read image {path} ({exc}): use PNG or JPEG files") from None
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
