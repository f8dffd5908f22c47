"""A preference-pairs file from the toy world (offline Diffusion-DPO's data, ``algo=dpo_offline``): for a caption
"three blue squares" the chosen image is a rendering of three blue squares and the rejected one the same colour and
shape in another count, so that what a pair prefers is the count the caption asks for."""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from .render import COUNTS, all_combos, caption, render

PAIRS_FILE = "pairs.jsonl"


def write_preference_pairs(folder: str | Path, n: int, seed: int = 0,
                           combos: list[tuple[int, str, str]] | None = None) -> Path:
    """``n`` pairs as PNGs in ``folder/images/`` and ``folder/pairs.jsonl``; returns the file's path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        count, colour, shape = rng.choice(combos or all_combos())
        wrong = rng.choice([c for c in COUNTS if c != count])
        names = (f"images/{i:05d}_chosen.png", f"images/{i:05d}_rejected.png")
        Image.fromarray(render(count, colour, shape, rng.randrange(2 ** 31))).save(folder / names[0])
        Image.fromarray(render(wrong, colour, shape, rng.randrange(2 ** 31))).save(folder / names[1])
        lines.append(json.dumps({"prompt": caption(count, colour, shape), "chosen": names[0], "rejected": names[1]}))
    path = folder / PAIRS_FILE
    path.write_text("\n".join(lines) + "\n")
    return path
