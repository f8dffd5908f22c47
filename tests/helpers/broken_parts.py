"""Deliberately broken parts for `ddpo doctor`'s tests: each must make exactly the check that watches for it fail."""
import torch

from ddpo_cli.rewards.jpeg import JpegCompressibility


def nan_reward(images, prompts, metadata):
    """A reward that returns NaN for every other image."""
    rewards = images.mean(dim=(1, 2, 3))
    rewards[::2] = float("nan")
    return rewards


class Expects255(JpegCompressibility):
    """A reward written for [0, 255] images (it says so, as the reward contract asks)."""

    input_range = (0.0, 255.0)


def detached_brightness(images, prompts, metadata):
    """A reward declared differentiable (reward=custom says so by default) that cuts the graph."""
    return images.detach().mean(dim=(1, 2, 3))
