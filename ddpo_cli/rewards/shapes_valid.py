"""Is it still a toy-world image? (``reward=shapes_valid``, a gold reward for tasks that do not ask for a count.)

The toy world draws 1-4 copies of one shape in one colour on black. An image scores 1 when the detector
(``ddpo_cli.toyworld``) finds exactly that: between ``min_count`` and ``max_count`` objects, all of one colour and
one shape; else 0. Over-optimising JPEG compressibility (a black image) or breaking the model (noise, smears,
mixed colours) both lower it, which the trained reward does not show.
"""
from __future__ import annotations

import torch

from ..images import to_uint8_hwc
from ..toyworld.detect import detect
from .base import Reward, resize_square


def is_valid(detections, min_count: int, max_count: int) -> bool:
    return (min_count <= len(detections) <= max_count and len({d.colour for d in detections}) == 1
            and len({d.shape for d in detections}) == 1)


class ShapesValid(Reward):
    """1 for an image the toy world could have drawn, 0 otherwise (not differentiable); info ``objects``."""

    name = "shapes_valid"
    output_range = (0.0, 1.0)

    def __init__(self, min_count: int = 1, max_count: int = 4, size: int = 32, min_area: int = 6) -> None:
        super().__init__()
        if not 0 <= min_count <= max_count:
            raise ValueError(f"reward.min_count={min_count}, reward.max_count={max_count}: need 0 <= min <= max")
        self.min_count, self.max_count, self.size, self.min_area = min_count, max_count, size, min_area

    def score(self, images, prompts, metadata):
        found = [detect(array, self.min_area) for array in to_uint8_hwc(resize_square(images, self.size))]
        rewards = [float(is_valid(d, self.min_count, self.max_count)) for d in found]
        return torch.tensor(rewards, dtype=torch.float32, device=images.device), {"objects": [len(d) for d in found]}
