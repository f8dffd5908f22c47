"""FLUX.1 (dev, schnell): CLIP pooled + T5 conditioning, a FluxTransformer2DModel over 2x2-packed latent patches with
rotary ids, a rectified-flow schedule with resolution-dependent shift (flow samplers). Guidance-distilled: dev takes
the guidance scale as an input embedding (one forward per sample, no CFG batch); schnell has none.

Latents stay unpacked ``[B, C, h, w]`` in the chain (the flow steps are elementwise and the log-prob a mean over
dimensions, so packing commutes with both); :meth:`Flux.forward` packs them for the transformer and unpacks its
output, as ``FluxPipeline`` does around its loop. Prompts are encoded by the pipeline's own ``encode_prompt``.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline

from .base import ModelFamily
from .conditioning import Conditioning
from .sd3 import shift_mu


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2)(w/2), 4C]``: 2x2 patches as tokens (FluxPipeline's layout)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack`."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device) -> torch.Tensor:
    """``[(h/2)(w/2), 3]`` rotary position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device)


class Flux(ModelFamily):
    family = "flux"
    kind = "flow"
    pipeline_class = FluxPipeline
    denoiser_name = "transformer"
    load_kwargs = {}
    max_sequence_length = 512  # T5 tokens, FluxPipeline's default

    def native_resolution(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor

    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (self.vae.config.latent_channels, side, side)

    def timestep_kwargs(self, num_steps: int) -> dict:
        """As FluxPipeline: sigmas linspace(1, 1/N, N) shifted by ``mu`` of the packed image's token count."""
        _, h, w = self.latent_shape()
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if self.scheduler_config.get("use_dynamic_shifting"):
            return {"sigmas": sigmas, "mu": shift_mu(self.scheduler_config, (h // 2) * (w // 2))}
        return {"sigmas": sigmas}

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        config = self.denoiser.config
        return {"embeds": (self.max_sequence_length, config.joint_attention_dim),
                "pooled": (config.pooled_projection_dim,)}

    def encode_uncached(self, prompts: list[str]) -> Conditioning:
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, prompts, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds, pooled)

    def forward(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                guidance: float | None = None) -> torch.Tensor:
        d, (_, _, h, w) = self.dtype, x.shape
        scale = torch.full((x.shape[0],), guidance, device=x.device) if guidance is not None else None
        out = denoiser(hidden_states=pack(x).to(d), timestep=t / 1000, guidance=scale,
                       pooled_projections=cond.pooled.to(d), encoder_hidden_states=cond.embeds.to(d),
                       txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=d),
                       img_ids=image_ids(h, w, x.device).to(d), return_dict=False)[0]
        return unpack(out.float(), h, w)

    def predict(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                guidance: float) -> torch.Tensor:
        """Guidance-distilled: the scale is an input of the one forward (dev); schnell takes none. No CFG batch."""
        takes_guidance = bool(self.pipe.transformer.config.guidance_embeds)  # the bare model, also under DDP
        return self.forward(denoiser, x, t, cond, guidance if takes_guidance else None)
