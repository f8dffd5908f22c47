"""JPEG (in)compressibility: the size in kB of the image saved as JPEG (DDPO paper, quality 95)."""
from __future__ import annotations

import io

import torch
from PIL import Image

from ..images import to_uint8_hwc
from .base import Reward


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """``[B,3,H,W]`` in [0,1] -> ``[B]`` JPEG file sizes in kB (1 kB = 1000 bytes)."""
    sizes = []
    for array in to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegCompressibility(Reward):
    """Reward = -(JPEG size in kB): smaller files score higher."""

    name = "jpeg_compressibility"
    output_range = (None, 0.0)  # minus kB

    def __init__(self, quality: int = 95, sign: float = -1.0) -> None:
        super().__init__()
        self.quality, self.sign = quality, sign

    def score(self, images, prompts, metadata):
        size = jpeg_size_kb(images, self.quality)
        return self.sign * size, {"jpeg_kb": size.tolist()}


class JpegIncompressibility(JpegCompressibility):
    """Reward = +(JPEG size in kB): larger files score higher."""

    name = "jpeg_incompressibility"
    output_range = (0.0, None)  # kB

    def __init__(self, quality: int = 95) -> None:
        super().__init__(quality=quality, sign=1.0)
