"""Per-GPU memory of a training run, term by term (``ddpo plan``). The formula, in bytes:

    frozen weights   = frozen denoiser x b / S  +  (text encoders + VAE) x b  +  reward model x 4  +  buffers
    trainable weights = trainable x 4 / S
    gradients        = trainable x 4 / S
    optimizer state  = trainable x 8 / S                 (AdamW: two fp32 moments per parameter)
    gathered block   = largest sharded block x b         (S > 1: one block's whole weights while it runs)
    activations      = what the training forward of one chunk keeps for backward
    conditioning cache = min(model.text_cache_mb, (prompts + 1) x one prompt's conditioning)

``b`` is the bytes of a frozen weight in the run's precision (4 for fp32, 2 for bf16 / fp16), ``S`` the number of
processes the denoiser is sharded over (FSDP2; 1 under DDP). Trainable parameters, their gradients and AdamW's
moments are fp32 (LoRA, or a fully trained denoiser). Buffers (e.g. SD3's positional embedding table, 0.4 GiB in
bf16) are whole on every GPU. Not counted: the CUDA context and allocator slack (about
0.5-1 GB per GPU), sampling's transient activations (no graph is kept, so they are smaller than training's), and
the VAE decode of a sampling batch.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2 ** 30


@dataclass(frozen=True)
class MemoryInputs:
    frozen_denoiser: int          # parameters
    trainable: int                # parameters
    encoders_and_vae: int         # parameters (whole on every GPU)
    reward: int                   # parameters (fp32, whole on every GPU)
    buffer_bytes: int             # the pipeline's buffers (whole on every GPU)
    weight_bytes: int             # bytes per frozen weight: 4, or 2 for bf16 / fp16
    shards: int                   # processes the denoiser is sharded over (1: not sharded)
    largest_block: int            # parameters of the largest sharded block (gathered whole while it runs)
    activation_bytes: int         # saved for backward by one training chunk
    cache_bytes: int              # the conditioning cache


def memory_terms(m: MemoryInputs) -> dict[str, float]:
    """Bytes per GPU of each term of the formula (module docstring), and ``total``."""
    terms = {
        "frozen weights": m.frozen_denoiser * m.weight_bytes / m.shards + m.encoders_and_vae * m.weight_bytes
        + m.reward * 4 + m.buffer_bytes,
        "trainable weights": m.trainable * 4 / m.shards,
        "gradients": m.trainable * 4 / m.shards,
        "optimizer state": m.trainable * 8 / m.shards,
        "gathered block": m.largest_block * m.weight_bytes if m.shards > 1 else 0.0,
        "activations": float(m.activation_bytes),
        "conditioning cache": float(m.cache_bytes),
    }
    terms["total"] = sum(terms.values())
    return terms


def cache_bytes(prompts: int, bytes_per_prompt: int, bound_mb: float | None) -> int:
    """The conditioning cache when full: every prompt and the empty (negative) prompt, within the bound."""
    full = (prompts + 1) * bytes_per_prompt
    return full if bound_mb is None else min(full, int(bound_mb * 2 ** 20))
