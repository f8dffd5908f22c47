"""The typed config schema (registered in Hydra's ConfigStore), composition, validation and the derived counts.

Fixed-shape sections (model, sampler, train, advantage, checkpoint, log) are dataclasses: an unknown key or a wrong
type fails at composition. Pluggable sections (algo, reward, prompts) are ``_target_`` nodes whose keys are checked
against the target's signature by :func:`check_target`.

:func:`plan_run` reads a training config once: it checks every value, builds the algorithm, the reward and the prompt
set (cheap: constructors load no models), lets the algorithm check its own settings, derives the batch counts and
resolves the resume checkpoint. The CLI calls it before Hydra creates a run folder; the trainer reuses the result.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from .errors import UserError, brief
from .runs import find_checkpoint, list_checkpoints, read_state, run_dir_of
from .schedules import SCHEDULES


@dataclass
class LoraConfig:
    rank: int = 4
    alpha: float = 4.0  # scale = alpha / rank; alpha == rank matches diffusers' network_alpha=None
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class TinyModelConfig:
    """A small pipeline of ``model.family`` built in code from a seed (used when ``model.builder == "tiny"``)."""

    seed: int = 0
    unet_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 2
    cross_attention_dim: int = 32
    vae_channels: list[int] = field(default_factory=lambda: [32, 64])
    text_hidden_size: int = 32
    text_layers: int = 5
    image_size: int = 32
    transformer_layers: int = 2   # flow families (MMDiT): joint transformer blocks
    attention_heads: int = 4
    attention_head_dim: int = 8
    patch_size: int = 2


@dataclass
class ModelConfig:
    name: str = "sd15"
    family: str = "sd"  # sd | sdxl | sd3 (ddpo_cli/models/), or the dotted path of a ModelFamily subclass
    pretrained: Optional[str] = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id or local pipeline folder
    revision: Optional[str] = None
    variant: Optional[str] = None
    builder: Optional[str] = None  # "tiny": build in code, materialise under cache_dir, load from there
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    cache_dir: str = "${oc.env:DDPO_CACHE,'~/.cache/ddpo_cli'}"
    use_lora: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    resolution: Optional[int] = None  # image side in pixels; None = the model's native size
    max_sequence_length: Optional[int] = None  # SD3 / FLUX: T5 tokens per prompt (zeros without a T5); None = the
    # pipeline's default (SD3 256, FLUX 512). SD3 without a T5 on diffusers < 0.36: the pipeline pads with the CLIP
    # length instead, whatever this says (the family follows the installed pipeline)


@dataclass
class SamplerConfig:
    name: str = "ddim"            # ddim | flow_ode | flow_sde | dance_sde | flow_cps (ddpo_cli/samplers/)
    num_steps: int = 50
    eta: float = 1.0              # ddim: 0 = deterministic, 1 = DDPM-like noise
    noise_level: float = 0.7      # flow_sde / dance_sde / flow_cps: the noise of a stochastic step (0 = the ODE)
    sde_window: Optional[list[int]] = None  # [first, end) step indices that are stochastic (and trained); the
    # others are deterministic (ODE / DDIM eta 0) steps. null = all (Flow-GRPO, DDPO); a few steps = MixGRPO /
    # Flow-GRPO-Fast (flow and ddim samplers)
    sde_window_slide_every: int = 0  # > 0: move the SDE window one step later every this many epochs (wrapping)
    log_prob: str = "exact"       # of a stochastic step: exact (the Gaussian's) | unscaled (-mean((x - mean)^2), Flow-CPS's
    # code: no 1 / (2 std^2), so near-deterministic steps do not dominate the PPO ratio; not a likelihood ratio)
    guidance_scale: float = 5.0
    batch_size: int = 1           # per device
    num_batches_per_epoch: int = 2
    group_size: int = 1           # k images per prompt from the same initial noise (group advantages)
    branch: bool = False          # trajectory branching: a group shares every noise draw but one trained step's
    # (a step of the training window, one per group), and trains only that step, so the group's advantages measure
    # that step's noise alone (TempFlow-GRPO's branching; the other steps keep their noise, drawn once per group)
    antithetic: bool = False      # mirrored pairs in each group: the second image of a pair gets the negative of the
    # first's noise at the trained steps and the same noise elsewhere (variance reduction; needs an even group_size)


@dataclass
class PreserveConfig:
    """Prior preservation: keep the policy's output on other prompts at the base model's (adapter off), so that what
    a run learns on its prompts does not spill into the rest of the model. 0 = off."""
    weight: float = 0.0           # loss += weight x mean squared difference of the guided outputs, policy vs base
    prompts: Optional[str] = None  # a prompts option (conf/prompts) to draw them from; the run's own prompts are
    # left out (e.g. shapes_train: the other toy-world training combos; the held-out set is never used)
    pairs: int = 16               # (state, prompt) pairs per optimizer step: a stored state of this epoch's chains
    # at a trained step, under a prompt drawn from the set


@dataclass
class TrainConfig:
    num_epochs: int = 100
    batch_size: int = 1           # samples per device per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    num_inner_epochs: int = 1
    timestep_fraction: float = 1.0   # share of the window's steps trained per sample (a fresh random subset each)
    timestep_window: list[float] = field(default_factory=lambda: [0.0, 1.0])  # part of the chain trained:
    # 0 = the first (noisiest) step, 1 = the end. [0, 0.3] trains only the early steps that decide layout and count.
    # rwr/rwr_sparse draw their own noise levels; for them window x fraction only sets the draws per sample.
    timesteps_per_forward: int = 4  # (sample, timestep) pairs batched per denoiser call = batch_size x this
    cfg: bool = True              # train through classifier-free guidance (as sampled)
    lr: float = 3e-4
    lr_schedule: str = "constant"  # constant | cosine (lr -> 0 over the run's optimizer steps; a function of the
    # step, so resume is exact). Late updates of a long run then settle instead of drifting.
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16   (auto: bf16/fp16 on CUDA, fp32 on CPU; bf16 also
    # on CPUs with bf16 units)
    nonfinite_rewards: str = "stop"  # stop: a NaN/inf reward ends the run with one line naming it; drop: train
    # without those samples (their advantage / weight is 0; counted as nonfinite_rewards in metrics.jsonl)
    preserve: PreserveConfig = field(default_factory=PreserveConfig)


@dataclass
class AdvantageConfig:
    mode: str = "per_prompt"      # per_prompt | batch | group
    buffer_size: int = 16
    min_count: int = 16
    shuffle: bool = False         # a control run: permute each epoch's advantages (or weights) across the batch; same
    # update sizes, no link to the samples. A learning claim must beat it (tests/test_learning.py does).


@dataclass
class CheckpointConfig:
    every: int = 1                # epochs between checkpoints; the last epoch is always saved
    keep_last: Optional[int] = 5  # None keeps all


@dataclass
class PairedConfig:
    """The paired measure (ddpo_cli/probe.py): policy vs base model on fixed prompts and noise, during the run."""
    every: int = 0                # epochs between measurements of the policy (0 = off); the base is scored once
    images: int = 64              # fixed (prompt, noise) pairs per prompt set; prompts cycle through the set
    heldout: Optional[str] = None  # a prompts option (conf/prompts) measured too, e.g. shapes_heldout: does the
    # gain carry over to prompts the run never trains on?
    metric: str = "reward"        # the headline of the curve and the end summary: reward or a reward-info key
    # (shapes_counting: exact = exact-count accuracy)


@dataclass
class LogConfig:
    tracker: str = "tensorboard"  # tensorboard | wandb | none
    project: str = "ddpo-cli"
    image_every: int = 1          # epochs between image grids and reward-curve plots (the last epoch always)
    grid_images: int = 16
    async_reward: bool = True
    reward_worker_threads: int = 1  # torch CPU threads of the async reward thread (a full team slows training)
    kl_to_base_every: int = 1     # epochs between KL-to-base measurements (0 = never); ~2 extra denoiser calls each
    paired: PairedConfig = field(default_factory=PairedConfig)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    algo: Any = MISSING
    reward: Any = MISSING
    prompts: Any = MISSING
    seed: int = 42
    run_name: str = "run"
    resume: Optional[str] = None
    resume_allow_changes: bool = False  # resume with another algo or reward than the checkpoint's (its optimizer
    # state and statistics came from that objective): refused unless true, then the changes are listed at start-up
    device: str = "auto"          # auto | cpu | cuda   (accelerate decides under `accelerate launch`)
    threads: Optional[int] = None  # torch CPU threads; None = torch default


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


register_configs()


# ----------------------------------------------------------------------------------------------- composition
def conf_dir() -> Path:
    """The config tree: the repository's conf/ in a source checkout, else the copy shipped as ddpo_cli.conf."""
    source = Path(__file__).resolve().parent.parent / "conf"
    if (source / "train.yaml").exists():
        return source
    return Path(str(resources.files("ddpo_cli.conf")))


