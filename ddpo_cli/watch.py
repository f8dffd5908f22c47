"""The monitors during a run: every ``monitor.every`` epochs (and at the last) the policy draws the same images
(fixed prompts, one generator per image, the paired measure's fixed sampler), every monitor measures them, and the
rules decide whether the run stops and whether this check is the best so far.

The base model drew the same images at the start of the run (LoRA off; for full fine-tuning the weights before the
first update); its values are kept in ``monitor_base.json`` of the run folder, so a resumed run compares with them.
"""
from __future__ import annotations

import json
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .distributed import from_main
from .models import adapters_disabled
from .monitors.base import Drawn, Monitor
from .monitors.rules import StopRule, fired, is_new_best
from .monitors.settings import ROW_VALUES
from .probe import fixed_sampler_config
from .report import monitor_history
from .rollout import latents_from_seeds
from .runtime import derive_seed
from .samplers import build_sampler

BASE_FILE = "monitor_base.json"


@dataclass
class Verdict:
    stop: Optional[str] = None    # the line saying which rule fired, when one did
    best: bool = False            # this check is the best so far by checkpoint.best_by


class Watch:
    """The monitors of one run (built by :func:`start_watch`)."""

    def __init__(self, monitors: dict[str, Monitor], settings: dict, rules: list[StopRule], prompt_set, model,
                 sampler, guidance: float, device, autocast, seed: int, num_epochs: int,
                 best_by: Optional[str], best_mode: str) -> None:
        self.monitors, self.rules, self.model, self.sampler = monitors, rules, model, sampler
        self.guidance, self.device, self.autocast, self.num_epochs = guidance, device, autocast, num_epochs
        self.every, self.batch_size = settings["every"], settings["batch_size"]
        self.best_by, self.best_mode = best_by, best_mode
        rng = random.Random(derive_seed(seed, "monitor", "prompts"))
        chosen = rng.sample(range(len(prompt_set)), min(settings["prompts"], len(prompt_set)))
        per_prompt = settings["images_per_prompt"]
        items = [prompt_set.items[i] for i in chosen for _ in range(per_prompt)]
        self.prompts, self.metadata = [p for p, _ in items], [dict(m) for _, m in items]
        self.groups = [g for g in range(len(chosen)) for _ in range(per_prompt)]
        self.seeds = [derive_seed(seed, "monitor", i) for i in range(len(items))]
        self.base: dict[str, float] = {}
        self.history: list[dict] = []

    def due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every == 0 or epoch == self.num_epochs - 1

    def draw(self, denoiser) -> Drawn:
        was_training = denoiser.training
        denoiser.eval()
        latents = []
        with self.autocast():
            for first in range(0, len(self.prompts), self.batch_size):
                latents.append(latents_from_seeds(self.model, self.sampler, denoiser,
                                                  self.prompts[first:first + self.batch_size],
                                                  self.seeds[first:first + self.batch_size], self.guidance,
                                                  self.device))
            images = torch.cat([self.model.decode(chunk).float().cpu() for chunk in latents])
        denoiser.train(was_training)
        return Drawn(images, torch.cat(latents).float().cpu(), self.prompts, self.metadata, self.groups)

    def measure(self, denoiser) -> dict[str, float]:
        drawn = self.draw(denoiser)
        return {key: value for m in self.monitors.values() for key, value in m.measure(drawn).items()}

    def start(self, denoiser, use_lora: bool, run_dir: Path, history: list[dict], write: bool) -> None:
        """The base model's values (read from the run folder when a resumed run has them; written there when
        ``write``) and the checks of the epochs already run (``history``: their ``monitor`` entries)."""
        for monitor in self.monitors.values():
            monitor.setup(self.device)
        path = Path(run_dir) / BASE_FILE
        if path.exists():
            self.base = json.loads(path.read_text())
        elif use_lora or not history:
            with adapters_disabled(denoiser) if use_lora else nullcontext():
                self.base = self.measure(denoiser)
            if write:
                path.write_text(json.dumps(self.base, indent=1))
        self.history = list(history)

    def row(self, epoch: int, denoiser, epoch_row: dict) -> dict:
        """``{"monitor": values, "monitor_seconds": s}`` on a check epoch; empty otherwise."""
        if not self.due(epoch):
            return {}
        start = time.perf_counter()
        values = self.measure(denoiser)
        values.update({key: epoch_row[key] for key in ROW_VALUES if epoch_row.get(key) is not None})
        self.history.append(values)
        return {"monitor": values, "monitor_seconds": time.perf_counter() - start}

    def verdict(self, row: dict) -> Verdict:
        """What this epoch's check says (an epoch without a check says nothing)."""
        if "monitor" not in row:
            return Verdict()
        rule = fired(self.rules, self.history, self.base)
        stop = None
        if rule is not None:
            stop = f"stopped by monitor.stop_when: {rule.describe()} ({rule.metric} = {row['monitor'][rule.metric]:.4g}"
            stop += f", base {self.base[rule.metric]:.4g})" if rule.metric in self.base else ")"
        best = self.best_by is not None and is_new_best(self.history, self.best_by, self.best_mode)
        return Verdict(stop, best)


def epoch_verdict(watch: Optional[Watch], accelerator, epoch: int, denoiser, row: dict) -> Verdict:
    """The monitors' values into ``row`` on a check epoch, and what the rules say, decided by the main process for
    all: ``monitor_stop`` names a rule that fired, ``monitor_best`` marks a new best by checkpoint.best_by."""
    row.update(watch.row(epoch, denoiser, row) if watch else {})
    verdict = from_main(accelerator, watch.verdict(row) if watch else Verdict())
    row.update({"monitor_stop": verdict.stop} if verdict.stop else {},
               **({"monitor_best": True} if verdict.best else {}))
    return verdict


def start_watch(cfg, plan, model, denoiser, device, autocast, run_dir: Path, write: bool) -> Optional[Watch]:
    """The run's :class:`Watch`, the base measured (or read back); None when ``monitor.every`` is 0, or when no
    monitor, rule or ``checkpoint.best_by`` is chosen. ``plan``: the run's :class:`~ddpo_cli.config.RunPlan`;
    ``write``: this process keeps the base values."""
    settings = plan.monitor_settings
    if not settings["every"] or not (plan.monitors or plan.stop_rules or cfg.checkpoint.best_by):
        return None
    prompt_set = plan.heldout if plan.heldout is not None else plan.prompts
    watch = Watch(plan.monitors, settings, plan.stop_rules, prompt_set, model,
                  build_sampler(fixed_sampler_config(cfg.sampler), model), cfg.sampler.guidance_scale, device,
                  autocast, cfg.seed, cfg.train.num_epochs, cfg.checkpoint.best_by, cfg.checkpoint.best_mode)
    watch.start(denoiser, cfg.model.use_lora, run_dir, monitor_history(run_dir), write)
    return watch
