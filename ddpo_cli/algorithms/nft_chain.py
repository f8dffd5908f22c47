"""DiffusionNFT's loss on the sampled chain's own steps (``algo=nft_chain``; ``algo=nft`` is the method as published,
on the forward process: :mod:`ddpo_cli.algorithms.nft`).

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
there, as in Flow-Factory's implementation); the paper noises the clean latents afresh (``algo=nft``). CFG: the
output is the guided one, as sampled (``train.guidance_in_training=true``).
"""
from __future__ import annotations

import torch

from .base import Algorithm
from .nft import check_nft_settings, nft_loss


class NFTChain(Algorithm):
    needs = ("clean_estimate", "old_clean_estimate", "clean_latents")

    def __init__(self, name: str = "nft_chain", beta: float = 1.0, adv_clip_max: float = 5.0,
                 adaptive_weight: bool = True) -> None:
        super().__init__(name)
        check_nft_settings(beta, adv_clip_max)
        self.beta, self.adv_clip_max, self.adaptive_weight = beta, adv_clip_max, adaptive_weight

    def loss(self, clean_estimate, old_clean_estimate, clean_latents, advantages, **_) -> tuple[torch.Tensor, dict]:
        return nft_loss(clean_estimate, old_clean_estimate, clean_latents, advantages, self.beta, self.adv_clip_max,
                        self.adaptive_weight)
