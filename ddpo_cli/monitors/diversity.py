"""In-group diversity (``monitor.diversity``): how different the images of one prompt are from each other.

A policy that collapses onto one image per prompt keeps its reward while this falls. Distances are root-mean-square
over elements, so a value does not depend on the image size: in pixels (images in [0, 1]) and in the model's own
latent space (the sampler's final latents, which every run already has).
"""
from __future__ import annotations

import torch

from .base import Drawn, Monitor


def mean_pairwise_rms(items: torch.Tensor, groups: list[int]) -> float:
    """Mean over groups of the mean RMS distance between every two items of a group. ``items [N,...]``; ``groups[i]``
    is item i's group. Groups of one item have no pair and are left out; 0.0 when no group has two."""
    flat = items.flatten(1).float()
    means = []
    for group in sorted(set(groups)):
        members = flat[[i for i, g in enumerate(groups) if g == group]]
        if len(members) < 2:
            continue
        distances = torch.cdist(members, members) / members.shape[1] ** 0.5
        k = len(members)
        means.append(float(distances.sum() / (k * (k - 1))))
    return sum(means) / len(means) if means else 0.0


def diversity(images: torch.Tensor, latents: torch.Tensor, groups: list[int]) -> dict[str, float]:
    return {"diversity_pixels": mean_pairwise_rms(images, groups),
            "diversity_latents": mean_pairwise_rms(latents, groups)}


class Diversity(Monitor):
    """``monitor.diversity``: :func:`diversity` of the drawn images and latents, grouped by prompt."""

    produces = ("diversity_pixels", "diversity_latents")
    needs_groups = True

    def measure(self, drawn: Drawn) -> dict[str, float]:
        return diversity(drawn.images, drawn.latents, drawn.groups)
