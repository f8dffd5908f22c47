"""Stable Diffusion XL: two CLIP text encoders (penultimate hidden states concatenated; pooled output of the second),
size/crop "time ids", a UNet2DConditionModel with text-time added conditioning, DDPM noise schedule (DDIM sampler).

Follows ``StableDiffusionXLPipeline.encode_prompt`` / ``__call__`` (diffusers >= 0.32): the negative prompt of CFG is
all zeros when the pipeline's ``force_zeros_for_empty_prompt`` is set (the base model's default), and the time ids
are ``(H, W, 0, 0, H, W)`` for square images of the run's resolution (original size = target size, no crop).
"""
from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from .base import ModelFamily
from .conditioning import CLIP_TOKENS, Conditioning


class StableDiffusionXL(ModelFamily):
    family = "sdxl"
    kind = "diffusion"
    pipeline_class = StableDiffusionXLPipeline
    denoiser_name = "unet"
    load_kwargs = {}

    def native_resolution(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor

    def time_ids(self, n: int) -> torch.Tensor:
        """``[n, 6]``: original size, crop top-left, target size."""
        side = float(self.resolution)
        return torch.tensor([[side, side, 0.0, 0.0, side, side]], device=self.device).expand(n, 6)

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        """Pooled width: the added-embedding input less the six time ids' embeddings."""
        config = self.denoiser.config
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        return {"embeds": (CLIP_TOKENS, config.cross_attention_dim), "pooled": (pooled,), "ids": (6,)}

    def encode_uncached(self, prompts: list[str]) -> Conditioning:
        pipe, hidden, pooled = self.pipe, [], None
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                               return_tensors="pt").input_ids.to(self.device)
            out = encoder(tokens, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]                               # [N, P] text_embeds of the projection encoder
            hidden.append(out.hidden_states[-2])              # [N, L, D_i] penultimate layer
        return Conditioning(torch.cat(hidden, dim=-1), pooled, self.time_ids(len(prompts)))

    @property
    def negative(self) -> Conditioning:
        if self._negative is None:
            empty = self.encode([""])
            zeros = bool(self.pipe.config.get("force_zeros_for_empty_prompt", True))
            self._negative = Conditioning(torch.zeros_like(empty.embeds), torch.zeros_like(empty.pooled),
                                          empty.ids) if zeros else empty
        return self._negative

    def forward(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        d = self.dtype
        return denoiser(x.to(d), t, encoder_hidden_states=cond.embeds.to(d),
                        added_cond_kwargs={"text_embeds": cond.pooled.to(d), "time_ids": cond.ids.to(d)}).sample.float()
