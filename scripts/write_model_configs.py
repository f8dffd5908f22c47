#!/usr/bin/env python
"""Write the config-only snapshots of the real pipelines ddpo-cli ships (ddpo_cli/assets/model_configs/): each
pipeline's model_index.json and every component's config, no weights, no tokenizers.

`ddpo plan` builds these models on the meta device when the hub is out of reach and the configs are not in the
Hugging Face cache. The values are those of the published config.json files of each repository (the architecture
keys; everything else is the library default). Run from the repository root:

    python scripts/write_model_configs.py
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       FluxTransformer2DModel, PNDMScheduler, SD3Transformer2DModel, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

ROOT = Path(__file__).resolve().parent.parent / "ddpo_cli" / "assets" / "model_configs"

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False)
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
           latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
VAE_SDXL = {**VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
VAE_16 = {**VAE, "latent_channels": 16, "sample_size": 1024, "use_quant_conv": False, "use_post_quant_conv": False}
VAE_SD3 = {**VAE_16, "scaling_factor": 1.5305, "shift_factor": 0.0609}
VAE_FLUX = {**VAE_16, "scaling_factor": 0.3611, "shift_factor": 0.1159}
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
UNET_SD = dict(act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
               down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], in_channels=4, layers_per_block=2,
               norm_num_groups=32, out_channels=4, sample_size=64,
               up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
UNET_SDXL = dict(act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64,
                 addition_time_embed_dim=256, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
                 cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                                             "CrossAttnDownBlock2D"],
                 in_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=4,
                 projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True)
SD3_MEDIUM = dict(attention_head_dim=64, caption_projection_dim=1536, in_channels=16, joint_attention_dim=4096,
                  num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2, pooled_projection_dim=2048,
                  pos_embed_max_size=192, sample_size=128)
SD35_MEDIUM = {**SD3_MEDIUM, "dual_attention_layers": list(range(13)), "pos_embed_max_size": 384, "qk_norm": "rms_norm"}
FLUX = dict(attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
            num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768)
FLOW_DYNAMIC = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                    base_shift=0.5, max_image_seq_len=4096, max_shift=1.15)

SD_PARTS = {"unet": (UNet2DConditionModel, UNET_SD), "text_encoder": (CLIPTextModel, CLIP_L),
            "vae": (AutoencoderKL, VAE)}
PIPELINES = {
    "CompVis/stable-diffusion-v1-4": ("StableDiffusionPipeline", {
        **SD_PARTS, "scheduler": (PNDMScheduler, {**SD_BETAS, "skip_prk_steps": True, "steps_offset": 1})}),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("StableDiffusionPipeline", {
        **SD_PARTS, "scheduler": (PNDMScheduler, {**SD_BETAS, "skip_prk_steps": True, "steps_offset": 1})}),
    "stabilityai/stable-diffusion-xl-base-1.0": ("StableDiffusionXLPipeline", {
        "unet": (UNet2DConditionModel, UNET_SDXL), "text_encoder": (CLIPTextModel, CLIP_L),
        "text_encoder_2": (CLIPTextModelWithProjection, CLIP_BIG_G), "vae": (AutoencoderKL, VAE_SDXL),
        "scheduler": (EulerDiscreteScheduler, {**SD_BETAS, "steps_offset": 1, "timestep_spacing": "leading"})}),
    "stabilityai/stable-diffusion-3-medium-diffusers": ("StableDiffusion3Pipeline", {
        "transformer": (SD3Transformer2DModel, SD3_MEDIUM), "text_encoder": (CLIPTextModelWithProjection, CLIP_L),
        "text_encoder_2": (CLIPTextModelWithProjection, CLIP_BIG_G), "text_encoder_3": (T5EncoderModel, T5_XXL),
        "vae": (AutoencoderKL, VAE_SD3), "scheduler": (FlowMatchEulerDiscreteScheduler, {"shift": 3.0})}),
    "stabilityai/stable-diffusion-3.5-medium": ("StableDiffusion3Pipeline", {
        "transformer": (SD3Transformer2DModel, SD35_MEDIUM), "text_encoder": (CLIPTextModelWithProjection, CLIP_L),
        "text_encoder_2": (CLIPTextModelWithProjection, CLIP_BIG_G), "text_encoder_3": (T5EncoderModel, T5_XXL),
        "vae": (AutoencoderKL, VAE_SD3), "scheduler": (FlowMatchEulerDiscreteScheduler, {"shift": 3.0})}),
    "black-forest-labs/FLUX.1-dev": ("FluxPipeline", {
        "transformer": (FluxTransformer2DModel, FLUX), "text_encoder": (CLIPTextModel, CLIP_L),
        "text_encoder_2": (T5EncoderModel, T5_XXL), "vae": (AutoencoderKL, VAE_FLUX),
        "scheduler": (FlowMatchEulerDiscreteScheduler, FLOW_DYNAMIC)}),
    "black-forest-labs/FLUX.1-schnell": ("FluxPipeline", {
        "transformer": (FluxTransformer2DModel, {**FLUX, "guidance_embeds": False}),
        "text_encoder": (CLIPTextModel, CLIP_L), "text_encoder_2": (T5EncoderModel, T5_XXL),
        "vae": (AutoencoderKL, VAE_FLUX), "scheduler": (FlowMatchEulerDiscreteScheduler, {"shift": 1.0})}),
}
TRANSFORMERS_CONFIGS = {CLIPTextModel: CLIPTextConfig, CLIPTextModelWithProjection: CLIPTextConfig,
                        T5EncoderModel: T5Config}


def write_component(folder: Path, cls, values: dict) -> None:
    folder.mkdir(parents=True)
    if cls in TRANSFORMERS_CONFIGS:
        config = TRANSFORMERS_CONFIGS[cls](**values)
        config.architectures = [cls.__name__]
        config.to_json_file(folder / "config.json")
    elif cls.__name__.endswith("Scheduler"):
        cls.from_config(values).save_config(folder)
    else:
        with torch.device("meta"):
            cls.from_config(values).save_config(folder)


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    for repo, (pipeline, parts) in PIPELINES.items():
        folder = ROOT / repo.replace("/", "--")
        index = {"_class_name": pipeline, **{name: [cls.__module__.split(".")[0], cls.__name__]
                                             for name, (cls, _) in parts.items()}}
        for name, (cls, values) in parts.items():
            write_component(folder / name, cls, values)
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        print(f"wrote {folder}", file=sys.stderr)


if __name__ == "__main__":
    main()
