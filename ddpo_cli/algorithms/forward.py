"""What the forward-process update rules share (AWM, DiffusionNFT as published, Diffusion-DPO).

They never use the sampled chain's steps: each sample's clean latents ``x0`` are noised afresh, ``x_t = forward(x0,
eps, t)`` at ``times_per_sample`` noise levels drawn from the family's training distribution (uniform DDPM
timesteps; uniform flow levels ``s``), and the loss compares denoiser outputs there with the family's regression
target (epsilon, v or the velocity ``eps - x0``). So any sampler works, a deterministic one (``flow_ode``, DDIM
``eta=0``) included, and the chain's log-probs are never needed.

``times``: where the noise levels come from. ``schedule`` (the default): the sampler's own time grid at steps drawn
from ``train.timestep_window``, as the chain algorithms train (SD3's shifted grid puts most of them at high noise;
``[0, 0.5]``, the noisier half of the steps, is where an image's layout is decided); ``uniform``: the family's
pre-training distribution over the whole noise scale.

``guidance``: the classifier-free guidance of the trained outputs. 1 (the default) trains the plain conditional
output, CFG-free as DiffusionNFT does (one denoiser call per pair); the sampler's own guidance is a separate setting.
"""
from __future__ import annotations

import torch

from .base import Algorithm

TIMES = ("schedule", "uniform")


def mean_over_dims(values: torch.Tensor) -> torch.Tensor:
    """``[P, ...]`` -> ``[P]``."""
    return values.mean(dim=tuple(range(1, values.ndim)))


def squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pair mean squared error ``[P]`` in fp32 (the family's denoising loss of each pair)."""
    return mean_over_dims((prediction.float() - target.float()) ** 2)


class ForwardProcessAlgorithm(Algorithm):
    trains_on = "forward"

    def __init__(self, name: str, times_per_sample: int = 2, guidance: float = 1.0, kl_beta: float = 0.0,
                 times: str = "schedule") -> None:
        super().__init__(name)
        if times_per_sample < 1:
            raise ValueError(f"algo.times_per_sample={times_per_sample}: must be >= 1 (noise levels per sample)")
        if times not in TIMES:
            raise ValueError(f"algo.times={times!r}: choose schedule (the sampler's times inside "
                             f"train.timestep_window) or uniform (the whole noise scale)")
        self.times = times
        if guidance < 1:
            raise ValueError(f"algo.guidance={guidance}: must be >= 1 (1 = no classifier-free guidance)")
        if kl_beta < 0:
            raise ValueError(f"algo.kl_beta={kl_beta}: must be >= 0")
        self.times_per_sample, self.guidance, self.kl_beta = times_per_sample, guidance, kl_beta

    def check(self, cfg, reward) -> None:
        """Any sampler will do; the base model of ``kl_beta`` is the run's reference (ddpo_cli/reference.py)."""

    def warnings(self, cfg, counts) -> list[str]:
        if cfg.sampler.guidance_scale == 1 or self.guidance != 1:
            return []
        return [f"{self.name} trains the unguided output (algo.guidance=1) on samples drawn with "
                f"sampler.guidance_scale={cfg.sampler.guidance_scale}: the trained model is meant to be sampled "
                f"without guidance, which this run's images do not show (CFG-free as published: "
                f"sampler.guidance_scale=1)"]

    def kl_term(self, prediction: torch.Tensor, base_prediction: torch.Tensor | None) -> torch.Tensor:
        """``mean ||out - out_base||^2`` (0 without a KL weight): the pull toward the base model."""
        if not self.kl_beta:
            return torch.zeros((), device=prediction.device)
        return squared_error(prediction, base_prediction).mean()

    def kl_needs(self) -> tuple[str, ...]:
        return ("base_prediction",) if self.kl_beta > 0 else ()
