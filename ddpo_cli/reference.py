"""The reference model an update rule compares the policy with (DPOK's KL, Diffusion-DPO's reference errors, the
forward rules' ``kl_beta``, prior preservation, the ``kl_to_base`` reading): the base model, as loaded.

With LoRA it is the same denoiser with its adapter switched off (no second copy). With full fine-tuning the weights as
loaded are kept as a copy beside the trained ones (one more copy of the model in memory, as Diffusion-DPO's own
training code keeps its ``ref_unet``) and swapped into them in place for a forward pass without gradient
(:class:`ddpo_cli.old_policy.WeightCopy`). A full fine-tuning run keeps the copy only when something reads it.
"""
from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from .errors import UserError
from .models import adapters_disabled
from .old_policy import WeightCopy


def needs_reference(algo, preserve: bool) -> bool:
    """Whether a run reads the base model: its rule's loss takes a ``base_*`` tensor, or prior preservation is on."""
    return preserve or any(name.startswith("base_") for name in algo.needs)


def loaded_weights(model, use_lora: bool, needed: bool, sharded: bool, strategy: str) -> list[torch.Tensor] | None:
    """For full fine-tuning with a reference: a copy of the trainable weights as loaded (call it before a resume
    loads trained ones). None with LoRA (the adapter switches off) or when nothing reads the base model."""
    if use_lora or not needed:
        return None
    if sharded:
        raise UserError(f"full fine-tuning with a reference model keeps a copy of the weights as loaded, which ddpo "
                        f"does not shard yet: use model.use_lora=true, or DDP / DeepSpeed ZeRO-2 instead of {strategy}")
    return [p.detach().clone() for p in model.trainable_parameters()]


def reference_for(denoiser, params: list[torch.nn.Parameter], use_lora: bool,
                  loaded: list[torch.Tensor] | None) -> "Reference | None":
    """The run's reference: with LoRA the adapter switched off, with full fine-tuning the ``loaded`` copy (None when
    the run kept none: nothing reads it)."""
    if use_lora or loaded is not None:
        return Reference(denoiser, WeightCopy(params, loaded) if loaded is not None else None)
    return None


class Reference:
    """``reference()``: a context in which ``denoiser`` computes the base model's outputs (call it without grad)."""

    def __init__(self, denoiser, copy: WeightCopy | None) -> None:
        self.denoiser, self.copy = denoiser, copy

    def __call__(self) -> AbstractContextManager:
        return self.copy.swapped_in() if self.copy is not None else adapters_disabled(self.denoiser)
