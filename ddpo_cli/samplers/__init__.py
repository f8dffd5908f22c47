"""The sampler seam: the step maths of a denoising chain, chosen by ``sampler.name``.

A sampler answers, for step index ``i`` (0 = the noisiest step; trajectories store indices, the sampler maps them to
times):

- ``num_steps`` and ``timesteps [T]`` (the denoiser's time input per step), ``model_time(steps [N]) -> [N]``;
- ``is_stochastic(i)``: whether step ``i`` is a policy step (trained, with a log-prob) or a deterministic one;
- ``step_distribution(output, x_t, steps) -> (mean, std)``: the Gaussian of a stochastic step (fp32), and
  ``log_prob(x_next, mean, std) -> [N]`` of its draws (``sampler.log_prob``: exact, or Flow-CPS's unscaled form);
- ``step(output, x_t, steps) -> x_next``: the deterministic step of inference;
- ``clean_estimate(output, x_t, steps) -> x0_hat``: the clean latents the output implies (affine in ``output``);
- ``training_times(n, device)`` and ``noisy_and_target(x0, noise, t) -> (x_t, target)``: the forward process and
  regression target of the family's training loss (reward-weighted regression and other denoising-loss algorithms);
- ``model_kind``: which model families it fits (``diffusion``: DDPM-trained; ``flow``: rectified flow);
- ``stochastic_steps(sampler_cfg, offset)`` (static) and ``set_epoch(epoch)``: which steps are policy steps (an SDE
  window may slide over epochs: :class:`~ddpo_cli.samplers.window.SDEWindow`).

Log-prob and KL of the Gaussian steps are shared maths in :mod:`ddpo_cli.samplers.gaussian`.
Each sampler class also declares ``check(sampler_cfg)`` (its own settings) and ``evaluated_with`` (the sampler
``ddpo eval`` uses for its runs). Adding a sampler: one module here, one line in ``SAMPLERS``, one
``conf/sampler/<name>.yaml`` and a parity test.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..errors import UserError
from .ddim import DDIMSampler
from .flow import KINDS as FLOW_KINDS
from .flow import FlowSampler
from .window import SDEWindow

SAMPLERS = {"ddim": DDIMSampler, **{kind: FlowSampler for kind in FLOW_KINDS}}


class Sampler(Protocol):
    name: str
    model_kind: str
    num_steps: int
    timesteps: torch.Tensor

    def model_time(self, steps: torch.Tensor) -> torch.Tensor: ...
    def set_epoch(self, epoch: int) -> None: ...
    def is_stochastic(self, i: int) -> bool: ...
    def step_distribution(self, output: torch.Tensor, x_t: torch.Tensor,
                          steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def log_prob(self, x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor: ...
    def step(self, output: torch.Tensor, x_t: torch.Tensor, steps: torch.Tensor) -> torch.Tensor: ...
    def clean_estimate(self, output: torch.Tensor, x_t: torch.Tensor, steps: torch.Tensor) -> torch.Tensor: ...
    def training_times(self, n: int, device: torch.device | str,
                       generator: torch.Generator | None = None) -> torch.Tensor: ...
    def noisy_and_target(self, x0: torch.Tensor, noise: torch.Tensor,
                         t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def check_sampler_name(name: str) -> None:
    if name not in SAMPLERS:
        raise UserError(f"sampler.name={name!r}: choose one of {', '.join(SAMPLERS)} (see `ddpo ls sampler`)")


def names_for(model_kind: str) -> list[str]:
    """The samplers that fit models of ``model_kind`` (``diffusion`` or ``flow``)."""
    return [name for name, cls in SAMPLERS.items() if cls.model_kind == model_kind]


def policy_samplers(model_kind: str) -> list[str]:
    """The samplers that can draw a stochastic policy for models of ``model_kind``."""
    return [name for name in names_for(model_kind) if name not in SAMPLERS[name].deterministic_names]


def noise_key(name: str) -> str:
    """The setting that gives sampler ``name``'s stochastic steps their noise (``eta``, ``noise_level``)."""
    check_sampler_name(name)
    return SAMPLERS[name].noise_key


def check_sampler(sampler_cfg, family=None) -> None:
    """The sampler's own checks and, given the model family (class), that it fits the family's objective."""
    check_sampler_name(sampler_cfg.name)
    cls = SAMPLERS[sampler_cfg.name]
    cls.check(sampler_cfg)
    if family is not None and family.kind != cls.model_kind:
        raise UserError(f"sampler={sampler_cfg.name} is for {cls.model_kind} models but model.family={family.family} "
                        f"is a {family.kind} model: choose one of {', '.join(names_for(family.kind))}")


def evaluation_sampler(name: str) -> str:
    """The sampler ``ddpo eval`` uses for a run trained with sampler ``name`` (unless told otherwise)."""
    check_sampler_name(name)
    return SAMPLERS[name].evaluated_with or name


def stochastic_steps(sampler_cfg, offset: int = 0) -> list[int]:
    """The steps a sampler config makes stochastic (policy steps with a log-prob) with its SDE window at ``offset``
    (0: where it starts), before any model is loaded."""
    check_sampler_name(sampler_cfg.name)
    return SAMPLERS[sampler_cfg.name].stochastic_steps(sampler_cfg, offset)


def window_positions(sampler_cfg) -> list[tuple[int, int]]:
    """``(first epoch, offset)`` of every place the SDE window takes over a run (one unless it slides)."""
    window = SDEWindow.from_config(sampler_cfg)
    return [(offset * window.slide_every, offset) for offset in range(window.positions())]


def build_sampler(sampler_cfg, model) -> Sampler:
    """The sampler of ``sampler_cfg`` on the noise schedule of ``model`` (a loaded model family)."""
    check_sampler(sampler_cfg, type(model))
    sampler = SAMPLERS[sampler_cfg.name].from_config(sampler_cfg, model)
    sampler.log_prob_form = sampler_cfg.log_prob
    return sampler
