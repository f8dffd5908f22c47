"""Image tensors as pixels: the one conversion from the pipeline's float images to 8-bit arrays."""
from __future__ import annotations

import numpy as np
import torch


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """``[B,3,H,W]`` float in [0,1] -> numpy ``[B,H,W,3]`` uint8 (rounded, clamped)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
