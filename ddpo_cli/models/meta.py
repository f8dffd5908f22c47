"""A model family built on the meta device from its configs alone: shapes and parameter counts of real models
without downloading or allocating their weights (``ddpo plan``).

The configs come from where ``from_pretrained`` would read them: a local pipeline folder (the tiny models are
built and saved as one), the Hugging Face cache, and when neither has them the config-only snapshots shipped in
``ddpo_cli/assets/model_configs/`` (``scripts/write_model_configs.py``). The pipeline is then assembled from
components built on the meta device, without tokenizers, and prepared (LoRA, precision, gradient checkpointing) by
the family exactly as for training.
"""
from __future__ import annotations

import importlib
import inspect
import json
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ..errors import UserError
from .base import ModelFamily

SNAPSHOTS = Path(__file__).resolve().parents[1] / "assets" / "model_configs"
SKIPPED = ("safety_checker", "feature_extractor", "image_encoder")  # not part of what ddpo-cli loads


def config_folder(path: str, revision: str | None) -> Path:
    """A folder holding ``model_index.json`` and each component's config for the pipeline ``path``."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    try:
        cached = huggingface_hub.snapshot_download(path, revision=revision, allow_patterns=["*.json"],
                                                   local_files_only=True)
        if (Path(cached) / "model_index.json").exists():
            return Path(cached)
    except Exception:  # not cached (offline), or not a hub id
        pass
    shipped = SNAPSHOTS / path.replace("/", "--")
    if shipped.is_dir():
        return shipped
    known = ", ".join(sorted(p.name.replace("--", "/") for p in SNAPSHOTS.iterdir()))
    raise UserError(f"no configs of '{path}' here (not a folder, not in the Hugging Face cache, not shipped: "
                    f"{known}): fetch them with `hf download {path} --include '*.json'`")


def build_component(library: str, class_name: str, folder: Path):
    """One pipeline component from its config: models on the meta device, schedulers as they are."""
    cls = getattr(importlib.import_module(library), class_name)
    if library == "transformers":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            return cls(config)
    config = cls.load_config(folder)
    if class_name.endswith("Scheduler"):
        return cls.from_config(config)
    with torch.device("meta"):
        return cls.from_config(config)


def meta_pipeline(cls: type[ModelFamily], folder: Path):
    """The family's pipeline with every model component on the meta device (tokenizers absent)."""
    index = json.loads((folder / "model_index.json").read_text())
    accepted = inspect.signature(cls.pipeline_class.__init__).parameters
    parts = {}
    for name, entry in index.items():
        if name not in accepted or not isinstance(entry, list):
            continue
        library, class_name = entry
        skip = library is None or name.startswith("tokenizer") or name in SKIPPED
        parts[name] = None if skip else build_component(library, class_name, folder / name)
    absent = {name: None for name, param in accepted.items()
              if name != "self" and param.default is inspect.Parameter.empty and name not in parts}
    extra = {"requires_safety_checker": False} if "requires_safety_checker" in accepted else {}
    return cls.pipeline_class(**parts, **absent, **extra)


def meta_model(model_cfg: DictConfig, dtype: torch.dtype, path: str) -> ModelFamily:
    """The family of ``model_cfg`` on the meta device, prepared as for training (LoRA or trainable, precision,
    gradient checkpointing)."""
    from . import family_class  # deferred: the registry imports this module's siblings

    cls = family_class(model_cfg.family)
    pipe = meta_pipeline(cls, config_folder(path, model_cfg.revision))
    model = cls(pipe, torch.device("meta"), dtype, model_cfg.resolution, model_cfg.max_sequence_length,
                text_cache_mb=model_cfg.text_cache_mb)
    model.prepare(model_cfg)
    return model


@contextmanager
def flash_attention():
    """``scaled_dot_product_attention`` as a flash kernel, which keeps the output and a log-sum-exp per query for
    backward (as on GPUs and CPUs), not the attention matrix the meta device's reference kernel keeps."""
    original = F.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or enable_gqa:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                           scale=scale)[0]

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def training_activations(model: ModelFamily, pairs: int, guidance: float) -> tuple[int, int]:
    """What the training forward of ``pairs`` (sample, timestep) pairs keeps for backward, in bytes (each storage
    once; weights not counted), and the batch items the denoiser sees for them (twice ``pairs`` with classifier-free
    guidance). On the meta device this measures a real model without memory; on a real device it is the same count."""
    denoiser = model.denoiser
    weights = {t.untyped_storage()._cdata for t in [*denoiser.parameters(), *denoiser.buffers()]}
    saved: dict[int, int] = {}
    items: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    def count(module, args, kwargs) -> None:
        latents = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        items.append(int(latents.shape[0]))

    device = model.device
    hook = denoiser.register_forward_pre_hook(count, with_kwargs=True)
    was_training = denoiser.training
    denoiser.train()
    try:
        x = torch.zeros(pairs, *model.latent_shape(), device=device)
        t = torch.full((pairs,), 500.0, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), flash_attention():
            model.predict(denoiser, x, t, model.example_conditioning(pairs), model.example_conditioning(1), guidance)
    finally:
        hook.remove()
        denoiser.train(was_training)
    return sum(saved.values()), sum(items)