def compose(config_name: str, overrides: list[str], config_dir: Path | None = None,
            return_hydra_config: bool = False) -> DictConfig:
    """Compose the config as Hydra would (no run directory); ``config_dir`` is a user's extra config folder
    (``-cd``), searched after the built-in tree; ``return_hydra_config`` adds the ``hydra`` section (run folders).
    Raises UserError with a one-line reason."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [o for o in overrides if not o.startswith("hydra.")]
    if config_dir is not None:
        overrides.append(f"hydra.searchpath=[file://{Path(config_dir).resolve()}]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides,
                                 return_hydra_config=return_hydra_config)
    except UserError:
        raise
    except Exception as exc:  # Hydra and OmegaConf errors: keep the most specific line
        raise UserError(config_error_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()


def config_error_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    head = lines[0] if lines else type(cause).__name__
    full_key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), "")
    hint = "see the options with `ddpo ls` and the keys with `ddpo train --cfg job`"
    return f"invalid config: {head}{f' (key: {full_key})' if full_key else ''}; {hint}"


def group_option(group: str, name: str, config_dir: Path | None = None) -> DictConfig:
    """The config of option ``name`` of ``group`` (e.g. a reward named on the command line), looked up like
    ``group=name`` would be: the built-in tree first, then the user's ``-cd`` folder."""
    try:
        return compose("train", [f"{group}={name}"], config_dir)[group]
    except UserError:
        known = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
        raise UserError(f"unknown {group} '{name}': choose one of {', '.join(known)} (or give a _target_ node)") \
            from None


