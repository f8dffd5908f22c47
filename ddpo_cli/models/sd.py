"""Stable Diffusion v1.x / v2.x: one CLIP text encoder, a UNet2DConditionModel, DDPM noise schedule (DDIM sampler)."""
from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline

from .base import ModelFamily
from .conditioning import CLIP_TOKENS, Conditioning


class StableDiffusion(ModelFamily):
    family = "sd"
    kind = "diffusion"
    pipeline_class = StableDiffusionPipeline
    denoiser_name = "unet"
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"embeds": (CLIP_TOKENS, self.denoiser.config.cross_attention_dim)}

    def encode_uncached(self, prompts: list[str]) -> Conditioning:
        """Token ids padded to the tokenizer's max length -> the text encoder's last hidden state ``[N, L, D]``."""
        tokenizer = self.pipe.tokenizer
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids.to(self.device)
        return Conditioning(self.pipe.text_encoder(tokens)[0])

    def forward(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return denoiser(x.to(self.dtype), t, encoder_hidden_states=cond.embeds.to(self.dtype)).sample.float()
