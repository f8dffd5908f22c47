"""Procedural images of simple shapes: the toy world's "dataset".

An image is ``SIZE x SIZE`` RGB (uint8, ``[H, W, 3]``) on a black background with 1-4 non-overlapping copies of
one shape (circle, square, triangle) in one palette colour (red, green, blue, yellow). Its caption is
``"{count word} {colour} {shape}[s]"``, e.g. ``"one red circle"``, ``"three blue squares"``, and its metadata is
``{"count": int, "colour": str, "shape": str}``. Everything is deterministic given a seed.
"""
from __future__ import annotations

import random

import numpy as np

from ..prompts.words import NUMBER_WORDS

SIZE = 32
BACKGROUND = (0, 0, 0)
PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
COLOURS = list(PALETTE)
SHAPES = ["circle", "square", "triangle"]
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
COUNTS = list(COUNT_WORDS)
MIN_SIDE, MAX_SIDE = 7, 11   # bounding-box side of one shape, in pixels
GAP = 2                      # minimum empty pixels between two shapes' bounding boxes (and to the border: 1)


def caption(count: int, colour: str, shape: str) -> str:
    """``(3, "blue", "square") -> "three blue squares"`` (any count 1-12: the toy world's captioner writes more than
    the 1-4 the world draws)."""
    return f"{NUMBER_WORDS[count]} {colour} {shape}{'s' if count > 1 else ''}"


def metadata(count: int, colour: str, shape: str) -> dict:
    """The metadata dict that travels with a caption (used by the counting reward)."""
    return {"count": count, "colour": colour, "shape": shape}


def all_combos() -> list[tuple[int, str, str]]:
    """Every ``(count, colour, shape)`` the world can draw: 4 x 4 x 3 = 48, in a fixed order."""
    return [(n, c, s) for n in COUNTS for c in COLOURS for s in SHAPES]


def shape_mask(shape: str, height: int, width: int | None = None) -> np.ndarray:
    """Boolean ``[height, width]`` mask of ``shape`` filling its bounding box (triangle: apex up).

    Rendering uses square boxes (``width = height``); the detector stretches the same masks to a region's box.
    """
    width = width or height
    y, x = np.meshgrid(np.arange(height) + 0.5 - height / 2, np.arange(width) + 0.5 - width / 2,
                       indexing="ij")                               # pixel centres relative to the box centre
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "circle":                                           # ellipse; all values exact in float
        return (x * height) ** 2 + (y * width) ** 2 <= (height * width / 2) ** 2
    if shape == "triangle":                                         # half-width 0 at the top, width/2 at the bottom
        return np.abs(x) * height <= ((y + height / 2) / 2 + 0.25) * width
    raise ValueError(f"unknown shape '{shape}': choose one of {SHAPES}")


def _place(sides: list[int], rng: random.Random, size: int, tries: int = 200) -> list[tuple[int, int]] | None:
    """Top-left corners for boxes of ``sides`` with ``GAP`` pixels between boxes, or None if placement failed."""
    corners: list[tuple[int, int]] = []
    for side in sides:
        for _ in range(tries):
            top, left = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
            if all(top + side + GAP <= t or t + s + GAP <= top or left + side + GAP <= l or l + s + GAP <= left
                   for (t, l), s in zip(corners, sides)):
                corners.append((top, left))
                break
        else:
            return None
    return corners


def render(count: int, colour: str, shape: str, seed: int, size: int = SIZE) -> np.ndarray:
    """Draw ``count`` copies of ``shape`` in ``colour`` with random sides and positions -> uint8 ``[size, size, 3]``."""
    rng = random.Random(seed)
    while True:                                                      # retry with new sides if the shapes do not fit
        sides = [rng.randint(MIN_SIDE, MAX_SIDE) for _ in range(count)]
        corners = _place(sides, rng, size)
        if corners is not None:
            break
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for (top, left), side in zip(corners, sides):
        mask = shape_mask(shape, side)
        image[top:top + side, left:left + side][mask] = PALETTE[colour]
    return image


def random_example(seed: int, combos: list[tuple[int, str, str]] | None = None) -> tuple[np.ndarray, str, dict]:
    """One ``(image [32,32,3] uint8, caption, metadata)`` with its combo drawn uniformly from ``combos``."""
    rng = random.Random(seed)
    count, colour, shape = rng.choice(combos or all_combos())
    return render(count, colour, shape, seed=rng.randrange(2 ** 31)), caption(count, colour, shape), \
        metadata(count, colour, shape)


def render_dataset(n: int, seed: int = 0) -> tuple[np.ndarray, list[str], list[dict]]:
    """``n`` examples (example i uses seed ``seed * 1_000_003 + i``) -> images ``[n, 32, 32, 3]``, captions, metas."""
    examples = [random_example(seed * 1_000_003 + i) for i in range(n)]
    images = np.stack([image for image, _, _ in examples])
    return images, [c for _, c, _ in examples], [m for _, _, m in examples]
