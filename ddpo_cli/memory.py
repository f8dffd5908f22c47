"""Per-GPU memory of a training run, term by term (``ddpo plan``). The formula, in bytes:

    frozen weights   = frozen denoiser x b / W  +  (text encoders + VAE) x b  +  reward model x 4  +  buffers
    trainable weights = trainable x 4 / W
    master copy      = trainable x 4 / S                 (DeepSpeed only: its fp32 copy of the trained weights)
    weight copies    = trainable x 4 x copies            (kept by ddpo: the old policy, full fine-tuning's reference)
    gradients        = trainable x 4 / S
    optimizer state  = trainable x 8 / S                 (AdamW: two fp32 moments per parameter)
    gathered block   = largest sharded block x b         (W > 1: one block's whole weights while it runs)
    activations      = what the training forward of one chunk keeps for backward
    conditioning cache = min(model.text_cache_mb, (prompts + 1) x one prompt's conditioning)

``b`` is the bytes of a frozen weight in the run's precision (4 for fp32, 2 for bf16 / fp16); ``W`` the number of
processes the denoiser's weights are split over (FSDP2 and ZeRO-3: all; DDP and ZeRO-2: 1), ``S`` the number its
gradients and optimizer state are split over (FSDP2, ZeRO-2 and ZeRO-3: all; DDP: 1). Trainable parameters, their
gradients and AdamW's moments are fp32 (LoRA, or a fully trained denoiser). Buffers (e.g. SD3's positional
embedding table, 0.4 GiB in bf16) are whole on every GPU. Not counted: the CUDA context and allocator slack (about
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
    weight_shards: int            # W: processes the denoiser's weights are split over (1: whole on each)
    state_shards: int             # S: processes its gradients and optimizer state are split over
    master_copy: bool             # DeepSpeed keeps an fp32 copy of the trained weights beside the model's
    largest_block: int            # parameters of the largest sharded block (gathered whole while it runs)
    activation_bytes: int         # saved for backward by one training chunk
    cache_bytes: int              # the conditioning cache
    weight_copies: int = 0        # whole copies of the trained weights ddpo keeps (old policy, full FT's reference)


def memory_terms(m: MemoryInputs) -> dict[str, float]:
    """Bytes per GPU of each term of the formula (module docstring), and ``total``."""
    terms = {
        "frozen weights": m.frozen_denoiser * m.weight_bytes / m.weight_shards + m.encoders_and_vae * m.weight_bytes
        + m.reward * 4 + m.buffer_bytes,
        "trainable weights": m.trainable * 4 / m.weight_shards,
        "master copy": m.trainable * 4 / m.state_shards if m.master_copy else 0.0,
        "weight copies": float(m.trainable * 4 * m.weight_copies),
        "gradients": m.trainable * 4 / m.state_shards,
        "optimizer state": m.trainable * 8 / m.state_shards,
        "gathered block": m.largest_block * m.weight_bytes if m.weight_shards > 1 else 0.0,
        "activations": float(m.activation_bytes),
        "conditioning cache": float(m.cache_bytes),
    }
    terms["total"] = sum(terms.values())
    return terms


def cache_bytes(prompts: int, bytes_per_prompt: int, bound_mb: float | None) -> int:
    """The conditioning cache when full: every prompt and the empty (negative) prompt, within the bound."""
    full = (prompts + 1) * bytes_per_prompt
    return full if bound_mb is None else min(full, int(bound_mb * 2 ** 20))
