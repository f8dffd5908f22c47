"""Stable Diffusion 3 / 3.5: two CLIP text encoders with pooled projections plus an optional T5, an
SD3Transformer2DModel (MMDiT) predicting the flow velocity, a rectified-flow schedule (flow samplers).

Prompts are encoded by the pipeline's own ``encode_prompt`` (CLIP-L and CLIP-G penultimate states concatenated,
padded to the T5 width, followed by ``max_sequence_length`` T5 tokens, zeros without a T5; pooled = both CLIP
projections), so conditioning is exactly what ``StableDiffusion3Pipeline`` feeds its transformer. The negative prompt
of CFG is the encoded empty prompt, as in the pipeline.
"""
from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline

from .base import ModelFamily
from .conditioning import CLIP_TOKENS, Conditioning


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """The resolution-dependent ``mu`` of dynamic shifting: linear in the number of image tokens (SD3.5, FLUX)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def shift_mu(scheduler_config: dict, image_seq_len: int) -> float:
    return calculate_shift(image_seq_len, scheduler_config.get("base_image_seq_len", 256),
                           scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.5),
                           scheduler_config.get("max_shift", 1.15))


class StableDiffusion3(ModelFamily):
    family = "sd3"
    kind = "flow"
    pipeline_class = StableDiffusion3Pipeline
    denoiser_name = "transformer"
    load_kwargs = {}
    max_sequence_length = 256  # T5 tokens (zeros without a T5), as the pipeline's default

    def native_resolution(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor

    def image_seq_len(self) -> int:
        _, h, w = self.latent_shape()
        patch = self.denoiser.config.patch_size
        return (h // patch) * (w // patch)

    def timestep_kwargs(self, num_steps: int) -> dict:
        """How StableDiffusion3Pipeline sets the schedule: a static shift, or ``mu`` when dynamic shifting is on."""
        if self.scheduler_config.get("use_dynamic_shifting"):
            return {"num_inference_steps": num_steps, "mu": shift_mu(self.scheduler_config, self.image_seq_len())}
        return {"num_inference_steps": num_steps}

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        """CLIP tokens, then the T5 tokens, at the joint attention width."""
        config = self.denoiser.config
        return {"embeds": (CLIP_TOKENS + self.max_sequence_length, config.joint_attention_dim),
                "pooled": (config.pooled_projection_dim,)}

    def encode_uncached(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, prompts, prompts, device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds, pooled)

    def forward(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        d = self.dtype
        return denoiser(hidden_states=x.to(d), timestep=t, encoder_hidden_states=cond.embeds.to(d),
                        pooled_projections=cond.pooled.to(d), return_dict=False)[0].float()
