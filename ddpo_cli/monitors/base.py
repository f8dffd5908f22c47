"""The interface of a monitor (``conf/monitor/<name>.yaml`` names its class with ``_target_``).

A monitor is built from its YAML (its ``__init__`` checks its own settings and raises UserError), ``setup`` once
with the run's device, then called on every check with the images the policy drew (:class:`Drawn`); it returns
named numbers, which go to ``metrics.jsonl`` under ``monitor`` and can be named by ``monitor.stop_when`` and
``checkpoint.best_by``. ``produces`` lists those names, so a rule naming another is refused before the run starts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Drawn:
    """One check's images: ``images [N,3,H,W]`` in [0, 1] (CPU), the sampler's final ``latents [N,...]``, and for
    each image its prompt, metadata and group (images of one prompt share a group)."""

    images: torch.Tensor
    latents: torch.Tensor
    prompts: list[str]
    metadata: list[dict]
    groups: list[int]


class Monitor:
    produces: tuple[str, ...] = ()
    needs_groups: bool = False    # True: needs monitor.images_per_prompt >= 2

    def setup(self, device: torch.device) -> None:
        """Load what the monitor needs (a gold reward's model); called once, on the processes that check."""

    def measure(self, drawn: Drawn) -> dict[str, float]:
        raise NotImplementedError
