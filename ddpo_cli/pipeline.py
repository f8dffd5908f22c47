"""Load a Stable Diffusion pipeline (hub id or local folder), freeze it, add LoRA, set precision; tiny builder.

The tiny model is built from a seed and saved once as an ordinary diffusers folder, then loaded through the same
``from_pretrained`` path as Stable Diffusion, so everything made on it (LoRA files) loads with plain diffusers.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .errors import UserError

SCHEDULER_CONFIG = dict(  # Stable Diffusion v1's noise schedule
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


def build_tiny_pipeline(spec: DictConfig | dict):
    """A randomly initialised SD-shaped pipeline; deterministic given ``spec`` (see conf/model/tiny.yaml)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = spec if isinstance(spec, DictConfig) else OmegaConf.create(spec)
    torch.manual_seed(spec.seed)
    n_vae = len(spec.vae_channels)
    latent_size = spec.image_size // 2 ** (n_vae - 1)
    n_unet = len(spec.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=tuple(spec.unet_channels),
        layers_per_block=spec.layers_per_block, cross_attention_dim=spec.cross_attention_dim,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_unet - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_unet - 1) + ("UpBlock2D",),
        attention_head_dim=8, norm_num_groups=min(32, min(spec.unet_channels)))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(spec.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * n_vae, up_block_types=("UpDecoderBlock2D",) * n_vae,
        norm_num_groups=min(32, min(spec.vae_channels)), sample_size=spec.image_size)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=spec.text_hidden_size, intermediate_size=4 * spec.text_hidden_size,
        num_hidden_layers=spec.text_layers, num_attention_heads=4, vocab_size=2 * 256 + 2,
        max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
        projection_dim=spec.cross_attention_dim))
    if spec.text_hidden_size != spec.cross_attention_dim:
        raise UserError(f"model.tiny.text_hidden_size={spec.text_hidden_size} must equal "
                        f"model.tiny.cross_attention_dim={spec.cross_attention_dim}")
    with tempfile.TemporaryDirectory() as tmp:
        tiny_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def materialise_tiny(spec: DictConfig, cache_dir: str) -> Path:
    """Build the tiny pipeline once per spec and save it under ``cache_dir``; returns the folder (atomic write)."""
    container = OmegaConf.to_container(spec, resolve=True)
    digest = hashlib.sha1(json.dumps(container, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(os.path.expanduser(cache_dir)) / f"tiny-{digest}"
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    build_tiny_pipeline(container).save_pretrained(staging, safe_serialization=True)
    try:
        staging.rename(folder)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def resolve_model_path(cfg: DictConfig) -> str:
    """The hub id or local folder that ``from_pretrained`` should load for ``cfg.model``."""
    if cfg.model.builder == "tiny":
        return str(materialise_tiny(cfg.model.tiny, cfg.model.cache_dir))
    path = str(cfg.model.pretrained)
    if path.startswith(("package:", "pkg:")):
        return str(Path(__file__).parent / "assets" / path.split(":", 1)[1])
    return path


def load_pipeline(cfg: DictConfig, torch_dtype: torch.dtype = torch.float32):
    """``StableDiffusionPipeline.from_pretrained`` with DDIM, no safety checker, and a one-line error if unreachable."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = resolve_model_path(cfg)
    local = Path(path).expanduser().exists()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            path, revision=cfg.model.revision, variant=cfg.model.variant, dtype=torch_dtype,
            safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as exc:
        where = "local folder" if local else "hub model"
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"cannot load {where} '{path}' ({first}); without network use model=tiny, model=tiny_shapes "
                        f"or model.pretrained=/path/to/a/diffusers/folder") from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def freeze(pipe) -> None:
    """No gradients into the VAE, the text encoder and (until LoRA or full fine-tuning says so) the UNet."""
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False)
        module.eval()


def add_lora(unet, lora_cfg: DictConfig) -> None:
    """Attach a peft LoRA adapter named 'default' to the UNet; only its parameters require grad."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                                target_modules=list(lora_cfg.target_modules), init_lora_weights="gaussian"))


def trainable_parameters(unet) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def prepare_for_training(pipe, model_cfg: DictConfig, weight_dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Freeze, cast frozen weights to ``weight_dtype``, add LoRA (fp32) or unfreeze the UNet (full fine-tuning)."""
    freeze(pipe)
    pipe.vae.to(dtype=weight_dtype)
    pipe.text_encoder.to(dtype=weight_dtype)
    if model_cfg.use_lora:
        pipe.unet.to(dtype=weight_dtype)
        add_lora(pipe.unet, model_cfg.lora)
        for param in trainable_parameters(pipe.unet):
            param.data = param.data.float()  # LoRA parameters stay fp32 under fp16/bf16
    else:
        pipe.unet.requires_grad_(True)  # full fine-tuning keeps the UNet in fp32; autocast handles compute
    if model_cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    return trainable_parameters(pipe.unet)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device) -> torch.Tensor:
    """Token ids padded to the tokenizer's max length -> text encoder last hidden state ``[N, L, D]``."""
    tokens = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
    return pipe.text_encoder(tokens)[0]


class PromptEmbeddingCache:
    """Encodes each distinct prompt once; ``""`` is the unconditional (negative) prompt."""

    def __init__(self, pipe, device) -> None:
        self.pipe, self.device, self.cache = pipe, device, {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self.cache})
        if missing:
            for prompt, embedding in zip(missing, encode_prompts(self.pipe, missing, self.device)):
                self.cache[prompt] = embedding
        return torch.stack([self.cache[p] for p in prompts])


def latent_shape(pipe, resolution: int | None = None) -> tuple[int, int, int]:
    """``(C, h, w)`` of the UNet's latents for square images of ``resolution`` px (None = the model's native size)."""
    scale = pipe.vae_scale_factor
    side = resolution or pipe.unet.config.sample_size * scale
    if side % scale:
        raise UserError(f"model.resolution={side} is not a multiple of the VAE factor {scale}")
    return (pipe.unet.config.in_channels, side // scale, side // scale)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents ``[B,C,h,w]`` -> images ``[B,3,H,W]`` float32 in [0, 1] (differentiable: reward backprop uses it)."""
    images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def set_lora_scale(unet, scale: float, adapter: str = "default") -> None:
    """Scale the LoRA's weight change linearly: every adapted layer computes ``W0 + scale * (alpha / r) * B A``.

    peft's ``set_scale`` (through diffusers' ``set_adapters``) multiplies the layer's ``scaling`` and not the two
    factors, so the change is linear in ``scale``: 0 gives the base model exactly, 1 the LoRA as trained.
    """
    unet.set_adapters([adapter], weights=[float(scale)])
