"""The paired measure of a training run: the policy and the base model scored on the same fixed prompts and noise.

Each epoch's reward is measured on fresh noise, so it is noisy and a gain hides in it. A *probe* is a fixed list of
(prompt, seed) pairs: image ``i`` starts from the noise of ``derive_seed(seed, "probe", name, i)`` and draws every
stochastic step's noise from that same generator (as ``ddpo sample`` does), so the base model (LoRA off) and the
policy of any epoch draw from exactly the same noise, and their per-image difference is a paired gain whose
standard error is small. The base is scored once per run; the policy every ``log.paired.every`` epochs.

Both are drawn with one fixed sampler: the training sampler with its SDE window pinned where it starts
(:func:`fixed_sampler_config`). A window that slides during training would otherwise draw base and policy with
different stochastic steps, and the measure would report the change of sampler as a gain.
"""
from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError
from .models import adapters_disabled
from .rewards.base import score_in_batches
from .report import warn
from .rollout import images_from_seeds
from .runtime import derive_seed
from .samplers import build_sampler, noise_key
from .stats import mean_se


@dataclass
class Probe:
    """Fixed (prompt, metadata, seed) triples (:func:`plan_probe`)."""

    name: str
    prompts: list[str]
    metadata: list[dict]
    seeds: list[int]

    def __len__(self) -> int:
        return len(self.prompts)


def fixed_sampler_config(sampler_cfg):
    """The sampler config of the paired measure: the training sampler's, its SDE window never sliding."""
    fixed = sampler_cfg.copy()
    fixed.sde_window_slide_every = 0
    return fixed


def describe_sampler(sampler_cfg) -> str:
    """``"flow_sde, 10 steps, SDE window 0..2 (pinned; training slides it)"``: what the paired measure samples with."""
    s = sampler_cfg
    key = noise_key(s.name)
    text = f"{s.name}, {s.num_steps} steps, {key} {s[key]}, guidance {s.guidance_scale}"
    if s.sde_window:
        text += f", SDE window {s.sde_window[0]}..{s.sde_window[1] - 1}"
        text += " (pinned there; training slides it)" if s.sde_window_slide_every else ""
    return text


