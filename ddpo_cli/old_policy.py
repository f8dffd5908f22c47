"""Copies of the trained weights kept beside them: DiffusionNFT's old policy (a slowly updated copy) and, for full
fine-tuning, the reference model (the weights as loaded, :mod:`ddpo_cli.reference`).

After update ``k`` (one per epoch): ``old <- eta old + (1 - eta) theta``, ``eta = min(increment x k, max)``. The copy
is used by swapping it into the trained parameters in place (:meth:`OldPolicy.swapped_in`) for a forward pass
without gradient, and swapping the trained values back bit for bit, so the model is never held twice in the graph.
It lives on the same device and in the same dtype as the trained parameters; checkpoints store it (exact resume).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError

OLD_POLICY_FILE = "old_policy.safetensors"


def old_policy_for(algo, params: list[torch.nn.Parameter], sharded: bool, strategy: str) -> "OldPolicy | None":
    """The old policy of an algorithm that keeps one (``algo.old_policy``), else None."""
    if algo.old_policy is None:
        return None
    if sharded:
        raise UserError(f"algo={algo.name} keeps a copy of the trained weights (its old policy), which ddpo does not "
                        f"shard yet: train it with DDP or DeepSpeed ZeRO-2, not {strategy}")
    return OldPolicy(params, *algo.old_policy)


class WeightCopy:
    """A copy of trained parameters (``copies``, else their current values), used by swapping it into them in place."""

    def __init__(self, params: list[torch.nn.Parameter], copies: list[torch.Tensor] | None = None) -> None:
        self.params = params
        self.copies = copies if copies is not None else [p.detach().clone() for p in params]

    @contextmanager
    def swapped_in(self):
        """The copied weights in the trained parameters for the block (no gradient); the trained ones back after."""
        with torch.no_grad():
            kept = [p.detach().clone() for p in self.params]
            for param, copy in zip(self.params, self.copies):
                param.copy_(copy)
        try:
            with torch.no_grad():
                yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, kept):
                    param.copy_(value)


class OldPolicy(WeightCopy):
    def __init__(self, params: list[torch.nn.Parameter], increment: float, max_decay: float) -> None:
        super().__init__(params)
        self.increment, self.max_decay = increment, max_decay
        self.updates = 0

    def decay(self, k: int) -> float:
        return min(self.increment * k, self.max_decay)

    @torch.no_grad()
    def update(self) -> float:
        """One soft update toward the trained weights; returns the decay used."""
        self.updates += 1
        eta = self.decay(self.updates)
        for copy, param in zip(self.copies, self.params):
            copy.mul_(eta).add_(param.detach(), alpha=1 - eta)
        return eta

    def distance(self) -> float:
        """RMS difference between the old and the trained weights (a reading for the metrics)."""
        total = sum(float(((c.float() - p.detach().float()) ** 2).sum()) for c, p in zip(self.copies, self.params))
        count = sum(c.numel() for c in self.copies)
        return (total / max(count, 1)) ** 0.5

    def save(self, folder: Path) -> None:
        save_file({f"{i}": c.detach().cpu().contiguous() for i, c in enumerate(self.copies)},
                  str(Path(folder) / OLD_POLICY_FILE), metadata={"updates": str(self.updates)})

    def load(self, folder: Path) -> None:
        path = Path(folder) / OLD_POLICY_FILE
        with safe_open(str(path), "pt") as handle:
            if len(handle.keys()) != len(self.copies):
                raise ValueError(f"{path} holds {len(handle.keys())} tensors, the run trains {len(self.copies)}")
            with torch.no_grad():
                for i, copy in enumerate(self.copies):
                    copy.copy_(handle.get_tensor(str(i)))
            self.updates = int(handle.metadata()["updates"])