# ----------------------------------------------------------------------------------------------- derived counts
@dataclass
class Counts:
    num_processes: int
    samples_per_epoch: int        # over all processes
    samples_per_process: int
    train_timesteps: int          # trained steps per trajectory
    window: tuple[int, int]       # step indices [first, end) that training timesteps are drawn from
    trainable: tuple[int, ...]    # the stochastic steps inside that window (epoch 0; an SDE window may slide)
    updates_per_epoch: int        # optimizer steps per epoch (all inner epochs)
    pairs_per_update: int         # (sample, timestep) pairs per optimizer step per process

    def for_processes(self, num_processes: int) -> "Counts":
        """The same per-process counts over ``num_processes`` processes."""
        return replace(self, num_processes=num_processes,
                       samples_per_epoch=self.samples_per_process * num_processes)

    def as_rows(self) -> list[tuple[str, str]]:
        return [("processes", str(self.num_processes)), ("samples / epoch", str(self.samples_per_epoch)),
                ("trained timesteps / sample", f"{self.train_timesteps} of {len(self.trainable)} stochastic steps "
                                               f"{_ranges(self.trainable)} (window {self.window[0]}..{self.window[1] - 1})"),
                ("updates / epoch", str(self.updates_per_epoch)),
                ("(sample, timestep) pairs / update / process", str(self.pairs_per_update))]


def _ranges(steps) -> str:
    """``(0, 1, 2, 5)`` -> ``0-2, 5``."""
    parts, start = [], None
    for i, step in enumerate(steps):
        start = step if start is None else start
        if i + 1 == len(steps) or steps[i + 1] != step + 1:
            parts.append(str(start) if start == step else f"{start}-{step}")
            start = None
    return ", ".join(parts) or "none"


