"""A deterministic detector for the toy world: colour segmentation + connected components + a shape rule.

1. every pixel takes the nearest of the background and the 4 palette colours (Euclidean RGB distance);
2. pixels of each palette colour are grouped into 8-connected components (``scipy.ndimage.label``);
   components smaller than ``min_area`` pixels are ignored as noise;
3. each component gets the shape whose template (the renderer's mask stretched to the component's bounding box)
   overlaps it best (intersection over union): robust to the soft, slightly irregular shapes a model draws.

It is exact on rendered images (tested on >= 99%) and degrades gracefully on blurry generated ones.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .render import BACKGROUND, COLOURS, PALETTE, SHAPES, shape_mask

_REFERENCE = np.array([BACKGROUND] + [PALETTE[c] for c in COLOURS], dtype=np.float32)   # [5, 3], 0 = background
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


@dataclass
class Detection:
    """One detected object."""

    colour: str
    shape: str
    area: int
    bbox: tuple[int, int, int, int]   # top, left, bottom (exclusive), right (exclusive)


def segment(image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> int ``[H, W]`` label map: 0 background, ``1 + COLOURS.index(colour)`` otherwise."""
    pixels = image.astype(np.float32)[:, :, None, :]                    # [H, W, 1, 3]
    distance = ((pixels - _REFERENCE) ** 2).sum(-1)                     # [H, W, 5]
    return distance.argmin(-1)


def classify_shape(mask: np.ndarray) -> str:
    """Boolean mask cropped to its bounding box ``[h, w]`` -> the shape whose template (the rendering mask
    stretched to ``h x w``) has the highest intersection-over-union with it."""
    def iou(shape: str) -> float:
        template = shape_mask(shape, *mask.shape)
        return (mask & template).sum() / (mask | template).sum()

    return max(SHAPES, key=iou)


def detect(image: np.ndarray, min_area: int = 6) -> list[Detection]:
    """All objects in a uint8 ``[H, W, 3]`` image, in a fixed (colour, then label) order."""
    labels = segment(image)
    found = []
    for index, colour in enumerate(COLOURS, start=1):
        components, n = ndimage.label(labels == index, structure=_EIGHT_CONNECTED)
        for component, box in enumerate(ndimage.find_objects(components), start=1):
            mask = components[box] == component
            if mask.sum() < min_area:
                continue
            bbox = (box[0].start, box[1].start, box[0].stop, box[1].stop)
            found.append(Detection(colour, classify_shape(mask), int(mask.sum()), bbox))
    return found


def summarise(detections: list[Detection]) -> dict:
    """Detections -> the image's best guess ``{"count", "colour", "shape"}`` (majority colour and shape, total count).

    Ties between colours or shapes are broken by total area. An empty image gives count 0 and colour/shape None.
    """
    if not detections:
        return {"count": 0, "colour": None, "shape": None}

    def majority(key: str) -> str:
        votes, area = Counter(getattr(d, key) for d in detections), Counter()
        for d in detections:
            area[getattr(d, key)] += d.area
        return max(votes, key=lambda value: (votes[value], area[value]))

    return {"count": len(detections), "colour": majority("colour"), "shape": majority("shape")}


def check(detections: list[Detection], target: dict) -> dict:
    """Compare detections with a target ``{"count", "colour", "shape"}``.

    Returns ``detected_count`` (objects of the target colour AND shape), ``total_count`` (all objects),
    ``colour_frac`` / ``shape_frac`` (fraction of objects with the target colour / shape; 0 if none),
    ``count_correct`` (total count == target), ``colour_correct`` / ``shape_correct`` (majority matches) and
    ``exact`` (exactly ``count`` objects, all of the target colour and shape).
    """
    total = len(detections)
    matching = sum(d.colour == target["colour"] and d.shape == target["shape"] for d in detections)
    summary = summarise(detections)
    return {
        "detected_count": matching,
        "total_count": total,
        "colour_frac": sum(d.colour == target["colour"] for d in detections) / total if total else 0.0,
        "shape_frac": sum(d.shape == target["shape"] for d in detections) / total if total else 0.0,
        "count_correct": total == target["count"],
        "colour_correct": summary["colour"] == target["colour"],
        "shape_correct": summary["shape"] == target["shape"],
        "exact": matching == total == target["count"],
    }
