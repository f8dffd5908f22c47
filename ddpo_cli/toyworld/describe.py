"""A captioner for the toy world: what a perfect VLM would say about an image, from the detector's objects.

``describe(objects, phrasing)`` groups the detected objects by (colour, shape) and writes them the way the world's
captions are written, joined by "and", inside one of the sentences a VLM might answer with:
``"The image shows two red squares and one blue circle on a black background."``

:class:`ShapesCaptioner` has the VLM backends' interface (``load``, ``ask(images, questions) -> answers``), so the
prompt-alignment reward runs on the toy world with known, exact captions (``reward.backend=shapes``). Like a VLM,
its wording varies between images and not within one: the sentence is picked by a hash of the image's pixels.
"""
from __future__ import annotations

import hashlib
from collections import Counter

from PIL import Image
import numpy as np

from .detect import Detection, detect
from .render import COLOURS, SHAPES, caption

PHRASINGS = ["The image shows {objects} on a black background.", "There are {objects}.",
             "A simple drawing of {objects} against a plain dark backdrop.", "I can see {objects} in this picture.",
             "This is a black square image containing {objects}, drawn in flat colours."]
EMPTY = "The image is an empty black background."


def describe(objects: list[Detection], phrasing: str = PHRASINGS[0]) -> str:
    """Detected objects -> one English sentence naming every (count, colour, shape) group, largest group first."""
    groups = Counter((d.colour, d.shape) for d in objects)
    if not groups:
        return EMPTY
    order = sorted(groups, key=lambda key: (-groups[key], COLOURS.index(key[0]), SHAPES.index(key[1])))
    parts = [caption(min(groups[key], 10), *key) for key in order]  # more than ten objects: "ten"
    return phrasing.format(objects=" and ".join(parts))


def phrasing_of(image: np.ndarray) -> str:
    """The sentence used for ``image``: fixed by its pixels, spread evenly over :data:`PHRASINGS`."""
    return PHRASINGS[int.from_bytes(hashlib.sha256(image.tobytes()).digest()[:4], "little") % len(PHRASINGS)]


class ShapesCaptioner:
    """The toy world's exact captioner with the VLM backend interface (the question is ignored)."""

    def __init__(self, min_area: int = 6) -> None:
        self.min_area = min_area

    def load(self, device, dtype) -> None:
        """Nothing to load: the detector is a fixed algorithm."""

    def ask(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        arrays = [np.asarray(image.convert("RGB").resize((32, 32), Image.BOX)) for image in images]
        return [describe(detect(array, self.min_area), phrasing_of(array)) for array in arrays]
