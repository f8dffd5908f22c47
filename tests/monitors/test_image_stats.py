"""The image statistics on images whose values are derived by hand."""
import math

import pytest
import torch

from ddpo_cli.monitors.image_stats import (colour_entropy, dark_fraction, edge_density, image_statistics,
                                           saturated_fraction)


def half_black_half_white(size: int = 8) -> torch.Tensor:
    image = torch.zeros(1, 3, size, size)
    image[..., size // 2:] = 1.0
    return image


def test_a_black_image_is_all_dark_clipped_edgeless_and_one_colour():
    black = torch.zeros(2, 3, 8, 8)
    assert dark_fraction(black) == 1.0 and saturated_fraction(black) == 1.0
    assert edge_density(black) == 0.0 and colour_entropy(black) == 0.0


def test_a_step_from_black_to_white():
    image = half_black_half_white(8)
    assert dark_fraction(image) == 0.5 and saturated_fraction(image) == 1.0
    # the Sobel kernel covers columns c-1..c+1: |gx| = 4 at the two columns beside the step, 0 elsewhere; the
    # 6 x 6 interior has 2 such columns of 6
    assert edge_density(image) == pytest.approx(2 / 6)
    assert colour_entropy(image) == pytest.approx(1.0)  # two colours, half each: 1 bit


def test_mid_grey_is_neither_dark_nor_clipped_and_thresholds_apply():
    grey = torch.full((1, 3, 8, 8), 0.5)
    assert dark_fraction(grey) == 0.0 and saturated_fraction(grey) == 0.0
    assert dark_fraction(grey, below=0.6) == 1.0  # luma 0.5 < 0.6
    assert edge_density(half_black_half_white(), above=4.0) == 0.0  # a magnitude of exactly 4 is not above 4


def test_colour_entropy_of_evenly_spread_colours_is_at_most_nine_bits():
    levels = torch.arange(8) / 8 + 1 / 16  # one value inside each of the 8 bins
    r, g, b = torch.meshgrid(levels, levels, levels, indexing="ij")  # all 512 colours once
    image = torch.stack([r.flatten(), g.flatten(), b.flatten()]).reshape(1, 3, 16, 32)
    assert colour_entropy(image) == pytest.approx(9.0)
    assert colour_entropy(image, levels=2) == pytest.approx(3.0)


def test_image_statistics_names_every_value_and_jpeg_shrinks_for_flat_images():
    noise = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    flat = torch.full((2, 3, 32, 32), 0.3)
    stats_noise, stats_flat = image_statistics(noise), image_statistics(flat)
    assert set(stats_noise) == {"dark_fraction", "saturated_fraction", "edge_density", "colour_entropy", "jpeg_kb"}
    assert stats_flat["jpeg_kb"] < stats_noise["jpeg_kb"] and all(math.isfinite(v) for v in stats_noise.values())
