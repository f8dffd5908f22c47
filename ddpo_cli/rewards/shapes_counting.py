"""Counting reward for the toy shapes world (``ddpo_cli.toyworld``): a deterministic detector checks each image.

For a prompt like "three blue squares" (metadata ``{"count": 3, "colour": "blue", "shape": "square"}``):

    reward = count_weight  * 1 / (1 + |detected blue squares - 3|)
           + colour_weight * (fraction of detected objects that are blue)
           + shape_weight  * (fraction of detected objects that are squares)

An exactly right image scores ``count_weight + colour_weight + shape_weight`` (1.0 by default); the count term falls
off with the distance to the target count (1, 1/2, 1/3, ...), and stray objects of another colour or shape lower
the other two terms. With no object at all the colour and shape terms are 0.
"""
from __future__ import annotations

import torch

from ..toyworld.detect import check, detect
from ..images import to_uint8_hwc
from .base import Reward, resize_square


class ShapesCounting(Reward):
    """Graded counting reward for the toy world (not differentiable).

    ``size``: images are resized to ``size x size`` (area interpolation) before detection, the world's resolution;
    ``min_area``: detected regions smaller than this many pixels (at ``size``) are ignored as noise.
    """

    name = "shapes_counting"
    output_range = (0.0, 1.0)  # with the default weights (they sum to 1)

    def __init__(self, count_weight: float = 0.6, colour_weight: float = 0.2, shape_weight: float = 0.2,
                 size: int = 32, min_area: int = 6) -> None:
        super().__init__()
        self.count_weight, self.colour_weight, self.shape_weight = count_weight, colour_weight, shape_weight
        self.size, self.min_area = size, min_area

    def score(self, images, prompts, metadata):
        results = [check(detect(array, self.min_area), meta)
                   for array, meta in zip(to_uint8_hwc(resize_square(images, self.size)), metadata)]
        rewards = [self.count_weight / (1 + abs(r["detected_count"] - meta["count"]))
                   + self.colour_weight * r["colour_frac"] + self.shape_weight * r["shape_frac"]
                   for r, meta in zip(results, metadata)]
        keys = ("detected_count", "total_count", "count_correct", "colour_correct", "shape_correct", "exact")
        info = {key: [r[key] for r in results] for key in keys}
        return torch.tensor(rewards, dtype=torch.float32, device=images.device), info
