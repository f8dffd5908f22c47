"""Text conditioning of a batch of prompts, as one small dataclass that indexes and expands like a tensor."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

CLIP_TOKENS = 77  # every CLIP tokenizer's model_max_length


@dataclass
class Conditioning:
    """What a family's denoiser takes besides latents and time, for N prompts (row i = prompt i).

    ``embeds``: sequence embeddings ``[N, L, D]``; ``pooled``: pooled text embeddings ``[N, P]`` (SDXL, SD3, FLUX);
    ``ids``: extra per-sample ids ``[N, K]`` (SDXL: the size/crop time ids). Unused fields are None.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    ids: torch.Tensor | None = None

    def map(self, fn) -> "Conditioning":
        """Apply ``fn`` to every tensor field (None stays None)."""
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if getattr(self, f.name) is not None})

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, index) -> "Conditioning":
        return self.map(lambda t: t[index])

    def expand(self, n: int) -> "Conditioning":
        """A one-row conditioning repeated as ``n`` rows (a view, like ``Tensor.expand``)."""
        return self.map(lambda t: t.expand(n, *t.shape[1:]))

    def to(self, *args, **kwargs) -> "Conditioning":
        return self.map(lambda t: t.to(*args, **kwargs))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        """Rows of several conditionings, in order (all must have the same fields)."""
        first = parts[0]
        return replace(first, **{f.name: torch.cat([getattr(p, f.name) for p in parts])
                                 for f in fields(first) if getattr(first, f.name) is not None})
