"""What every model family shares: a frozen diffusers pipeline with a LoRA (or fully trainable) denoiser.

A family subclass says which pipeline class it loads, how prompts become a :class:`Conditioning` and how one
denoiser call looks (:meth:`ModelFamily.forward`). Everything else here works for any diffusers pipeline whose
denoiser supports peft adapters (UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel):

- loading, freezing, precision and LoRA (:meth:`prepare`);
- classifier-free guidance as one batched call (:meth:`predict`);
- decoding with the VAE's ``scaling_factor`` / ``shift_factor`` (:meth:`decode`);
- LoRA files in the format that plain ``<Pipeline>.load_lora_weights(dir)`` of the family reads.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from huggingface_hub import save_torch_state_dict
from omegaconf import DictConfig
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from ..text_features import TextFeatureCache
from ..errors import UserError, brief
from ..runs import LORA_FILE
from .conditioning import Conditioning


# LoraConfig fields of peft 0.15 (the oldest supported) that describe the adapter's shape and scale
PORTABLE_LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "use_dora",
                        "fan_in_fan_out", "rank_pattern", "alpha_pattern", "init_lora_weights")


class ModelFamily:
    family: str = "?"              # the model.family name
    kind: str = "diffusion"        # diffusion (DDPM-trained, DDIM sampler) | flow (rectified flow)
    pipeline_class = None          # the diffusers pipeline class that loads the folder and reads its LoRA files
    denoiser_name: str = "unet"    # the pipeline component that is trained (unet | transformer)

    def __init__(self, pipe, device: torch.device, dtype: torch.dtype, resolution: int | None = None,
                 max_sequence_length: int | None = None, text_cache_mb: float | None = None) -> None:
        self.pipe, self.device, self.dtype = pipe, torch.device(device), dtype
        if max_sequence_length is not None:
            self.max_sequence_length = max_sequence_length  # T5 tokens of the flow families
        self.resolution = resolution or self.native_resolution()
        if self.resolution % self.vae_scale_factor:
            raise UserError(f"model.resolution={self.resolution} is not a multiple of the VAE factor "
                            f"{self.vae_scale_factor}")
        self._conditioning = TextFeatureCache(self.encode_uncached,
                                              None if text_cache_mb is None else int(text_cache_mb * 2**20))
        self._negative: Conditioning | None = None

    # ------------------------------------------------------------------------------------------ parts
    @property
    def denoiser(self) -> torch.nn.Module:
        """The module that LoRA adapts and DDP wraps."""
        return getattr(self.pipe, self.denoiser_name)

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler_config(self) -> dict:
        """The noise schedule the model was trained with (the sampler builds its maths from it)."""
        return dict(self.pipe.scheduler.config)

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    def native_resolution(self) -> int:
        return self.denoiser.config.sample_size * self.vae_scale_factor

    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents for square images of ``self.resolution`` px."""
        side = self.resolution // self.vae_scale_factor
        return (self.denoiser.config.in_channels, side, side)

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of one prompt's conditioning, per :class:`Conditioning` field, read from the denoiser's config
        (``ddpo plan`` sizes the conditioning cache and builds inputs with it, without tokenizers)."""
        raise NotImplementedError

    def example_conditioning(self, n: int) -> Conditioning:
        """Empty conditioning of ``n`` prompts on the model's device (``ddpo plan`` runs the denoiser on it)."""
        return Conditioning(**{name: torch.empty(n, *shape, device=self.device, dtype=self.dtype)
                               for name, shape in self.conditioning_shapes().items()})

    # ------------------------------------------------------------------------------------------ set-up
    def prepare(self, model_cfg: DictConfig) -> list[torch.nn.Parameter]:
        """Freeze every component, store frozen weights in the compute dtype, add LoRA (fp32) to the denoiser or
        make it fully trainable (fp32; autocast handles compute). Returns the trainable parameters."""
        for module in self.modules():
            module.requires_grad_(False)
            module.eval()
            if module is not self.denoiser and not self.keeps_fp32(module):
                module.to(dtype=self.dtype)
        denoiser = self.denoiser
        if model_cfg.use_lora:
            denoiser.to(dtype=self.dtype)
            lora = model_cfg.lora
            try:
                denoiser.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=list(lora.target_modules), init_lora_weights="gaussian"))
            except ValueError as exc:  # peft: no module of the denoiser matches the targets
                raise UserError(f"model.lora.target_modules={list(lora.target_modules)} does not fit the "
                                f"{self.denoiser_name} of model.family={self.family} "
                                f"({brief(exc, 160)}): name its attention layers, e.g. "
                                f"[to_q,to_k,to_v,to_out.0]") from None
            for param in self.trainable_parameters():
                param.data = param.data.float()  # LoRA parameters stay fp32 under fp16/bf16
        else:
            denoiser.requires_grad_(True)
        if model_cfg.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        self.pipe.to(self.device)
        return self.trainable_parameters()

    def modules(self) -> list[torch.nn.Module]:
        return [c for c in self.pipe.components.values() if isinstance(c, torch.nn.Module)]

    def keeps_fp32(self, module: torch.nn.Module) -> bool:
        """A VAE that overflows in fp16 (``force_upcast``, e.g. SDXL's) stays fp32 under fp16."""
        return (module is self.vae and self.dtype == torch.float16
                and bool(getattr(self.vae.config, "force_upcast", False)))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------ text
    def encode(self, prompts: list[str]) -> Conditioning:
        """Conditioning of ``prompts`` (each distinct prompt is encoded once, alone, and cached)."""
        return Conditioning.cat(self._conditioning(prompts))

    def encode_uncached(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    @property
    def negative(self) -> Conditioning:
        """The one-row unconditional (negative) conditioning of classifier-free guidance: the empty prompt."""
        if self._negative is None:
            self._negative = self.encode([""])
        return self._negative

    # ------------------------------------------------------------------------------------------ denoiser
    def forward(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One denoiser call in the compute dtype: latents ``[N,C,h,w]``, time ``[N]`` -> output ``[N,C,h,w]`` fp32."""
        raise NotImplementedError

    def predict(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                guidance: float) -> torch.Tensor:
        """CFG as one batched call, ``out_u + w (out_c - out_u)``; the plain conditional output when ``w == 1``.

        ``uncond`` has one row or N. ``denoiser`` is passed in: the DDP-wrapped module in training, the bare one
        when sampling, the same one with its adapter disabled for the base model."""
        if guidance == 1.0:
            return self.forward(denoiser, x, t, cond)
        uncond = uncond.expand(len(cond)) if len(uncond) == 1 else uncond
        both = self.forward(denoiser, torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([uncond, cond]))
        out_uncond, out_cond = both.chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)

    # ------------------------------------------------------------------------------------------ images
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B,C,h,w]`` -> images ``[B,3,H,W]`` float32 in [0, 1] (differentiable: reward backprop uses it).

        Undoes the VAE's normalisation: ``z / scaling_factor + shift_factor`` (SD3 / FLUX have a shift), or
        ``z * latents_std / scaling_factor + latents_mean`` for VAEs with per-channel statistics."""
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            view = (1, -1, 1, 1)
            latents = (latents * torch.tensor(std, device=latents.device).view(view) / config.scaling_factor
                       + torch.tensor(mean, device=latents.device).view(view))
        else:
            latents = latents / config.scaling_factor
            if getattr(config, "shift_factor", None):
                latents = latents + config.shift_factor
        images = self.vae.decode(latents.to(self.vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B,3,H,W]`` in [0, 1] -> normalised latents ``[B,C,h,w]`` fp32 (the mean of the VAE's posterior):
        the inverse of :meth:`decode`, for training on given images (preference pairs)."""
        config = self.vae.config
        posterior = self.vae.encode((images * 2 - 1).to(self.device, self.vae.dtype)).latent_dist
        latents = posterior.mean.float()
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            view = (1, -1, 1, 1)
            return ((latents - torch.tensor(mean, device=latents.device).view(view)) * config.scaling_factor
                    / torch.tensor(std, device=latents.device).view(view))
        return (latents - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor

    # ------------------------------------------------------------------------------------------ weights
    def lora_state_dict(self, denoiser, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The denoiser's LoRA weights as its pipeline's loader reads them, fp32 on the CPU (no component prefix):
        diffusers' UNet key names (``lora.down`` / ``lora.up``) for UNet families, peft's (``lora_A`` / ``lora_B``)
        for transformers (as diffusers' own SD3 / FLUX LoRA scripts write them; converting would rename only the
        attention layers it knows from UNets, and a loader reading the mixed file drops those). ``weights``: the
        denoiser's parameters gathered whole from shards (:func:`ddpo_cli.distributed.whole_weights`)."""
        weights = get_peft_model_state_dict(denoiser, state_dict=weights)
        if self.denoiser_name == "unet":
            weights = convert_state_dict_to_diffusers(weights)
        return {k: v.detach().float().cpu() for k, v in weights.items()}

    def save_lora(self, denoiser, folder: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
        """``folder/pytorch_lora_weights.safetensors`` as the family's pipeline writes it (and reads it back).

        The adapter settings go into the file's header as diffusers expects, limited to the LoraConfig fields that
        every supported peft knows: the full config of a newer peft names fields an older one refuses to construct
        (peft 0.17 + diffusers 0.35: ``unexpected keyword argument 'alora_invocation_tokens'``)."""
        name = self.denoiser_name
        config = denoiser.peft_config["default"].to_dict()
        metadata = {key: config[key] for key in PORTABLE_LORA_FIELDS if key in config}
        self.pipeline_class.save_lora_weights(folder, safe_serialization=True,
                                              **{f"{name}_lora_layers": self.lora_state_dict(denoiser, weights),
                                                 f"{name}_lora_adapter_metadata": metadata})

    def load_lora(self, denoiser, folder: Path) -> None:
        """Load a LoRA file into a denoiser that already has the matching adapter."""
        folder = Path(folder)
        if not (folder / LORA_FILE).exists():
            if (folder / self.denoiser_name).is_dir():
                raise UserError(f"{folder} was saved by a full fine-tuning run (it has {self.denoiser_name}/ and no "
                                f"{LORA_FILE}): use model.use_lora=false")
            raise UserError(f"{folder} has no {LORA_FILE}: the checkpoint is incomplete")
        prefix = f"{self.denoiser_name}."
        try:
            weights = {k.removeprefix(prefix): v for k, v in load_file(folder / LORA_FILE).items()
                       if k.startswith(prefix)}
            result = set_peft_model_state_dict(denoiser, convert_unet_state_dict_to_peft(weights),
                                               adapter_name="default")
        except Exception as exc:  # a corrupt file (SafetensorError), or shapes of another rank (RuntimeError)
            reason = brief(exc, 200)
            raise UserError(f"{folder / LORA_FILE} cannot be loaded into this model's LoRA ({reason}): use the same "
                            f"model and model.lora settings as the run that wrote it") from None
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected or not weights:
            raise UserError(f"{folder} does not match this model's LoRA ({len(unexpected or [])} unexpected keys, "
                            f"{len(weights)} {self.denoiser_name} weights): use the same model and model.lora "
                            f"settings as the run that wrote it")

    def save_full(self, denoiser, folder: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Full fine-tuning: a folder ``from_pretrained`` loads, as the denoiser's ``save_pretrained`` writes it (its
        config, safetensors files of at most 10 GB with an index when there are several). ``weights``: the whole
        state dict gathered from shards (default: the denoiser's own)."""
        target = Path(folder) / self.denoiser_name
        denoiser.save_config(target)
        save_torch_state_dict(weights if weights is not None else denoiser.state_dict(), target,
                              filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB")

    def load_full(self, denoiser, folder: Path) -> None:
        source = Path(folder) / self.denoiser_name
        if not source.is_dir():
            raise UserError(f"{folder} has no {self.denoiser_name}/ folder: it was saved by a LoRA run; use "
                            f"model.use_lora=true")
        denoiser.load_state_dict(type(denoiser).from_pretrained(source).state_dict())


@contextmanager
def adapters_disabled(denoiser):
    """The base model: the same denoiser with its LoRA adapter switched off (no second copy in memory)."""
    denoiser.disable_adapters()
    try:
        yield denoiser
    finally:
        denoiser.enable_adapters()


def set_lora_scale(denoiser, scale: float, adapter: str = "default") -> None:
    """Scale the LoRA's weight change linearly: every adapted layer computes ``W0 + scale * (alpha / r) * B A``.

    peft's ``set_scale`` (through diffusers' ``set_adapters``) multiplies the layer's ``scaling`` and not the two
    factors, so the change is linear in ``scale``: 0 gives the base model exactly, 1 the LoRA as trained.
    """
    denoiser.set_adapters([adapter], weights=[float(scale)])
