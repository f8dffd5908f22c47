"""DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117): negative-aware fine-tuning on the forward process.

Solver-agnostic and CFG-free as published: the samples may come from any sampler (an ODE in the paper's main
setting), and training uses only their clean latents, noised afresh (:mod:`ddpo_cli.algorithms.forward`). At each
pair, with the current output ``o`` and the old policy's ``o_old`` (a slowly updated copy of the trained weights,
which also draws the samples), two implicit policies mixed with ``beta``:

    positive  o+ = beta o + (1 - beta) o_old        negative  o- = (1 + beta) o_old - beta o

are trained toward the pair's regression target ``y`` (the velocity ``eps - x0`` on flow models), weighted by the
sample's optimality probability ``r = 1/2 + clip(A, -c, c) / (2c)`` in [0, 1]:

    loss = c / beta * [ r ||o+ - y||^2 / w+  +  (1 - r) ||o- - y||^2 / w- ]  (+ kl_beta ||o - o_base||^2)

``w`` is the adaptive weight, the pair's mean absolute error (no gradient). At ``o = o_old`` the gradient is
``2 A (o_old - y) / w``: the denoising-loss gradient weighted by the advantage (good samples pulled closer, bad ones
pushed away); the two terms add ``beta ||o - o_old||^2 / w``, a pull back to the old policy. With zero advantages
(``r = 1/2``) the gradient at ``o = o_old`` is exactly 0.

The old policy: after each epoch's updates ``old <- eta old + (1 - eta) theta`` with ``eta = min(old_increment x
epochs so far, old_max)`` (``eta`` = 0 at first: on-policy while the policy moves fast, slower later).
``algo=nft_chain`` keeps the earlier variant that trains on the sampled chain's stored steps.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .forward import ForwardProcessAlgorithm, mean_over_dims


def optimality_probability(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """``r = 1/2 + clip(A, -c, c) / (2c)`` in ``[0, 1]``."""
    return 0.5 + advantages.clamp(-adv_clip_max, adv_clip_max) / (2 * adv_clip_max)


def nft_loss(estimate: torch.Tensor, old_estimate: torch.Tensor, target: torch.Tensor, advantages: torch.Tensor,
             beta: float, adv_clip_max: float, adaptive_weight: bool = True) -> tuple[torch.Tensor, dict]:
    """The loss above, mean over pairs. ``estimate`` [P,...] (with gradient), ``old_estimate`` and ``target``
    [P,...] in the same space (any affine image of the denoiser output: the output itself, or the clean latents it
    implies), ``advantages`` [P]."""
    old = old_estimate.detach().float()
    estimate, target = estimate.float(), target.float()
    positive = beta * estimate + (1 - beta) * old
    negative = (1 + beta) * old - beta * estimate
    terms = []
    for mixed in (positive, negative):
        error = mixed - target
        weight = mean_over_dims(error.detach().abs()).clamp(min=1e-5) if adaptive_weight else 1.0
        terms.append(mean_over_dims(error ** 2) / weight)
    r = optimality_probability(advantages, adv_clip_max)
    loss = (adv_clip_max / beta * (r * terms[0] + (1 - r) * terms[1])).mean()
    with torch.no_grad():
        metrics = {"r_mean": r.mean(),
                   "policy_shift": mean_over_dims((estimate - old) ** 2).mean(),   # ||o - o_old||^2
                   "old_error": mean_over_dims((old - target) ** 2).mean()}
    return loss, metrics


def check_nft_settings(beta: float, adv_clip_max: float) -> None:
    if not beta > 0:
        raise ValueError(f"algo.beta={beta}: must be > 0 (the mixing of the implicit policies)")
    if not adv_clip_max > 0:
        raise ValueError(f"algo.adv_clip_max={adv_clip_max}: must be > 0")


class NFT(ForwardProcessAlgorithm):
    samples_with_old_policy = True

    def __init__(self, name: str = "nft", beta: float = 1.0, adv_clip_max: float = 1.0, adaptive_weight: bool = True,
                 old_increment: float = 0.001, old_max: float = 0.5, times_per_sample: int = 2,
                 guidance: float = 1.0, kl_beta: float = 0.0, times: str = "schedule") -> None:
        super().__init__(name, times_per_sample, guidance, kl_beta, times)
        check_nft_settings(beta, adv_clip_max)
        if not (old_increment >= 0 and 0 <= old_max < 1):
            raise ValueError(f"algo.old_increment={old_increment}, algo.old_max={old_max}: need increment >= 0 and "
                             f"0 <= max < 1 (the old policy's decay)")
        self.beta, self.adv_clip_max, self.adaptive_weight = beta, adv_clip_max, adaptive_weight
        self.old_policy = (old_increment, old_max)
        self.needs = ("prediction", "target", "old_prediction", *self.kl_needs())

    def check(self, cfg, reward) -> None:
        super().check(cfg, reward)
        if cfg.model.lora.dropout > 0 and cfg.model.use_lora:
            raise UserError(f"model.lora.dropout={cfg.model.lora.dropout}: {self.name} compares the current and the "
                            f"old policy's outputs, which dropout makes differ at the start; use 0")

    def loss(self, prediction, target, old_prediction, advantages, base_prediction=None,
             **_) -> tuple[torch.Tensor, dict]:
        loss, metrics = nft_loss(prediction, old_prediction, target, advantages, self.beta, self.adv_clip_max,
                                 self.adaptive_weight)
        kl = self.kl_term(prediction, base_prediction)
        return loss + self.kl_beta * kl, {**metrics, "kl_penalty": kl.detach()}
