"""The model-family seam: one module per family behind :class:`ModelFamily`, chosen by ``model.family``.

``model.family`` is a short name of ``FAMILIES`` (``sd``, ``sdxl``) or the dotted path of your own
:class:`ModelFamily` subclass (``mypackage.families.MyFamily``). A family answers: the denoiser (what LoRA and DDP
wrap), ``encode(prompts) -> Conditioning``, ``negative`` (CFG's unconditional row), ``predict(denoiser, x, t, cond,
uncond, guidance)``, ``decode(latents)``, ``latent_shape()``, ``scheduler_config`` (for the sampler) and LoRA / full
weights save and load in the format plain diffusers reads. :func:`load_model` is the one set-up that training,
``ddpo sample`` and ``ddpo eval`` share.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import diffusers
import huggingface_hub
import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig
from packaging.version import Version

from ..errors import UserError, brief
from .base import ModelFamily, adapters_disabled, set_lora_scale
from .conditioning import Conditioning
from .flux import Flux
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL
from .tiny import materialise_tiny

FAMILIES = {"sd": StableDiffusion, "sdxl": StableDiffusionXL, "sd3": StableDiffusion3, "flux": Flux}
# from_pretrained's precision argument: `dtype` from diffusers 0.40 (`torch_dtype` then warns), `torch_dtype` before
DTYPE_ARGUMENT = "dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype"
ASSETS = Path(__file__).resolve().parent.parent / "assets"

__all__ = ["Conditioning", "FAMILIES", "ModelFamily", "absent_components", "adapters_disabled", "family_class",
           "load_model", "set_lora_scale"]


def family_class(name: str) -> type[ModelFamily]:
    """``sd`` / ``sdxl`` or ``package.module.Class`` -> the family class. UserError if unknown."""
    if name in FAMILIES:
        return FAMILIES[name]
    module_name, _, attr = str(name).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr) if module_name else None
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, ModelFamily)):
        raise UserError(f"model.family={name!r}: choose one of {', '.join(FAMILIES)} or give the dotted path of a "
                        f"ddpo_cli.models.ModelFamily subclass")
    return cls


def resolve_model_path(model_cfg: DictConfig) -> str:
    """The hub id or local folder that ``from_pretrained`` should load for ``model_cfg``."""
    if model_cfg.builder == "tiny":
        return str(materialise_tiny(model_cfg.tiny, model_cfg.cache_dir, model_cfg.family))
    path = str(model_cfg.pretrained)
    if path.startswith(("package:", "pkg:")):
        return str(ASSETS / path.split(":", 1)[1])
    return path


def looks_like_a_path(name: str) -> bool:
    """Hub ids are ``owner/name``; anything else (absolute, relative, home, deeper) is meant as a folder."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def check_hub_reachable(repo_id: str, revision: str | None) -> None:
    """A hub model that is neither cached nor reachable fails here within seconds, with the way out, instead of
    after a minute of download retries."""
    if looks_like_a_path(repo_id):
        raise UserError(f"model.pretrained='{repo_id}': no such folder: give a diffusers pipeline folder or a hub id "
                        f"(owner/name)")
    try:
        if huggingface_hub.try_to_load_from_cache(repo_id, "model_index.json", revision=revision) is not None:
            return
        huggingface_hub.model_info(repo_id, revision=revision, timeout=10)
    except Exception as exc:  # offline mode, DNS, refused connection, unknown or gated repository, bad id
        reason = brief(exc, 160)
        raise UserError(f"cannot download model '{repo_id}' from the Hugging Face hub ({reason}): give a local "
                        f"diffusers folder with model.pretrained=<folder>, or run the CPU toy world with "
                        f"experiment=quickstart") from None


def check_source(model_cfg: DictConfig) -> None:
    """The weights are a local folder, a cached hub model or a reachable one (nothing is downloaded)."""
    path = resolve_model_path(model_cfg) if model_cfg.builder is None else None
    if path is not None and not Path(path).expanduser().exists():
        check_hub_reachable(path, model_cfg.revision)


def absent_components(folder: Path) -> dict:
    """``{name: None}`` for the components a local pipeline folder saved as absent (``[null, null]`` in
    model_index.json, e.g. SD3 without its T5): diffusers wants them named when loading."""
    index = folder / "model_index.json"
    if not index.exists():
        return {}
    entries = json.loads(index.read_text())
    return {name: None for name, value in entries.items() if isinstance(value, list) and value[0] is None}


def load_pipeline(cls: type[ModelFamily], path: str, model_cfg: DictConfig, dtype: torch.dtype):
    """``<family pipeline>.from_pretrained`` (hub id or local folder) with a one-line error if it cannot load."""
    local = Path(path).expanduser().exists()
    if not local and model_cfg.builder is None:
        check_hub_reachable(path, model_cfg.revision)
    try:
        kwargs = {DTYPE_ARGUMENT: dtype, **absent_components(Path(path).expanduser()), **cls.load_kwargs}
        pipe = cls.pipeline_class.from_pretrained(path, revision=model_cfg.revision, variant=model_cfg.variant,
                                                  **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        where = "local folder" if local else "hub model"
        first = brief(exc, 200)
        raise UserError(f"cannot load {where} '{path}' as a {cls.pipeline_class.__name__} ({first}): check "
                        f"model.family={cls.family} and model.pretrained (without network use model=tiny, "
                        f"model=tiny_shapes or a local diffusers folder)") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_model(model_cfg: DictConfig, device: torch.device, dtype: torch.dtype,
               lora_seed: int | None = None) -> ModelFamily:
    """Load the family's pipeline, freeze it, store frozen weights in ``dtype``, add the LoRA adapter (initialised
    from ``lora_seed``: the same on every process) or make the denoiser trainable, and move it to ``device``."""
    cls = family_class(model_cfg.family)
    pipe = load_pipeline(cls, resolve_model_path(model_cfg), model_cfg, dtype)
    model = cls(pipe, device, dtype, model_cfg.resolution, model_cfg.max_sequence_length,
                text_cache_mb=model_cfg.text_cache_mb)
    if lora_seed is not None:
        set_seed(lora_seed)  # after loading (building a tiny model draws numbers): same LoRA init on every rank
    model.prepare(model_cfg)
    return model