def derive_counts(cfg: DictConfig, num_processes: int = 1) -> Counts:
    """Check the batch arithmetic and return the derived counts; a mismatch is a UserError showing the sums."""
    s, t = cfg.sampler, cfg.train
    per_process = s.batch_size * s.num_batches_per_epoch
    if s.group_size < 1 or s.batch_size % s.group_size:
        raise UserError(f"sampler.batch_size={s.batch_size} is not a multiple of sampler.group_size={s.group_size}: "
                        f"make the batch hold whole groups")
    step_samples = t.batch_size * t.gradient_accumulation_steps
    if per_process % step_samples:
        raise UserError(
            f"samples per process per epoch = sampler.batch_size x sampler.num_batches_per_epoch = {s.batch_size} x "
            f"{s.num_batches_per_epoch} = {per_process} is not divisible by train.batch_size x "
            f"train.gradient_accumulation_steps = {t.batch_size} x {t.gradient_accumulation_steps} = {step_samples}")
    window = step_window(s.num_steps, t.timestep_window)
    trainable = tuple(i for i in stochastic_steps_of(cfg) if window[0] <= i < window[1])
    train_timesteps = 1 if s.branch else max(1, int(round(len(trainable) * t.timestep_fraction)))
    return Counts(num_processes=num_processes, samples_per_epoch=per_process * num_processes,
                  samples_per_process=per_process, train_timesteps=train_timesteps, window=window, trainable=trainable,
                  updates_per_epoch=per_process // step_samples * t.num_inner_epochs,
                  pairs_per_update=step_samples * train_timesteps)


def step_window(num_steps: int, window) -> tuple[int, int]:
    """``train.timestep_window`` [start, end] (fractions of the chain) -> step indices [first, end), never empty."""
    if len(window) != 2 or not 0 <= window[0] < window[1] <= 1:
        raise UserError(f"train.timestep_window={list(window)}: use [start, end] with 0 <= start < end <= 1 "
                        f"(fractions of the denoising chain, 0 = the first step)")
    first = min(int(round(window[0] * num_steps)), num_steps - 1)
    return first, max(first + 1, int(round(window[1] * num_steps)))


# ----------------------------------------------------------------------------------------------- validation
@dataclass
class RunPlan:
    """What a training run needs from its config, built once: counts, the algorithm, the reward and the prompt set
    (not yet set up: no models loaded) and the resume checkpoint."""

    counts: Counts
    algorithm: Any
    reward: Any
    prompts: Any
    resume: Optional[Path]
    warnings: list[str] = field(default_factory=list)  # settings that run but deserve a word at start-up
    heldout: Any = None           # the prompt set of log.paired.heldout, if any
    preserve: Any = None          # the prompts of train.preserve (the run's own left out), if any


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def nonfinite_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every NaN / inf number in a config (pluggable ``_target_`` nodes included)."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in nonfinite_keys(value, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, value in enumerate(node) for k in nonfinite_keys(value, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if isinstance(node, float) and not math.isfinite(node) else []


SAFE_NAME = re.compile(r"[A-Za-z0-9_.=,+-]+")


def check_name(value: str, key: str) -> None:
    """A name that becomes part of a path: no folder separators, not '.' or '..'."""
    _require(bool(SAFE_NAME.fullmatch(value)) and value not in (".", ".."),
             f"{key}={value!r}: use letters, digits and _ . = , + - only (it names a folder)")


