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
from dataclasses import dataclass

import numpy as np
import torch

from .rollout import images_from_seeds
from .runtime import derive_seed
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
    noise = f"eta {s.eta}" if s.name == "ddim" else f"noise level {s.noise_level}"
    text = f"{s.name}, {s.num_steps} steps, {noise}, guidance {s.guidance_scale}"
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


def score_in_batches(reward_fn, images: torch.Tensor, prompts: list[str], metadata: list[dict],
                     batch_size: int) -> tuple[list[float], dict[str, list]]:
    """Rewards ``[N]`` (a list) and every reward-info column of ``images [N,3,H,W]``, in batches of ``batch_size``
    (``ddpo sample`` / ``ddpo eval`` score their images with it too)."""
    values, info = [], {}
    for first in range(0, len(prompts), batch_size):
        rewards, extra = reward_fn(images[first:first + batch_size].to(reward_fn.device),
                                   prompts[first:first + batch_size],
                                   metadata[first:first + batch_size])
        values += rewards.detach().float().cpu().tolist()
        for key, value in extra.items():
            info.setdefault(key, []).extend(value.tolist() if torch.is_tensor(value) else list(value))
    return values, info


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
