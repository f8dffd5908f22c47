"""Rectified-flow samplers (SD3, FLUX): the Euler ODE of inference and the stochastic policy steps of Flow-GRPO,
DanceGRPO and Flow-CPS, with an SDE window (MixGRPO / Flow-GRPO-Fast: only a few steps are stochastic and trained).

Convention (diffusers' ``FlowMatchEulerDiscreteScheduler``): noise level ``s`` in [0, 1], ``x_s = (1 - s) x0 + s eps``,
the model predicts the velocity ``v = eps - x0``; step ``i`` goes from ``s = sigmas[i]`` to ``s_next = sigmas[i+1]``
(``dt = s_next - s < 0``; the last ``s_next`` is 0). The sigmas, shift included, are the scheduler's own: the
family says how its pipeline calls ``set_timesteps`` (a static shift for SD3, a resolution-dependent ``mu`` and
custom sigmas for FLUX). The stochastic steps are Gaussians ``N(mean, std^2 I)`` (maths from the papers; our code):

- ``flow_sde`` (Flow-GRPO, arXiv 2505.05470): ``sig = a sqrt(s / (1 - s))`` (at ``s = 1`` the denominator uses
  ``sigmas[1]``), ``std = sig sqrt(-dt)``, ``mean = x (1 + sig^2 dt / (2 s)) + v (1 + sig^2 (1 - s) / (2 s)) dt``;
- ``dance_sde`` (DanceGRPO, arXiv 2505.07818): the same form with a constant ``sig = a``;
- ``flow_cps`` (coefficients-preserving, arXiv 2509.05952): ``std = s_next sin(a pi / 2)``,
  ``mean = (1 - s_next) x0_hat + s_next cos(a pi / 2) eps_hat`` with ``x0_hat = x - s v``, ``eps_hat = x + (1 - s) v``;
- ``flow_ode``: every step deterministic.

In every flow sampler the final step (to ``s_next = 0``) is the Euler step: neither noisy nor trained.

``a = 0`` gives the Euler step exactly (``tests/test_flow_samplers.py``).
"""
from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ..errors import UserError
from .base import StochasticChain
from .window import SDEWindow

KINDS = {"flow_ode": "Euler ODE", "flow_sde": "Flow-GRPO", "dance_sde": "DanceGRPO", "flow_cps": "Flow-CPS"}