def check_values(cfg: DictConfig) -> None:
    """Value checks of the fixed sections that the type system cannot express. Raises UserError."""
    # deferred (not a cycle): the family and sampler registries import torch and diffusers, which `ddpo ls` and
    # `ddpo --help` (they import this module for the schema) need not pay for
    from .models import family_class
    from .samplers import SAMPLERS, check_sampler_name
    from .samplers.gaussian import LOG_PROB_FORMS

    s, t, a = cfg.sampler, cfg.train, cfg.advantage
    for key in nonfinite_keys(OmegaConf.to_container(cfg, resolve=True))[:1]:
        raise UserError(f"{key}={OmegaConf.select(cfg, key)}: must be a finite number")
    _require(s.num_steps >= 1, f"sampler.num_steps={s.num_steps}: use at least 1")
    _require(0 <= s.eta <= 1, f"sampler.eta={s.eta}: DDIM's eta is in [0, 1] (1 = DDPM-like noise, 0 = deterministic)")
    _require(s.noise_level >= 0 and (s.name != "flow_cps" or s.noise_level <= 1),
             f"sampler.noise_level={s.noise_level}: use >= 0 (flow_cps: at most 1)")
    _require(s.sde_window is None or (len(s.sde_window) == 2 and 0 <= s.sde_window[0] < s.sde_window[1] <= s.num_steps),
             f"sampler.sde_window={s.sde_window}: use [first, end) step indices with 0 <= first < end <= "
             f"sampler.num_steps={s.num_steps}, or null for every step")
    _require(s.sde_window_slide_every >= 0, f"sampler.sde_window_slide_every={s.sde_window_slide_every}: use >= 0")
    _require(s.log_prob in LOG_PROB_FORMS, f"sampler.log_prob={s.log_prob!r}: choose {' or '.join(LOG_PROB_FORMS)}")
    _require(s.guidance_scale >= 0, f"sampler.guidance_scale={s.guidance_scale}: use >= 0 (1 = no guidance; "
                                    f"negative values push away from the prompt)")
    _require(t.max_grad_norm > 0, f"train.max_grad_norm={t.max_grad_norm}: use > 0 (a negative norm flips the "
                                  f"gradient)")
    _require(t.nonfinite_rewards in ("stop", "drop"),
             f"train.nonfinite_rewards={t.nonfinite_rewards!r}: choose stop or drop")
    _require(a.buffer_size >= 1 and a.min_count >= 0,
             f"advantage.buffer_size={a.buffer_size}, advantage.min_count={a.min_count}: need buffer_size >= 1 and "
             f"min_count >= 0")
    _require(cfg.threads is None or cfg.threads >= 1, f"threads={cfg.threads}: use >= 1, or null for torch's default")
    paired = cfg.log.paired
    _require(paired.every >= 0 and paired.images >= 1,
             f"log.paired.every={paired.every}, log.paired.images={paired.images}: need every >= 0 (0 = off) and "
             f"images >= 1")
    _require(cfg.log.grid_images >= 1, f"log.grid_images={cfg.log.grid_images}: use >= 1 (raise log.image_every to "
                                       f"draw grids less often)")
    check_name(str(cfg.run_name), "run_name")
    check_name(str(cfg.log.project), "log.project")
    for key in ("sampler.batch_size", "sampler.num_batches_per_epoch", "train.batch_size",
                "train.gradient_accumulation_steps", "train.num_epochs", "train.num_inner_epochs",
                "train.timesteps_per_forward", "checkpoint.every", "log.reward_worker_threads", "log.image_every"):
        value = OmegaConf.select(cfg, key)
        _require(value >= 1, f"{key}={value}: must be >= 1")
    _require(0 < t.timestep_fraction <= 1, f"train.timestep_fraction={t.timestep_fraction}: must be in (0, 1]")
    _require(t.lr > 0, f"train.lr={t.lr}: must be > 0")
    for key in ("adam_beta1", "adam_beta2"):
        _require(0 <= t[key] < 1, f"train.{key}={t[key]}: use a value in [0, 1) (AdamW's moving-average decay; "
                                  f"the defaults are 0.9 and 0.999)")
    _require(t.adam_epsilon > 0, f"train.adam_epsilon={t.adam_epsilon}: use > 0 (it keeps AdamW from dividing by "
                                 f"zero; the default is 1e-8)")
    _require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay}: use >= 0")
    _require(cfg.log.kl_to_base_every >= 0, f"log.kl_to_base_every={cfg.log.kl_to_base_every}: use >= 0 (0 = never)")
    _require(t.lr_schedule in SCHEDULES, f"train.lr_schedule={t.lr_schedule!r}: choose {' or '.join(SCHEDULES)}")
    _require(t.mixed_precision in ("auto", "no", "fp16", "bf16"),
             f"train.mixed_precision={t.mixed_precision!r}: choose auto, no, fp16 or bf16")
    _require(a.mode in ("per_prompt", "batch", "group"),
             f"advantage.mode={a.mode!r}: choose per_prompt, batch or group")
    _require(a.mode != "group" or s.group_size > 1,
             "advantage.mode=group needs sampler.group_size > 1 (k images per prompt)")
    _require(not s.branch or a.mode == "group",
             f"sampler.branch=true compares the images of a group, which differ only at one step: use "
             f"advantage.mode=group (not {a.mode}) with sampler.group_size > 1")
    _require(not s.antithetic or (s.group_size % 2 == 0 and not s.branch and a.mode == "group"),
             f"sampler.antithetic=true pairs the images of a group (same initial noise) and takes each pair's "
             f"baseline from the rest of its group: use an even sampler.group_size (not {s.group_size}), "
             f"advantage.mode=group (not {a.mode}) and sampler.branch=false")
    _require(cfg.log.tracker in ("tensorboard", "wandb", "none"),
             f"log.tracker={cfg.log.tracker!r}: choose tensorboard, wandb or none")
    if cfg.log.tracker == "wandb":
        _require(importlib.util.find_spec("wandb") is not None,
                 "log.tracker=wandb needs the wandb package: pip install wandb (or use log.tracker=tensorboard)")
    _require(cfg.device in ("auto", "cpu", "cuda"), f"device={cfg.device!r}: choose auto, cpu or cuda")
    _require(cfg.checkpoint.keep_last is None or cfg.checkpoint.keep_last >= 1,
             f"checkpoint.keep_last={cfg.checkpoint.keep_last}: use >= 1, or null to keep all")
    check_model(cfg.model)
    check_sampler_name(s.name)
    family, sampler = family_class(cfg.model.family), SAMPLERS[s.name]
    _require(family.kind == sampler.model_kind,
             f"sampler={s.name} is for {sampler.model_kind} models but model.family={cfg.model.family} is a "
             f"{family.kind} model: choose " + ("sampler=ddim" if family.kind == "diffusion" else
                                                "sampler=flow_sde (or flow_ode, dance_sde, flow_cps)"))


