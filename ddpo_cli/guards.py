"""What stops a run that would otherwise go on silently wrong: NaN / inf rewards, gradients and weights.

Each check raises a UserError (one line, exit code 2) that says what happened, that nothing was spoiled, and what to
do. In a multi-process run every process checks the same gathered or all-reduced values, so all stop together.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import UserError


def check_rewards(rewards: np.ndarray, prompts: list[str], reward_name: str, epoch: int, policy: str,
                  whole_epoch: bool = True) -> np.ndarray:
    """``rewards [N]`` with ``prompts [N]``: the finite mask. ``policy`` ``stop`` raises on any NaN / inf naming the
    reward, the count and a prompt; ``drop`` lets the caller leave those samples out, unless a whole epoch's rewards
    are non-finite (there is nothing to learn from: stop too)."""
    finite = np.isfinite(np.asarray(rewards, dtype=np.float64))
    if whole_epoch and not finite.any():
        raise UserError(f"reward {reward_name} returned no finite value in epoch {epoch} ({finite.size} samples, "
                        f"e.g. for the prompt {prompts[0]!r}): nothing of this epoch was applied; fix the reward")
    if policy == "stop" and not finite.all():
        example = next((p for p, ok in zip(prompts, finite) if not ok), None)
        raise UserError(f"reward {reward_name} returned {int((~finite).sum())} non-finite value(s) (NaN/inf) among "
                        f"{finite.size} in epoch {epoch}{f', e.g. for the prompt {example!r}' if example else ''}: "
                        f"nothing of this epoch was applied; fix the reward, or train without those samples with "
                        f"train.nonfinite_rewards=drop")
    kept = np.asarray(rewards, dtype=np.float64)[finite]
    with np.errstate(over="ignore", invalid="ignore"):
        spread = kept.std() if kept.size else 0.0
    if not np.isfinite(spread):
        raise UserError(f"reward {reward_name} returned values too large to normalise in epoch {epoch} (largest "
                        f"|r| = {np.abs(kept).max():.3g}: their standard deviation overflows): nothing of this epoch "
                        f"was applied; rescale the reward")
    return finite


def check_gradient(grad_norm, global_step: int) -> None:
    """Before an optimizer step: a non-finite gradient norm stops the run with the weights untouched."""
    if not torch.isfinite(torch.as_tensor(grad_norm)):
        raise UserError(f"the update at global step {global_step} produced a non-finite gradient (norm "
                        f"{float(grad_norm)}): it was not applied and the saved checkpoints are intact; lower "
                        f"train.lr or check the reward's scale, then resume with resume=<run dir>")


def check_weights(params: list[torch.Tensor], epoch: int) -> None:
    """Before a checkpoint is written: weights holding NaN / inf are never saved (and nothing is pruned)."""
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise UserError(f"the weights hold NaN/inf after epoch {epoch}: no checkpoint was written and the earlier "
                        f"ones are kept; lower train.lr, then resume with resume=<run dir>")
