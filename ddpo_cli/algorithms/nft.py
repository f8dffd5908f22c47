"""DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117): negative-aware fine-tuning, RL through the denoising loss.

No log-probs and no ratio. Each trained (sample, step) pair compares the clean latents the policy predicts at the
stored step with the sample's own final latents, through two implicit policies built from the current output ``o``
and the output ``o_old`` recorded when sampling (a mixing ``beta``):

    positive  o+ = beta o + (1 - beta) o_old        negative  o- = (1 + beta) o_old - beta o

and weights them by an optimality probability ``r = 1/2 + clip(A, -c, c) / (2c)`` of the sample's advantage ``A``:

    loss = c / beta * [ r ||x0(o+) - x0||^2 / w+  +  (1 - r) ||x0(o-) - x0||^2 / w- ]

``x0(o)`` is the clean estimate (affine in ``o``, so ``x0(o+) = beta x0(o) + (1 - beta) x0(o_old)``); ``w`` is the
paper's adaptive weight, the pair's mean absolute error (no gradient). What this does: at ``o = o_old`` the gradient is
``2 A (x0(o_old) - x0) dx0/do / w``, the denoising-loss gradient weighted by the advantage (good samples pulled
closer, bad ones pushed away), and the two terms add ``beta ||x0(o) - x0(o_old)||^2 / w``, a pull back to the
sampling policy. With zero advantages (``r = 1/2``) the gradient at ``o = o_old`` is exactly 0: unlike reward-weighted
regression, training on the policy's own samples does not drift by itself.

Here the pairs are the sampled chain's own steps (the stored latents of the trained window and the output recorded
there, as in Flow-Factory's implementation); the paper noises the clean latents afresh. CFG: the output is the
guided one, as sampled (``train.guidance_in_training=true``).
"""
from __future__ import annotations

import torch

from .base import Algorithm


def optimality_probability(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """``r = 1/2 + clip(A, -c, c) / (2c)`` in ``[0, 1]``."""
    return 0.5 + advantages.clamp(-adv_clip_max, adv_clip_max) / (2 * adv_clip_max)


def _mean_over_dims(values: torch.Tensor) -> torch.Tensor:
    return values.mean(dim=tuple(range(1, values.ndim)))


def nft_loss(clean_estimate: torch.Tensor, old_clean_estimate: torch.Tensor, clean_latents: torch.Tensor,
             advantages: torch.Tensor, beta: float, adv_clip_max: float,
             adaptive_weight: bool = True) -> tuple[torch.Tensor, dict]:
    """The loss above, mean over pairs. ``clean_estimate`` [P,C,h,w] (with gradient), ``old_clean_estimate`` and
    ``clean_latents`` [P,C,h,w], ``advantages`` [P]."""
    old = old_clean_estimate.detach()
    positive = beta * clean_estimate + (1 - beta) * old
    negative = (1 + beta) * old - beta * clean_estimate
    terms = []
    for estimate in (positive, negative):
        error = estimate - clean_latents
        weight = _mean_over_dims(error.detach().abs()).clamp(min=1e-5) if adaptive_weight else 1.0
        terms.append(_mean_over_dims(error ** 2) / weight)
    r = optimality_probability(advantages, adv_clip_max)
    loss = (adv_clip_max / beta * (r * terms[0] + (1 - r) * terms[1])).mean()
    with torch.no_grad():
        metrics = {"r_mean": r.mean(),
                   "policy_shift": _mean_over_dims((clean_estimate - old) ** 2).mean(),   # ||x0(o) - x0(o_old)||^2
                   "old_error": _mean_over_dims((old - clean_latents) ** 2).mean()}
    return loss, metrics


class NFT(Algorithm):
    needs = ("clean_estimate", "old_clean_estimate", "clean_latents")

    def __init__(self, name: str = "nft", beta: float = 1.0, adv_clip_max: float = 5.0,
                 adaptive_weight: bool = True) -> None:
        super().__init__(name)
        if not beta > 0:
            raise ValueError(f"algo.beta={beta}: must be > 0 (the mixing of the implicit policies)")
        if not adv_clip_max > 0:
            raise ValueError(f"algo.adv_clip_max={adv_clip_max}: must be > 0")
        self.beta, self.adv_clip_max, self.adaptive_weight = beta, adv_clip_max, adaptive_weight

    def loss(self, clean_estimate, old_clean_estimate, clean_latents, advantages, **_) -> tuple[torch.Tensor, dict]:
        return nft_loss(clean_estimate, old_clean_estimate, clean_latents, advantages, self.beta, self.adv_clip_max,
                        self.adaptive_weight)