def stochastic_steps_of(cfg: DictConfig, offset: int = 0) -> list[int]:
    from .samplers import stochastic_steps  # deferred: see check_values

    return stochastic_steps(cfg.sampler, offset)


def check_trained_steps(cfg: DictConfig, counts: Counts) -> None:
    """Every place a (sliding) SDE window takes must leave a stochastic step inside ``train.timestep_window`` to
    train; antithetic pairs in groups of 2 need exactly one (their baseline is exact only there)."""
    from .samplers import window_positions  # deferred: see check_values

    s, first, end = cfg.sampler, *counts.window
    for epoch, offset in window_positions(s):
        steps = stochastic_steps_of(cfg, offset)
        trainable = [i for i in steps if first <= i < end]
        when = f" from epoch {epoch} on (sampler.sde_window_slide_every={s.sde_window_slide_every})" if epoch else ""
        _require(bool(trainable), f"train.timestep_window={list(cfg.train.timestep_window)} (steps {first}..{end - 1})"
                                  f" holds none of the sampler's stochastic steps ({_ranges(steps)}){when}: widen it, "
                                  f"move sampler.sde_window into it, or slide the window less far")
        _require(not s.antithetic or s.group_size > 2 or len(trainable) == 1,
                 f"sampler.antithetic=true with sampler.group_size=2 trains {len(trainable)} steps "
                 f"({_ranges(trainable)}){when}: a lone pair's baseline is exact at its first trained step only; use "
                 f"sampler.group_size >= 4 (each pair's baseline is then the other pairs' mean) or train one step")


