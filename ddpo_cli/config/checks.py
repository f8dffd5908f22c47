"""Value checks that the types cannot express, of the sections the commands share and of rules between parts.

A part checks its own settings (samplers, noise strategies, algorithms, rewards, prompt sets); here is only what no
single part owns. Each failure is a UserError of one line naming the key and the fix.
"""
from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from ..errors import UserError
from ..runs import load_run_config, resolve_checkpoint, resolve_checkpoints, sweep_job_dirs
from ..runtime import DEVICES, PRECISIONS
from ..schedules import SCHEDULES
from .compose import check_target
from .run_defaults import check_trusted, extra_rewards

SAFE_NAME = re.compile(r"[A-Za-z0-9_.=,+-]+")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def nonfinite_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every NaN / inf number in a config (pluggable ``_target_`` nodes included)."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in nonfinite_keys(value, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, value in enumerate(node) for k in nonfinite_keys(value, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if isinstance(node, float) and not math.isfinite(node) else []


def check_name(value: str, key: str) -> None:
    """A name that becomes part of a path: no folder separators, not '.' or '..'."""
    require(bool(SAFE_NAME.fullmatch(value)) and value not in (".", ".."),
            f"{key}={value!r}: use letters, digits and _ . = , + - only (it names a folder)")


def at_least_one(node: DictConfig, section: str, *names: str) -> None:
    for name in names:
        require(node[name] >= 1, f"{section}.{name}={node[name]}: must be >= 1")


def check_runtime(cfg: DictConfig) -> None:
    """What every command shares: finite numbers, the device, the precision, the CPU threads."""
    for key in nonfinite_keys(OmegaConf.to_container(cfg, resolve=True))[:1]:
        raise UserError(f"{key}={OmegaConf.select(cfg, key)}: must be a finite number")
    require(cfg.device in DEVICES, f"device={cfg.device!r}: choose {', '.join(DEVICES)}")
    require(cfg.precision in PRECISIONS, f"precision={cfg.precision!r}: choose {', '.join(PRECISIONS)}")
    require(cfg.threads is None or cfg.threads >= 1, f"threads={cfg.threads}: use >= 1, or null for torch's default")


def check_model(model: DictConfig) -> None:
    require(model.builder in (None, "tiny"), f"model.builder={model.builder!r}: only 'tiny' is built in")
    require(model.builder is not None or bool(model.pretrained),
            "model.pretrained is empty: give a hub id or a local pipeline folder (or use model=tiny)")
    require(model.resolution is None or model.resolution > 0,
            f"model.resolution={model.resolution}: use a positive number of pixels, or null for the native size")
    require(model.text_cache_mb is None or model.text_cache_mb >= 0,
            f"model.text_cache_mb={model.text_cache_mb}: use >= 0 MB, or null for no bound")
    lora = model.lora
    require(lora.rank >= 1, f"model.lora.rank={lora.rank}: use >= 1 (or model.use_lora=false)")
    require(lora.alpha > 0, f"model.lora.alpha={lora.alpha}: must be > 0")
    require(0 <= lora.dropout < 1, f"model.lora.dropout={lora.dropout}: must be in [0, 1)")
    require(len(lora.target_modules) > 0, "model.lora.target_modules is empty: name the layers to adapt")


# ----------------------------------------------------------------------------------------------- ddpo train
def check_values(cfg: DictConfig) -> None:
    """The training config's values (the pluggable parts check their own when built). Raises UserError."""
    # deferred (not a cycle): the family and sampler registries import torch and diffusers, which `ddpo ls` and
    # `ddpo --help` need not pay for
    from ..models import family_class
    from ..noise import check_noise
    from ..samplers import check_sampler

    check_runtime(cfg)
    check_model(cfg.model)
    check_sampler(cfg.sampler, family_class(cfg.model.family))
    check_noise(cfg.sampler, cfg.advantage.mode)
    check_train(cfg.train)
    check_advantage(cfg.advantage, cfg.sampler.group_size)
    check_log(cfg)
    check_name(str(cfg.run_name), "run_name")
    at_least_one(cfg.sampler, "sampler", "batch_size", "num_batches_per_epoch")
    at_least_one(cfg.checkpoint, "checkpoint", "every")
    require(cfg.checkpoint.keep_last is None or cfg.checkpoint.keep_last >= 1,
            f"checkpoint.keep_last={cfg.checkpoint.keep_last}: use >= 1, or null to keep all")


