"""Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908): direct preference optimisation through the denoising loss.

A pair (winner w, loser l) under one prompt is noised at one noise level with one noise draw
(:mod:`ddpo_cli.algorithms.forward`); with ``e`` the policy's and ``e_ref`` the reference model's denoising errors
(mean squared, per pair), as in the paper's public training code:

    loss = -log sigmoid( -beta / 2 * ((e_w - e_ref_w) - (e_l - e_ref_l)) )

The reference is the base model (:mod:`ddpo_cli.reference`: the LoRA-disabled denoiser; with full fine-tuning a
copy of the weights as loaded, as the paper's code keeps its reference UNet). At the start policy = reference, the
bracket is 0 and the loss is log 2; the gradient lowers the winner's error and raises the loser's relative to the
reference, and the reference terms hold the policy near it. ``beta`` is large (the paper used 2500-5000 on SD-scale
models): the errors' differences are small numbers.

``algo=dpo`` (online): pairs inside each prompt group (``sampler.group_size`` images of one prompt), ranked by reward:
the best with the worst, the second best with the second worst, ...; equal rewards make no pair. Every sample is a
row of the update: its own output keeps the gradient and its partner's (same noise) enters without one, so the two
rows of a pair together give the pair's whole gradient. ``algo=dpo_offline``: the pairs come from a file of
(prompt, chosen image, rejected image) (:mod:`ddpo_cli.preferences`), not from rewards.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..preferences import ranked_pairs
from .forward import ForwardProcessAlgorithm, squared_error

WINNER, LOSER, UNPAIRED = 1.0, -1.0, 0.0


def preference_pairs(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """``[N, 2]``: where each sample's partner is, as an offset from the sample (0 when unpaired: a process's rows
    stay valid in its own slice), and its side (+1 winner, -1 loser, 0 unpaired). Groups are consecutive runs of
    ``group_size``; within one, the k-th best finite reward is paired with the k-th worst, and a pair of equal
    rewards is left unpaired."""
    rewards = np.asarray(rewards, dtype=np.float64)
    out = np.zeros((rewards.size, 2))
    for start in range(0, rewards.size, group_size):
        for best, worst in ranked_pairs(rewards[start:start + group_size]):
            best, worst = start + best, start + worst
            out[best], out[worst] = (worst - best, WINNER), (best - worst, LOSER)
    return out


def flipped_pairs(pairs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The control's pairs: the same partners with each pair's winner and loser swapped by a coin flip."""
    out = pairs.copy()
    for i in range(len(pairs)):
        partner = i + int(pairs[i, 0])
        if pairs[i, 1] == WINNER and rng.random() < 0.5:
            out[i, 1], out[partner, 1] = LOSER, WINNER
    return out


def dpo_loss(error_w: torch.Tensor, error_l: torch.Tensor, base_error_w: torch.Tensor, base_error_l: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Per-pair ``-log sigmoid(-beta/2 ((e_w - e_ref_w) - (e_l - e_ref_l)))`` ``[P]``."""
    margin = (error_w - base_error_w) - (error_l - base_error_l)
    return -F.logsigmoid(-0.5 * beta * margin)


class DPO(ForwardProcessAlgorithm):
    targets = "pairs"

    def __init__(self, name: str = "dpo", beta: float = 2500.0, times_per_sample: int = 1,
                 guidance: float = 1.0, times: str = "schedule") -> None:
        super().__init__(name, times_per_sample, guidance, 0.0, times)
        if not beta > 0:
            raise ValueError(f"algo.beta={beta}: must be > 0")
        self.beta = beta
        self.needs = ("prediction", "target", "base_prediction", "partner_prediction", "partner_target",
                      "partner_base_prediction")

    def check(self, cfg, reward) -> None:
        if cfg.sampler.group_size < 2:
            raise UserError(f"{self.name} pairs images of one prompt, and sampler.group_size={cfg.sampler.group_size} "
                            f"draws one per prompt: use sampler.group_size >= 2 (e.g. 4)")

    def targets_from_rewards(self, rewards: np.ndarray, group_size: int) -> np.ndarray:
        return preference_pairs(rewards, group_size)

    def shuffled(self, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return flipped_pairs(targets, rng)

    def loss(self, prediction, target, base_prediction, partner_prediction, partner_target, partner_base_prediction,
             pairs, **_) -> tuple[torch.Tensor, dict]:
        """``pairs`` [P, 2] (partner offset, side) of each row; the row's own side is the winner when side = +1."""
        side = pairs[:, 1].to(prediction.device)
        own, partner = squared_error(prediction, target), squared_error(partner_prediction, partner_target)
        own_base = squared_error(base_prediction, target)
        partner_base = squared_error(partner_base_prediction, partner_target)
        winner = side > 0
        error_w, error_l = torch.where(winner, own, partner), torch.where(winner, partner, own)
        base_w, base_l = torch.where(winner, own_base, partner_base), torch.where(winner, partner_base, own_base)
        per_pair = dpo_loss(error_w, error_l, base_w, base_l, self.beta)
        paired = side.abs()
        loss = (paired * per_pair).mean()
        with torch.no_grad():
            margin = (error_w - base_w) - (error_l - base_l)
            count = paired.sum().clamp(min=1)
            metrics = {"paired_fraction": paired.mean(),
                       "implicit_accuracy": (paired * (margin < 0).float()).sum() / count,
                       "margin": (paired * margin).sum() / count}
        return loss, metrics