def _expand(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[N]`` -> ``[N, 1, 1, 1]`` (broadcast against ``like``)."""
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def flow_sigmas(scheduler_config: dict, timestep_kwargs: dict) -> torch.Tensor:
    """``[T + 1]`` noise levels of the inference chain (the last is 0), exactly as the scheduler sets them."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(**timestep_kwargs)
    return scheduler.sigmas.to(torch.float32)


def sde_mean_std(kind: str, noise_level: float, v: torch.Tensor, x: torch.Tensor, s: torch.Tensor,
                 s_next: torch.Tensor, s_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[N,C,h,w]`` and std ``[N,1,1,1]`` of one stochastic step (``s``, ``s_next``: ``[N,1,1,1]``), fp32."""
    dt = s_next - s
    if kind == "flow_cps":
        std = s_next * math.sin(noise_level * math.pi / 2)
        x0_hat, eps_hat = x - s * v, x + (1 - s) * v
        return (1 - s_next) * x0_hat + s_next * math.cos(noise_level * math.pi / 2) * eps_hat, std
    if kind == "flow_sde":
        sig = noise_level * torch.sqrt(s / (1 - torch.where(s == 1, torch.full_like(s, s_max), s)))
    else:  # dance_sde
        sig = torch.full_like(s, noise_level)
    mean = x * (1 + sig**2 * dt / (2 * s)) + v * (1 + sig**2 * (1 - s) / (2 * s)) * dt
    return mean, sig * torch.sqrt(-dt)


class FlowSampler(StochasticChain):
    """The sampler seam for rectified-flow families. ``kind``: flow_ode | flow_sde | dance_sde | flow_cps;
    ``noise_level`` is ``a`` above; ``sde_window = (first, end)`` limits the stochastic steps to
    ``first <= i < end`` (None: all), and ``slide_every = k > 0`` moves that window one step later every ``k``
    epochs (from the noisiest steps on, wrapping around; :meth:`set_epoch`)."""

    model_kind = "flow"
    evaluated_with = "flow_ode"  # a flow model's own sampler at inference: ddpo eval compares without step noise
    noise_key = "noise_level"
    deterministic_names = ("flow_ode",)

    @classmethod
    def check(cls, sampler_cfg) -> None:
        super().check(sampler_cfg)
        level = sampler_cfg.noise_level
        if level < 0 or (sampler_cfg.name == "flow_cps" and level > 1):
            raise UserError(f"sampler.noise_level={level}: use >= 0 (flow_cps: at most 1)")

    def __init__(self, sigmas: torch.Tensor, kind: str = "flow_sde", noise_level: float = 0.7,
                 sde_window: tuple[int, int] | None = None, slide_every: int = 0, num_train_timesteps: int = 1000,
                 device: torch.device | str = "cpu") -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown flow sampler {kind!r}: choose one of {', '.join(KINDS)}")
        self.name, self.kind, self.noise_level = kind, kind, float(noise_level)
        self.sigmas = sigmas.to(device=device, dtype=torch.float32)         # [T + 1]
        self.num_steps = len(self.sigmas) - 1
        self.num_train_timesteps = num_train_timesteps
        self.window = SDEWindow(self.num_steps, sde_window, slide_every)

    @classmethod
    def from_config(cls, sampler_cfg, model) -> "FlowSampler":
        """``sampler_cfg``: conf/sampler/flow_*.yaml; ``model``: a flow family (its schedule and timestep setting)."""
        sigmas = flow_sigmas(model.scheduler_config, model.timestep_kwargs(sampler_cfg.num_steps))
        return cls(sigmas, sampler_cfg.name, sampler_cfg.noise_level,
                   tuple(sampler_cfg.sde_window) if sampler_cfg.sde_window else None,
                   sampler_cfg.sde_window_slide_every, model.scheduler_config.get("num_train_timesteps", 1000),
                   model.device)

    @staticmethod
    def stochastic_steps(sampler_cfg, offset: int = 0) -> list[int]:
        """The policy steps that a config gives with its SDE window at ``offset`` (for checks before any model is
        loaded); never the final step (see :meth:`is_stochastic`)."""
        if sampler_cfg.name == "flow_ode" or sampler_cfg.noise_level <= 0:
            return []
        return [i for i in SDEWindow.from_config(sampler_cfg).steps(offset) if i < sampler_cfg.num_steps - 1]

    # ------------------------------------------------------------------------------------------ the chain
    @property
    def timesteps(self) -> torch.Tensor:
        """``[T]`` the denoiser's time input per step (``1000 s``, as the scheduler's timesteps)."""
        return self.sigmas[:-1] * self.num_train_timesteps

    def model_time(self, steps: torch.Tensor) -> torch.Tensor:
        return self.timesteps[steps]


    def is_stochastic(self, i: int) -> bool:
        """Whether step ``i`` is a policy step: in the SDE window, and not the final step, which lands on the data
        (``s_next = 0``) and is always the Euler step. Flow-CPS gives it no noise; Flow-GRPO samples it with a
        little (std 0.006 on SD3's 10 steps) but leaves it untrained (``timestep_fraction`` 0.99), since its
        log-ratio is the most sensitive of the chain."""
        if self.kind == "flow_ode" or self.noise_level <= 0 or i not in self.window:
            return False
        return i < self.num_steps - 1

    def _levels(self, steps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _expand(self.sigmas[steps], like), _expand(self.sigmas[steps + 1], like)

    def step_distribution(self, output: torch.Tensor, x_t: torch.Tensor,
                          steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, v = x_t.float(), output.float()
        s, s_next = self._levels(steps, x)
        return sde_mean_std(self.kind, self.noise_level, v, x, s, s_next, float(self.sigmas[1]))

    def clean_estimate(self, output: torch.Tensor, x_t: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The clean latents the velocity implies at ``x_t``: ``x0_hat = x_s - s v`` (fp32)."""
        x = x_t.float()
        s, _ = self._levels(steps, x)
        return x - s * output.float()

    def step(self, output: torch.Tensor, x_t: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The Euler step of the ODE (``FlowMatchEulerDiscreteScheduler.step``): ``x + (s_next - s) v``."""
        x = x_t.float()
        s, s_next = self._levels(steps, x)
        return x + (s_next - s) * output.float()

    # ------------------------------------------------------------------------------------------ training loss
    def training_times(self, n: int, device: torch.device | str,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """``[n]`` noise levels ``s ~ U(0, 1)`` in the denoiser's time units (``1000 s``; ``generator``, a CPU one,
        or torch's global generator)."""
        return (torch.rand(n, generator=generator) * self.num_train_timesteps).to(device)

    def noisy_and_target(self, x0: torch.Tensor, noise: torch.Tensor,
                         t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow-matching forward process at ``t = 1000 s``: ``x_s = (1 - s) x0 + s noise``, target
        ``noise - x0``."""
        s = _expand(t.float() / self.num_train_timesteps, x0)
        return (1 - s) * x0 + s * noise, noise - x0