def check_model(model: DictConfig) -> None:
    _require(model.builder in (None, "tiny"), f"model.builder={model.builder!r}: only 'tiny' is built in")
    _require(model.builder is not None or bool(model.pretrained),
             "model.pretrained is empty: give a hub id or a local pipeline folder (or use model=tiny)")
    _require(model.resolution is None or model.resolution > 0,
             f"model.resolution={model.resolution}: use a positive number of pixels, or null for the native size")
    lora = model.lora
    _require(lora.rank >= 1, f"model.lora.rank={lora.rank}: use >= 1 (or model.use_lora=false)")
    _require(lora.alpha > 0, f"model.lora.alpha={lora.alpha}: must be > 0")
    _require(0 <= lora.dropout < 1, f"model.lora.dropout={lora.dropout}: must be in [0, 1)")
    _require(len(lora.target_modules) > 0, "model.lora.target_modules is empty: name the layers to adapt")


def plan_run(cfg: DictConfig, check_weights: bool = False) -> RunPlan:
    """Check a training config and build what the run needs (see :class:`RunPlan`). Raises UserError.

    ``check_weights``: also check that the model's weights can be had (a local folder, a cached or reachable hub
    model), so that an offline machine fails before a run folder is written (the CLI does; tests need no network)."""
    from .models import check_source  # deferred like check_values' registries: imports torch and diffusers

    for group in ("algo", "reward", "prompts"):
        check_target(cfg[group], group)
    check_values(cfg)
    if check_weights:
        check_source(cfg.model)
    algorithm = build(cfg.algo, "algo")
    reward = build(cfg.reward, "reward")
    prompts = build(cfg.prompts, "prompts")
    algorithm.check(cfg, reward)
    counts = derive_counts(cfg)
    if algorithm.rollout == "sample":
        check_trained_steps(cfg, counts)
    _require(cfg.advantage.mode != "group" or algorithm.targets == "advantages",
             f"advantage.mode=group works with algorithms that take advantages (ddpo_is, ddpo_sf, dpok, nft), not "
             f"{algorithm.name}")
    resume = find_checkpoint(cfg.resume) if cfg.resume else None
    warnings = algorithm.warnings(cfg, counts) + (resume_changes(cfg, resume) if resume else [])
    heldout_name = cfg.log.paired.heldout
    heldout = build(group_option("prompts", heldout_name), "prompts") if heldout_name else None
    return RunPlan(counts, algorithm, reward, prompts, resume, warnings, heldout,
                   preserve_prompts(cfg, algorithm, prompts))


def resume_changes(cfg: DictConfig, checkpoint: Path) -> list[str]:
    """Check a resume against the checkpoint's own record: it must leave epochs to train, and keep the algorithm and
    reward it was trained with (unless ``resume_allow_changes``; the changes are then returned as warnings)."""
    state = readable_state(checkpoint)
    if state is None:  # none readable: the resume itself says so in one line
        return []
    epoch, saved = int(state["epoch"]), json.loads(state.get("config", "{}"))
    _require(epoch + 1 < cfg.train.num_epochs,
             f"resume={cfg.resume}: the run is already at epoch {epoch} ({epoch + 1} epochs trained) and "
             f"train.num_epochs={cfg.train.num_epochs}: nothing is left to train; raise train.num_epochs to go on")
    changes = [change for key in ("algo", "reward") if key in saved
               for change in differences(saved[key], OmegaConf.to_container(cfg[key], resolve=True), key)]
    _require(not changes or cfg.resume_allow_changes,
             f"resume={cfg.resume} changes what the checkpoint was trained for ({'; '.join(changes[:3])}"
             f"{'; ...' if len(changes) > 3 else ''}), whose optimizer state and statistics it carries: resume with "
             f"the run's own settings, or add resume_allow_changes=true")
    return [f"resumed with changes: {change}" for change in changes]


def readable_state(checkpoint: Path) -> dict | None:
    """The state of ``checkpoint``, or of the newest readable one before it (as resume falls back), memory-mapped."""
    for path in [checkpoint, *reversed(list_checkpoints(run_dir_of(checkpoint)))]:
        try:
            return read_state(path, mmap=True)
        except UserError:
            continue
    return None


