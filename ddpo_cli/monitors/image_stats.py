"""Image statistics that see what a reward may not: images going dark, flat or clipped (``monitor.image_stats``).

Pure functions of images ``[N,3,H,W]`` in [0, 1]; each returns the mean over the images. In one public OCR recipe the
dark fraction went from 0.45 to 0.93, edge density fell 60 % and colour entropy 54 % while the trained score did
not move.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..rewards.jpeg import jpeg_size_kb
from .base import Drawn, Monitor

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def luminance(images: torch.Tensor) -> torch.Tensor:
    """``[N,H,W]`` luma of ``[N,3,H,W]`` RGB."""
    return torch.einsum("nchw,c->nhw", images.float(), torch.tensor(LUMA, device=images.device))


def dark_fraction(images: torch.Tensor, below: float = 0.1) -> float:
    """Share of pixels whose luma is below ``below``."""
    return float((luminance(images) < below).float().mean())


def saturated_fraction(images: torch.Tensor, margin: float = 1 / 255) -> float:
    """Share of pixels with a channel clipped at 0 or 1 (within ``margin``)."""
    clipped = (images <= margin) | (images >= 1 - margin)
    return float(clipped.any(dim=1).float().mean())


def edge_density(images: torch.Tensor, above: float = 0.1) -> float:
    """Share of pixels whose Sobel gradient magnitude of luma exceeds ``above`` (a pixel-wide step of 1 gives 4);
    the one-pixel border, which the kernel does not cover, is left out."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device)
    luma = luminance(images)[:, None]
    gx, gy = F.conv2d(luma, kx[None, None]), F.conv2d(luma, kx.T[None, None])
    return float((torch.sqrt(gx ** 2 + gy ** 2) > above).float().mean())


def colour_entropy(images: torch.Tensor, levels: int = 8) -> float:
    """Shannon entropy in bits of each image's colours quantised to ``levels`` per channel (at most 3 log2 levels:
    9 bits for 8 levels), averaged over the images."""
    q = (images.float().clamp(0, 1) * levels).long().clamp(max=levels - 1)          # [N,3,H,W]
    codes = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]                        # [N,H,W]
    entropies = []
    for image_codes in codes.flatten(1):
        p = torch.bincount(image_codes, minlength=levels ** 3).float() / image_codes.numel()
        p = p[p > 0]
        entropies.append(float(-(p * p.log2()).sum()))
    return sum(entropies) / len(entropies)


def image_statistics(images: torch.Tensor, dark_below: float = 0.1, edge_above: float = 0.1) -> dict[str, float]:
    """Every statistic of this module, and the mean JPEG size in kB (quality 95), of images in [0, 1]."""
    return {"dark_fraction": dark_fraction(images, dark_below), "saturated_fraction": saturated_fraction(images),
            "edge_density": edge_density(images, edge_above), "colour_entropy": colour_entropy(images),
            "jpeg_kb": float(jpeg_size_kb(images).mean())}


class ImageStats(Monitor):
    """``monitor.image_stats``: :func:`image_statistics` of the drawn images."""

    produces = ("dark_fraction", "saturated_fraction", "edge_density", "colour_entropy", "jpeg_kb")

    def __init__(self, dark_below: float = 0.1, edge_above: float = 0.1) -> None:
        if not 0 < dark_below < 1:
            raise UserError(f"monitor.image_stats.dark_below={dark_below}: use a luma in (0, 1)")
        if not 0 < edge_above < 4:
            raise UserError(f"monitor.image_stats.edge_above={edge_above}: use a Sobel magnitude in (0, 4)")
        self.dark_below, self.edge_above = dark_below, edge_above

    def measure(self, drawn: Drawn) -> dict[str, float]:
        return image_statistics(drawn.images, self.dark_below, self.edge_above)
