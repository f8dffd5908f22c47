"""A training run's plan, made once from its config before anything is written: every value checked, the algorithm,
reward and prompt sets built (cheap: constructors load no models), the batch counts derived, the resume checked.

:func:`plan_run` is called by the CLI before Hydra creates a run folder; the trainer reuses the :class:`RunPlan`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from ..errors import UserError
from ..runs import find_checkpoint, list_checkpoints, read_state, run_dir_of
from .compose import build, check_target, group_option
from ..monitors.settings import check_settings, known_metrics, split_monitor_node
from .checks import check_values, require


@dataclass
class Counts:
    num_processes: int
    samples_per_epoch: int        # over all processes
    samples_per_process: int
    train_timesteps: int          # trained steps per trajectory (forward-process algorithms: fresh noise levels)
    window: tuple[int, int]       # step indices [first, end) that training timesteps are drawn from
    trainable: tuple[int, ...]    # the stochastic steps inside that window (epoch 0; an SDE window may slide)
    updates_per_epoch: int        # optimizer steps per epoch (all inner epochs)
    pairs_per_update: int         # (sample, timestep) pairs per optimizer step per process
    fresh_noise: bool = False     # the pairs are the samples noised afresh, not the chain's stored steps

    def for_processes(self, num_processes: int) -> "Counts":
        """The same per-process counts over ``num_processes`` processes."""
        return replace(self, num_processes=num_processes,
                       samples_per_epoch=self.samples_per_process * num_processes)

    def as_rows(self) -> list[tuple[str, str]]:
        trained = (f"{self.train_timesteps} fresh noise level(s) (forward process)" if self.fresh_noise else
                   f"{self.train_timesteps} of {len(self.trainable)} stochastic steps {_ranges(self.trainable)} "
                   f"(window {self.window[0]}..{self.window[1] - 1})")
        return [("samples / epoch", str(self.samples_per_epoch)),
                ("trained timesteps / sample", trained),
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
    monitors: dict = field(default_factory=dict)        # name -> built monitor (conf/monitor), not set up
    monitor_settings: dict = field(default_factory=dict)  # monitor.every, prompts, images_per_prompt, ...
    stop_rules: list = field(default_factory=list)      # monitor.stop_when, checked


def stochastic_steps_of(cfg: DictConfig, offset: int = 0) -> list[int]:
    from ..samplers import stochastic_steps  # deferred: see check_values

    return stochastic_steps(cfg.sampler, offset)


def check_trained_steps(cfg: DictConfig, counts: Counts) -> None:
    """Every place a (sliding) SDE window takes must leave a stochastic step inside ``train.timestep_window`` to
    train; antithetic pairs in groups of 2 need exactly one (their baseline is exact only there)."""
    from ..samplers import window_positions  # deferred: see check_values

    s, first, end = cfg.sampler, *counts.window
    for epoch, offset in window_positions(s):
        steps = stochastic_steps_of(cfg, offset)
        trainable = [i for i in steps if first <= i < end]
        when = f" from epoch {epoch} on (sampler.sde_window_slide_every={s.sde_window_slide_every})" if epoch else ""
        require(bool(trainable), f"train.timestep_window={list(cfg.train.timestep_window)} (steps {first}..{end - 1})"
                                 f" holds none of the sampler's stochastic steps ({_ranges(steps)}){when}: widen it, "
                                 f"move sampler.sde_window into it, or slide the window less far")
        require(not s.antithetic or s.group_size > 2 or len(trainable) == 1,
                f"sampler.antithetic=true with sampler.group_size=2 trains {len(trainable)} steps "
                f"({_ranges(trainable)}){when}: a lone pair's baseline is exact at its first trained step only; use "
                f"sampler.group_size >= 4 (each pair's baseline is then the other pairs' mean) or train one step")


def plan_run(cfg: DictConfig, check_weights: bool = False) -> RunPlan:
    """Check a training config and build what the run needs (see :class:`RunPlan`). Raises UserError.

    ``check_weights``: also check that the model's weights can be had (a local folder, a cached or reachable hub
    model), so that an offline machine fails before a run folder is written (the CLI does; tests need no network)."""
    from ..models import check_source  # deferred like check_values' registries: imports torch and diffusers

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
    if algorithm.trains_on == "forward":
        per_update = counts.pairs_per_update // counts.train_timesteps * algorithm.times_per_sample
        counts = replace(counts, train_timesteps=algorithm.times_per_sample, fresh_noise=True,
                         pairs_per_update=per_update)
    elif algorithm.rollout == "sample":
        check_trained_steps(cfg, counts)
    resume = find_checkpoint(cfg.resume) if cfg.resume else None
    warnings = algorithm.warnings(cfg, counts) + (resume_changes(cfg, resume) if resume else [])
    heldout_name = cfg.log.paired.heldout
    heldout = build(group_option("prompts", heldout_name), "prompts") if heldout_name else None
    settings, monitors, rules = plan_monitors(cfg)
    return RunPlan(counts, algorithm, reward, prompts, resume, warnings, heldout,
                   preserve_prompts(cfg, algorithm, prompts), monitors, settings, rules)


def plan_monitors(cfg: DictConfig) -> tuple[dict, dict, list]:
    """``cfg.monitor`` built and checked: (settings, {name: monitor}, stop rules); ``checkpoint.best_by`` must name
    a value the monitors measure."""
    settings, nodes = split_monitor_node(OmegaConf.to_container(cfg.monitor, resolve=True) if cfg.monitor else {})
    monitors = {name: build(OmegaConf.create(node), f"monitor.{name}") for name, node in nodes.items()}
    rules = check_settings(settings, monitors)
    best, known = cfg.checkpoint.best_by, known_metrics(monitors)
    require(cfg.checkpoint.best_mode in ("max", "min"), f"checkpoint.best_mode={cfg.checkpoint.best_mode!r}: "
                                                        f"choose max or min")
    require(best is None or best in known, f"checkpoint.best_by={best!r}: the monitors measure "
                                           f"{', '.join(sorted(known))}; add the monitor that measures it "
                                           f"(monitor=[...]) or name one of these")
    require(best is None or settings["every"] > 0, "checkpoint.best_by needs monitor.every > 0")
    return settings, monitors, rules


def resume_changes(cfg: DictConfig, checkpoint: Path) -> list[str]:
    """Check a resume against the checkpoint's own record: it must leave epochs to train, and keep the algorithm and
    reward it was trained with (unless ``resume_allow_changes``; the changes are then returned as warnings)."""
    state = readable_state(checkpoint)
    if state is None:  # none readable: the resume itself says so in one line
        return []
    epoch, saved = int(state["epoch"]), json.loads(state.get("config", "{}"))
    require(epoch + 1 < cfg.train.num_epochs,
            f"resume={cfg.resume}: the run is already at epoch {epoch} ({epoch + 1} epochs trained) and "
            f"train.num_epochs={cfg.train.num_epochs}: nothing is left to train; raise train.num_epochs to go on")
    changes = [change for key in ("algo", "reward") if key in saved
               for change in differences(saved[key], OmegaConf.to_container(cfg[key], resolve=True), key)]
    require(not changes or cfg.resume_allow_changes,
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
    require(p.weight > 0, f"train.preserve.weight={p.weight}: use > 0, or 0 to switch preservation off")
    require(p.pairs >= 1, f"train.preserve.pairs={p.pairs}: must be >= 1")
    require(bool(p.prompts), "train.preserve.weight > 0 needs train.preserve.prompts: a prompt set to preserve "
                             "(e.g. shapes_train)")
    require(algorithm.rollout == "sample", f"train.preserve works with sample-based algorithms (its states are "
                                           f"the sampled chains'), not {algorithm.name}")
    own = set(prompts.prompts)
    others = [q for q in build(group_option("prompts", p.prompts), "prompts").prompts if q not in own]
    require(bool(others), f"train.preserve.prompts={p.prompts} holds only the run's own prompts: choose a set "
                          f"with others")
    return others


def validate(cfg: DictConfig) -> RunPlan:
    """:func:`plan_run` under the name the checks are known by."""
    return plan_run(cfg)
