"""Offline Diffusion-DPO (``algo=dpo_offline``): the Diffusion-DPO loss (:mod:`ddpo_cli.algorithms.dpo`) on a file of
(prompt, chosen image, rejected image) pairs (:mod:`ddpo_cli.preferences`), encoded once by the model's VAE.

No reward trains it. Each epoch still samples and scores the policy's own images (the reward is the run's yardstick,
as for ``algo=baseline``), then takes as many pairs from the file (in a fresh order each pass through it) as there
are samples per epoch, half of them chosen and half rejected: the updates per epoch are those of the online rules.
``advantage.shuffle=true`` (the control) swaps chosen and rejected of each pair by a coin flip.
"""
from __future__ import annotations

from ..errors import UserError
from ..preferences import read_pairs_file
from .dpo import DPO


class DPOOffline(DPO):
    rollout = "offline"

    def __init__(self, name: str = "dpo_offline", pairs_file: str | None = None, beta: float = 2500.0,
                 times_per_sample: int = 1, guidance: float = 1.0,
                 times: str = "schedule") -> None:
        super().__init__(name, beta, times_per_sample, guidance, times)
        self.pairs_file = pairs_file
        self._pairs = None

    def check(self, cfg, reward) -> None:
        if not self.pairs_file:
            raise UserError(f"{self.name} trains on a file of preference pairs: set algo.pairs_file=<pairs.jsonl> "
                            f"(scripts/pairs_from_samples.py makes one from ddpo sample ... reward=<name>)")
        self.pairs()
        per_process = cfg.sampler.batch_size * cfg.sampler.num_batches_per_epoch
        if per_process % 2:
            raise UserError(f"{self.name} trains pairs, two rows each, in place of the epoch's {per_process} samples: "
                            f"use an even sampler.batch_size x sampler.num_batches_per_epoch")

    def pairs(self) -> list:
        """The file's pairs, read and checked once (by :meth:`check`, before the run starts)."""
        if self._pairs is None:
            self._pairs = read_pairs_file(self.pairs_file)
        return self._pairs
