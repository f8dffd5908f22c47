"""What every update rule declares. The trainer reads ``kind`` to know which tensors to hand over:

- ``policy_gradient``: per (sample, timestep) log-probs under the current and the sampling policy, advantages, and
  (when ``needs_base``) the step means of the base model; ``loss(log_prob, old_log_prob, advantages, ...)``.
- ``denoising``: per (sample, noise draw) denoising errors and per-sample weights; ``loss(errors, weights)``.
- ``backprop``: the rewards of images generated with the graph kept; ``loss(rewards)``.
- ``none``: no update at all (the control run of a comparison).
"""
from __future__ import annotations


class Algorithm:
    kind: str = "policy_gradient"
    needs_base: bool = False   # policy_gradient only: also compute the base (adapter-disabled) step means

    def __init__(self, name: str) -> None:
        self.name = name