def check_train(t: DictConfig) -> None:
    at_least_one(t, "train", "batch_size", "gradient_accumulation_steps", "num_epochs", "num_inner_epochs",
                 "timesteps_per_forward")
    require(0 < t.timestep_fraction <= 1, f"train.timestep_fraction={t.timestep_fraction}: must be in (0, 1]")
    require(t.lr > 0, f"train.lr={t.lr}: must be > 0")
    require(t.lr_schedule in SCHEDULES, f"train.lr_schedule={t.lr_schedule!r}: choose {' or '.join(SCHEDULES)}")
    for key in ("adam_beta1", "adam_beta2"):
        require(0 <= t[key] < 1, f"train.{key}={t[key]}: use a value in [0, 1) (AdamW's moving-average decay; the "
                                 f"defaults are 0.9 and 0.999)")
    require(t.adam_epsilon > 0, f"train.adam_epsilon={t.adam_epsilon}: use > 0 (it keeps AdamW from dividing by "
                                f"zero; the default is 1e-8)")
    require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay}: use >= 0")
    require(t.max_grad_norm > 0, f"train.max_grad_norm={t.max_grad_norm}: use > 0 (a negative norm flips the "
                                 f"gradient)")
    require(t.nonfinite_rewards in ("stop", "drop"),
            f"train.nonfinite_rewards={t.nonfinite_rewards!r}: choose stop or drop")


def check_advantage(a: DictConfig, group_size: int) -> None:
    require(a.mode in ("per_prompt", "batch", "group"), f"advantage.mode={a.mode!r}: choose per_prompt, batch or group")
    require(a.mode != "group" or group_size > 1,
            "advantage.mode=group needs sampler.group_size > 1 (k images per prompt)")
    require(a.buffer_size >= 1 and a.min_count >= 0,
            f"advantage.buffer_size={a.buffer_size}, advantage.min_count={a.min_count}: need buffer_size >= 1 and "
            f"min_count >= 0")


def check_log(cfg: DictConfig) -> None:
    log, paired = cfg.log, cfg.log.paired
    at_least_one(log, "log", "image_every", "reward_worker_threads")
    require(paired.every >= 0 and paired.images >= 1,
            f"log.paired.every={paired.every}, log.paired.images={paired.images}: need every >= 0 (0 = off) and "
            f"images >= 1")
    require(log.grid_images >= 1, f"log.grid_images={log.grid_images}: use >= 1 (raise log.image_every to draw "
                                  f"grids less often)")
    require(log.kl_to_base_every >= 0, f"log.kl_to_base_every={log.kl_to_base_every}: use >= 0 (0 = never)")
    require(log.tracker in ("tensorboard", "wandb", "none"),
            f"log.tracker={log.tracker!r}: choose tensorboard, wandb or none")
    require(log.tracker != "wandb" or importlib.util.find_spec("wandb") is not None,
            "log.tracker=wandb needs the wandb package: pip install wandb (or use log.tracker=tensorboard)")
    check_name(str(log.project), "log.project")


# ----------------------------------------------------------------------------------------------- sample / eval
def validate_common(cfg: DictConfig) -> None:
    from ..samplers import check_sampler  # deferred: see check_values

    check_runtime(cfg)
    require(cfg.n >= 1, f"n={cfg.n}: give at least one image per prompt")
    require(cfg.num_prompts is None or cfg.num_prompts >= 1, f"num_prompts={cfg.num_prompts}: use >= 1 or null")
    require(cfg.lora_scale >= 0, f"lora_scale={cfg.lora_scale}: use 0 (base) .. 1 (as trained)")
    at_least_one(cfg.sampler, "sampler", "batch_size")
    check_sampler(cfg.sampler)  # the model family may still come from the run: its match is checked when loaded
    check_model(cfg.model)
    if cfg.run:
        check_trusted(load_run_config(cfg.run), cfg.run, cfg.trust_run)
    check_target(cfg.prompts, "prompts")
    if cfg.reward is not None:
        check_target(cfg.reward, "reward")


def validate_sample(cfg: DictConfig) -> None:
    """Checks of ``ddpo sample`` before anything is written. Raises UserError."""
    validate_common(cfg)
    resolve_checkpoint(cfg.run, cfg.checkpoint)


def validate_eval(cfg: DictConfig, config_dir: Optional[Path] = None) -> None:
    """Checks of ``ddpo eval`` before anything is written. Raises UserError."""
    if cfg.sweep:
        require(not cfg.run, "give either run=<run dir> or sweep=<multirun dir>, not both")
        sweep_job_dirs(Path(cfg.sweep))
        return
    require(bool(cfg.run), "ddpo eval needs run=<run dir> (or sweep=<multirun dir> to summarise a sweep)")
    validate_common(cfg)
    require(cfg.grid_prompts >= 0 and cfg.grid_images >= 1 and cfg.diversity_size >= 4,
            "grid_prompts must be >= 0, grid_images >= 1, diversity_size >= 4")
    names = set(extra_rewards(cfg, config_dir))
    require(cfg.gold is None or cfg.gold in names,
            f"gold={cfg.gold!r} is not one of the rewards ({', '.join(sorted(names)) or 'none given'}): "
            f"add it with rewards.{cfg.gold}=<reward option>")
    resolve_checkpoints(cfg.run, cfg.checkpoints)
