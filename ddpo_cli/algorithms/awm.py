"""AWM, advantage-weighted matching (arXiv 2509.25050): the model's own pre-training loss, weighted per sample by
its advantage.

Each sample's clean latents are noised afresh (:mod:`ddpo_cli.algorithms.forward`) and

    loss = mean_pairs( clip(A, -c, c) * ||out(x_t, t) - target||^2 )  +  kl_beta * mean ||out - out_base||^2

Lowering the denoising error of a sample raises its likelihood under the model, so this is the policy gradient with
the denoising loss in place of the sampler's log-probability: samples better than their baseline (A > 0) become
likelier, worse ones (A < 0) less likely. With zero advantages the loss is 0 and so is its gradient. Unlike
reward-weighted regression (weights >= 0) it pushes away from bad samples; unlike DDPO it needs no log-probs, so the
samples may come from any solver.
"""
from __future__ import annotations

import torch

from .forward import ForwardProcessAlgorithm, squared_error


def awm_loss(prediction: torch.Tensor, target: torch.Tensor, advantages: torch.Tensor,
             adv_clip_max: float) -> tuple[torch.Tensor, dict]:
    """``mean(clip(A) * ||prediction - target||^2)`` over pairs; ``prediction`` / ``target`` [P,C,h,w], ``A`` [P]."""
    errors = squared_error(prediction, target)
    loss = (advantages.clamp(-adv_clip_max, adv_clip_max) * errors).mean()
    return loss, {"denoising_mse": errors.detach().mean()}


class AWM(ForwardProcessAlgorithm):

    def __init__(self, name: str = "awm", adv_clip_max: float = 5.0, times_per_sample: int = 2,
                 guidance: float = 1.0, kl_beta: float = 0.0, times: str = "schedule") -> None:
        super().__init__(name, times_per_sample, guidance, kl_beta, times)
        if not adv_clip_max > 0:
            raise ValueError(f"algo.adv_clip_max={adv_clip_max}: must be > 0")
        self.adv_clip_max = adv_clip_max
        self.needs = ("prediction", "target", *self.kl_needs())

    def loss(self, prediction, target, advantages, base_prediction=None, **_) -> tuple[torch.Tensor, dict]:
        loss, metrics = awm_loss(prediction, target, advantages, self.adv_clip_max)
        kl = self.kl_term(prediction, base_prediction)
        return loss + self.kl_beta * kl, {**metrics, "kl_penalty": kl.detach()}
