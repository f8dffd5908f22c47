"""Tiny random pipelines of each family, built in code from a seed (conf/model/tiny*.yaml) for tests and benchmarks.

A tiny model is built once per spec, saved as an ordinary diffusers folder under ``model.cache_dir`` and then loaded
through the same ``from_pretrained`` path as a real model, so everything made on it (LoRA files) loads with plain
diffusers. Sizes follow diffusers' own dummy components.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5TokenizerFast)

from ..errors import UserError

SCHEDULER_CONFIG = dict(  # Stable Diffusion v1's noise schedule (SDXL uses the same betas)
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def byte_characters() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) uses to stand for the bytes 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tiny_tokenizer_files(folder: Path) -> None:
    """A character-level CLIP BPE vocabulary (bytes, bytes + '</w>', two specials), no merges: tokenizes any text."""
    chars = byte_characters()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def tiny_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        tiny_tokenizer_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77)


def text_config(spec: DictConfig) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=spec.text_hidden_size, intermediate_size=4 * spec.text_hidden_size,
        num_hidden_layers=spec.text_layers, num_attention_heads=4, vocab_size=2 * 256 + 2,
        max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
        projection_dim=spec.text_hidden_size)


def tiny_vae(spec: DictConfig, **extra) -> AutoencoderKL:
    n_vae = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(spec.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * n_vae, up_block_types=("UpDecoderBlock2D",) * n_vae,
        norm_num_groups=min(32, min(spec.vae_channels)), sample_size=spec.image_size, **extra)


def tiny_unet(spec: DictConfig, **extra) -> UNet2DConditionModel:
    n_unet = len(spec.unet_channels)
    return UNet2DConditionModel(
        sample_size=spec.image_size // 2 ** (len(spec.vae_channels) - 1), in_channels=4, out_channels=4,
        block_out_channels=tuple(spec.unet_channels), layers_per_block=spec.layers_per_block,
        cross_attention_dim=spec.cross_attention_dim,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_unet - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_unet - 1) + ("UpBlock2D",),
        attention_head_dim=8, norm_num_groups=min(32, min(spec.unet_channels)), **extra)


def build_tiny_sd(spec: DictConfig) -> StableDiffusionPipeline:
    """A randomly initialised SD-shaped pipeline; deterministic given ``spec`` (see conf/model/tiny.yaml)."""
    if spec.text_hidden_size != spec.cross_attention_dim:
        raise UserError(f"model.tiny.text_hidden_size={spec.text_hidden_size} must equal "
                        f"model.tiny.cross_attention_dim={spec.cross_attention_dim}")
    torch.manual_seed(spec.seed)
    unet = tiny_unet(spec)
    vae = tiny_vae(spec)
    text_encoder = CLIPTextModel(text_config(spec))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def build_tiny_sdxl(spec: DictConfig, time_embed_dim: int = 8) -> StableDiffusionXLPipeline:
    """A randomly initialised SDXL-shaped pipeline: two text encoders whose hidden states are concatenated
    (``cross_attention_dim = 2 x text_hidden_size``), the second with a projection giving the pooled embedding, and
    a UNet with text-time added conditioning (6 time ids)."""
    if spec.cross_attention_dim != 2 * spec.text_hidden_size:
        raise UserError(f"model.tiny.cross_attention_dim={spec.cross_attention_dim} must be 2 x "
                        f"model.tiny.text_hidden_size={spec.text_hidden_size} for an SDXL model (two text encoders)")
    torch.manual_seed(spec.seed)
    unet = tiny_unet(spec, use_linear_projection=True, addition_embed_type="text_time",
                     addition_time_embed_dim=time_embed_dim,
                     projection_class_embeddings_input_dim=6 * time_embed_dim + spec.text_hidden_size)
    vae = tiny_vae(spec)
    text_encoder = CLIPTextModel(text_config(spec))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(spec))
    tokenizer = tiny_tokenizer()
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=DDIMScheduler(**SCHEDULER_CONFIG), force_zeros_for_empty_prompt=True)


def build_tiny_sd3(spec: DictConfig) -> StableDiffusion3Pipeline:
    """A randomly initialised SD3-shaped pipeline: an MMDiT transformer (``transformer_layers`` joint blocks of
    ``attention_heads`` x ``attention_head_dim``), two CLIP text encoders with projections (no T5: its tokens are
    zeros, as the pipeline does without one), a VAE with a shift factor, the SD3 flow schedule (shift 3)."""
    latent = spec.image_size // 2 ** (len(spec.vae_channels) - 1)
    inner = spec.attention_heads * spec.attention_head_dim
    torch.manual_seed(spec.seed)
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=spec.patch_size, in_channels=4, out_channels=4,
        num_layers=spec.transformer_layers, attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.attention_heads, joint_attention_dim=2 * spec.text_hidden_size,
        caption_projection_dim=inner, pooled_projection_dim=2 * spec.text_hidden_size,
        pos_embed_max_size=latent // spec.patch_size)
    vae = tiny_vae(spec, scaling_factor=1.5, shift_factor=0.1)
    text_encoder = CLIPTextModelWithProjection(text_config(spec))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(spec))
    tokenizer = tiny_tokenizer()
    return StableDiffusion3Pipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=None,
                                    tokenizer_3=None, image_encoder=None, feature_extractor=None,
                                    scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A character-level T5 tokenizer (Unigram over printable ASCII and '▁', then ``</s>``), built in code."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(i), -1.0) for i in range(33, 127)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def build_tiny_flux(spec: DictConfig) -> FluxPipeline:
    """A randomly initialised FLUX.1-dev-shaped pipeline: a FluxTransformer2DModel (``transformer_layers`` double and
    as many single blocks) over 2x2-packed latents with a guidance embedding, a CLIP text encoder (pooled) and a
    small T5 encoder with a character tokenizer, a VAE with a shift factor, FLUX's dynamically shifted schedule."""
    inner_head = spec.attention_head_dim
    torch.manual_seed(spec.seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=spec.transformer_layers, num_single_layers=spec.transformer_layers,
        attention_head_dim=inner_head, num_attention_heads=spec.attention_heads,
        joint_attention_dim=spec.text_hidden_size, pooled_projection_dim=spec.text_hidden_size, guidance_embeds=True,
        axes_dims_rope=(inner_head // 4, inner_head // 4, inner_head // 2))
    vae = tiny_vae(spec, scaling_factor=1.5, shift_factor=0.1)
    text_encoder = CLIPTextModel(text_config(spec))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=98, d_model=spec.text_hidden_size, d_kv=8,
                                             d_ff=2 * spec.text_hidden_size, num_layers=2, num_heads=4,
                                             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(),
                        text_encoder_2=text_encoder_2, tokenizer_2=tiny_t5_tokenizer(), scheduler=scheduler,
                        image_encoder=None, feature_extractor=None)


TINY_BUILDERS = {"sd": build_tiny_sd, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}


def portable_text_encoders(folder: Path) -> None:
    """Rewrite the CLIP text encoders of a saved pipeline folder in the key layout every supported transformers loads.

    transformers >= 5.6 saves them without the ``text_model.`` key prefix, and transformers 4.x then loads a
    randomly initialised text encoder with only a warning; the prefixed layout loads the same in both (measured:
    max abs difference 0.0 of the shipped tiny_shapes encoder's output under transformers 4.45 and 5.24).
    """
    for encoder in sorted(folder.glob("text_encoder*")):
        weights_file = encoder / "model.safetensors"
        config = encoder / "config.json"
        if not weights_file.exists() or not json.loads(config.read_text()).get("model_type", "").startswith("clip"):
            continue  # only CLIP text encoders changed layout (not T5)
        with safe_open(weights_file, "pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
        weights = load_file(weights_file)
        portable = {key if key.startswith("text_model.") or key.startswith("text_projection.")
                    else f"text_model.{key}": value.contiguous() for key, value in weights.items()}
        save_file(portable, weights_file, metadata=metadata)


def materialise_tiny(spec: DictConfig, cache_dir: str, family: str = "sd") -> Path:
    """Build the tiny pipeline of ``family`` once per spec and save it under ``cache_dir``; returns the folder
    (written to a staging folder and renamed into place, so a half-written model is never used)."""
    if family not in TINY_BUILDERS:
        raise UserError(f"model.builder=tiny has no tiny {family!r} model: choose model.family from "
                        f"{', '.join(TINY_BUILDERS)}")
    container = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
    digest = hashlib.sha1(json.dumps(container, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(os.path.expanduser(cache_dir)) / f"tiny-{family}-{digest}"
    if complete(folder):
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # a half-saved copy (another version's bug) is rebuilt, not reused
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    TINY_BUILDERS[family](OmegaConf.create(container)).save_pretrained(staging, safe_serialization=True)
    portable_text_encoders(staging)
    for tokenizer in staging.glob("tokenizer*"):  # transformers >= 5 saves tokenizer.json only; 4.x needs these
        tiny_tokenizer_files(tokenizer)
    if not complete(staging):
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"building the tiny model in {folder.parent} left some weights unsaved: build it in a "
                        f"single process first (e.g. one `ddpo train model=tiny train.num_epochs=1`)")
    try:
        staging.rename(folder)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def complete(folder: Path) -> bool:
    """A saved pipeline folder whose every model component holds its weights file."""
    if not (folder / "model_index.json").exists():
        return False
    components = [p for p in folder.iterdir() if (p / "config.json").exists()]
    return all(any(p.glob("*.safetensors")) or any(p.glob("*.bin")) for p in components)