def differences(old: Any, new: Any, key: str) -> list[str]:
    """``"key.sub: old -> new"`` for every leaf that differs between two config containers."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for sub in sorted(set(old) | set(new), key=str)
                for change in differences(old.get(sub), new.get(sub), f"{key}.{sub}")]
    return [] if old == new else [f"{key}: {old} -> {new}"]


def preserve_prompts(cfg: DictConfig, algorithm, prompts) -> list[str] | None:
    """The prompts of ``train.preserve`` without the run's own, checked; None when preservation is off."""
    p = cfg.train.preserve
    if p.weight == 0:
        return None
    _require(p.weight > 0, f"train.preserve.weight={p.weight}: use > 0, or 0 to switch preservation off")
    _require(p.pairs >= 1, f"train.preserve.pairs={p.pairs}: must be >= 1")
    _require(bool(p.prompts), "train.preserve.weight > 0 needs train.preserve.prompts: a prompt set to preserve "
                              "(e.g. shapes_train)")
    _require(algorithm.rollout == "sample", f"train.preserve works with sample-based algorithms (its states are "
                                            f"the sampled chains'), not {algorithm.name}")
    own = set(prompts.prompts)
    others = [q for q in build(group_option("prompts", p.prompts), "prompts").prompts if q not in own]
    _require(bool(others), f"train.preserve.prompts={p.prompts} holds only the run's own prompts: choose a set "
                           f"with others")
    return others


def validate(cfg: DictConfig) -> RunPlan:
    """:func:`plan_run` under the name the checks are known by."""
    return plan_run(cfg)


def build(node: DictConfig, where: str):
    """Instantiate a ``_target_`` node; the target's own UserError (or ValueError/TypeError) becomes one line
    naming the group, not Hydra's wrapped traceback."""
    hydra_log = logging.getLogger("hydra.utils")  # it logs a failed get_method besides raising it
    hydra_log.disabled = True
    try:
        return instantiate(node, _convert_="all")
    except (InstantiationException, UserError, ValueError, TypeError) as exc:
        cause = exc.__cause__ or exc
        message = brief(cause)
        raise UserError(message if isinstance(cause, UserError) else f"{where}: {message}") from None
    finally:
        hydra_log.disabled = False


# ----------------------------------------------------------------------------------------------- _target_ checks
def import_target(path: str, where: str):
    module_name, _, attr = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"{where}._target_={path!r} cannot be imported ({exc}): give an importable module.attribute")


def _type_ok(value: Any, annotation: Any) -> bool:
    """Loose runtime check of a YAML value against a simple annotation (int/float/str/bool/list/dict/Optional)."""
    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, str):
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in args)
    if annotation is type(None):
        return value is None
    if isinstance(value, (DictConfig, ListConfig)) and not (isinstance(value, DictConfig) and "_target_" in value):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, DictConfig):  # a nested _target_ node: checked when instantiated
        return True
    base = origin or annotation
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base in (str, bool, list, dict, tuple):
        return isinstance(value, list if base is tuple else base)
    return True


def check_target(node: Any, where: str) -> None:
    """Every key of a ``_target_`` node must be a parameter of the target with a matching simple type."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise UserError(f"{where} has no _target_: pick one with {where}=<option> (see `ddpo ls {where}`)")
    target = import_target(node._target_, where)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    params = signature.parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target) if params else {}
    for key in node:
        if str(key).startswith("_"):
            continue
        if key not in params:
            if accepts_any:
                continue
            raise UserError(f"{where}.{key} is not an option of {node._target_}: known keys are "
                            f"{', '.join(k for k in params if k not in ('self', 'args', 'kwargs')) or 'none'} "
                            f"(drop it with ~{where}.{key})")
        value = node._get_node(key)._value() if OmegaConf.is_interpolation(node, key) else node[key]
        if not OmegaConf.is_interpolation(node, key) and not _type_ok(value, hints.get(key, params[key].annotation)):
            raise UserError(f"{where}.{key}={value!r} has the wrong type: {node._target_} expects "
                            f"{getattr(hints.get(key), '__name__', hints.get(key))}")


def _short_name(target: str) -> str:
    """``ddpo_cli.rewards.jpeg.JpegCompressibility`` -> ``jpeg_compressibility`` (for run names)."""
    name = str(target).rsplit(".", 1)[-1]
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))


OmegaConf.register_new_resolver("reward_name", _short_name, replace=True)