def plan_probe(name: str, prompt_set, images: int, seed: int) -> Probe:
    """``images`` pairs: every prompt of the set once per whole pass over it, the remainder (or, for a set larger
    than ``images``, all of them) a sample without replacement seeded by ``(seed, "probe", name)``, so the probe does
    not lean towards the top of a file; image ``i`` gets the seed ``derive_seed(seed, "probe", name, i)``."""
    size = len(prompt_set)
    rng = random.Random(derive_seed(seed, "probe", name, "prompts"))
    order = list(range(size)) * (images // size) + rng.sample(range(size), images % size)
    items = [prompt_set.items[i] for i in order]
    return Probe(name, [p for p, _ in items], [dict(m) for _, m in items],
                 [derive_seed(seed, "probe", name, i) for i in range(images)])


def probe_images(model, sampler, denoiser, probe: Probe, guidance: float, batch_size: int,
                 device) -> torch.Tensor:
    """Images ``[N,3,H,W]`` (CPU) of the probe's pairs, one generator per image, in batches of ``batch_size``."""
    return torch.cat([images_from_seeds(model, sampler, denoiser, probe.prompts[i:i + batch_size],
                                        probe.seeds[i:i + batch_size], guidance, device).cpu()
                      for i in range(0, len(probe), batch_size)])


def probe_scores(reward_fn, images: torch.Tensor, probe: Probe, batch_size: int) -> dict[str, np.ndarray]:
    """Per-image ``reward`` and every numeric reward-info key, as float arrays ``[N]``."""
    metadata = [dict(m) for m in probe.metadata]   # copies: a reward may annotate them, the probe is reused
    rewards, info = score_in_batches(reward_fn, images, probe.prompts, metadata, batch_size)
    columns = {"reward": rewards, **{key: values for key, values in info.items()
                                     if all(isinstance(v, (bool, int, float)) for v in values)}}
    return {key: np.asarray(values, dtype=np.float64) for key, values in columns.items()}


def paired_gain(policy: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> dict[str, dict]:
    """For every key of both: base mean, policy mean, and the paired gain's mean and standard error."""
    out = {}
    for key in policy.keys() & base.keys():
        gain = mean_se(policy[key] - base[key])
        out[key] = {"base": float(np.nanmean(base[key])), "policy": float(np.nanmean(policy[key])),
                    "gain": gain["mean"], "gain_se": gain["se"]}
    return out


class PairedMeasure:
    """``log.paired`` during a run: the probes of the trained prompts (and of ``log.paired.heldout``), the base
    model's scores on them (taken once, at the start), and the policy's paired gain every ``every`` epochs and at
    the last. ``autocast`` is the precision context the images are drawn in."""

    def __init__(self, probes: list[Probe], model, sampler, reward_fn, guidance: float, batch_size: int, device,
                 autocast, every: int, num_epochs: int) -> None:
        self.probes, self.model, self.sampler, self.reward_fn = probes, model, sampler, reward_fn
        self.guidance, self.batch_size, self.device, self.autocast = guidance, batch_size, device, autocast
        self.every, self.num_epochs = every, num_epochs
        self.base: dict[str, dict[str, np.ndarray]] = {}

    def scores(self, denoiser, probe: Probe) -> dict[str, np.ndarray]:
        """``denoiser``'s per-image scores on ``probe`` (eval mode, fixed sampler and per-image noise)."""
        was_training = denoiser.training
        denoiser.eval()
        with self.autocast():
            images = probe_images(self.model, self.sampler, denoiser, probe, self.guidance, self.batch_size,
                                  self.device)
        denoiser.train(was_training)
        return probe_scores(self.reward_fn, images, probe, self.batch_size)

    def score_base(self, denoiser, use_lora: bool, metric: str) -> None:
        """The base model's scores: with LoRA the adapter switched off, else the weights as they are (a fresh run).
        UserError if the reward does not report ``metric``."""
        with adapters_disabled(denoiser) if use_lora else nullcontext():
            self.base = {probe.name: self.scores(denoiser, probe) for probe in self.probes}
        keys = sorted(next(iter(self.base.values())))
        if metric not in keys:
            raise UserError(f"log.paired.metric={metric!r}: reward {self.reward_fn.name} reports {', '.join(keys)}; "
                            f"choose one of them")

    def row(self, epoch: int, denoiser) -> dict:
        """``{"paired": {set: {key: base, policy, gain, gain_se}}, "paired_seconds"}`` on the epochs of ``every`` and
        the last epoch; empty otherwise."""
        if not ((epoch + 1) % self.every == 0 or epoch == self.num_epochs - 1):
            return {}
        start = time.perf_counter()
        paired = {p.name: paired_gain(self.scores(denoiser, p), self.base[p.name]) for p in self.probes}
        return {"paired": paired, "paired_seconds": time.perf_counter() - start}


def start_paired_measure(cfg, prompt_set, heldout, model, reward_fn, denoiser, device, autocast,
                         resumed: bool) -> PairedMeasure | None:
    """The run's :class:`PairedMeasure` with the base scored, or None when ``log.paired.every`` is 0 (and for a
    resumed full fine-tuning run, whose base weights are gone: a warning says so)."""
    paired = cfg.log.paired
    if not paired.every:
        return None
    if not cfg.model.use_lora and resumed:
        warn("log.paired is off for this resumed full fine-tuning run: the base weights are gone (LoRA runs keep "
             "them)")
        return None
    sets = [("trained", prompt_set)] + ([("held-out", heldout)] if heldout is not None else [])
    measure = PairedMeasure([plan_probe(name, prompts, paired.images, cfg.seed) for name, prompts in sets], model,
                            build_sampler(fixed_sampler_config(cfg.sampler), model), reward_fn,
                            cfg.sampler.guidance_scale, cfg.sampler.batch_size, device, autocast, paired.every,
                            cfg.train.num_epochs)
    measure.score_base(denoiser, cfg.model.use_lora, paired.metric)
    return measure
