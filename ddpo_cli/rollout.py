"""The one denoising chain loop, for training, ``ddpo sample`` and ``ddpo eval``, and the per-pair recomputations of
the update step.

:func:`run_chain` runs a model family's denoiser under a sampler from initial noise to clean latents. Each step is
stochastic (a Gaussian policy step: ``x_next = mean + std z``) or deterministic, as the sampler says. Optionally it
records the chain (latents, next latents, log-probs, step indices: what the policy-gradient update needs), keeps the
autograd graph of chosen steps (reward backprop), and gradient-checkpoints the kept denoiser calls.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch.utils.checkpoint import checkpoint

from .models import Conditioning, ModelFamily
from .noise import NoiseSource, per_image_noise
from .samplers import Sampler
from .samplers.gaussian import gaussian_kl


@dataclass
class Trajectory:
    """A batch of sampled denoising chains (detached). B samples, T steps; step ``j`` of sample ``b`` went from
    ``latents[b, j]`` to ``next_latents[b, j]`` at step index ``steps[b, j]`` (the sampler maps indices to times)."""

    latents: torch.Tensor       # [B, T, C, h, w]  x before each step
    next_latents: torch.Tensor  # [B, T, C, h, w]  x after each step
    log_probs: torch.Tensor     # [B, T]           log pi_old(x_next | x, c) (0 for deterministic steps)
    steps: torch.Tensor         # [B, T]           step indices (long)
    final: torch.Tensor         # [B, C, h, w]     clean latents (for decoding)
    outputs: torch.Tensor | None = None  # [B, T, C, h, w] the denoiser output (after CFG) of each step, if recorded
    branch: torch.Tensor | None = None   # [B] the step whose noise is the sample's own (trajectory branching), if any

    @staticmethod
    def cat(parts: list["Trajectory"]) -> "Trajectory":
        def joined(name: str):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return Trajectory(*(joined(f.name) for f in fields(Trajectory)))


def trained_steps(sampler: Sampler, window: tuple[int, int]) -> torch.Tensor:
    """The stochastic steps inside the training window ``[first, end)`` this epoch (an SDE window may slide)."""
    first, end = window
    return torch.tensor([i for i in range(first, end) if sampler.is_stochastic(i)])


def is_deterministic(sampler: Sampler) -> bool:
    """No step of the chain is stochastic (an ODE, DDIM eta 0): there is no step distribution to compare."""
    return not any(sampler.is_stochastic(i) for i in range(sampler.num_steps))


@torch.no_grad()
def images_from_seeds(model: ModelFamily, sampler: Sampler, denoiser, prompts: list[str], seeds: list[int],
                      guidance: float, device) -> torch.Tensor:
    """Images ``[N,3,H,W]`` in [0, 1] of ``prompts``: one CPU generator per image, seeded ``seeds[i]``, draws its
    initial noise and every stochastic step's noise, so image ``i`` does not depend on the batch it is drawn in."""
    return model.decode(latents_from_seeds(model, sampler, denoiser, prompts, seeds, guidance, device))


@torch.no_grad()
def latents_from_seeds(model: ModelFamily, sampler: Sampler, denoiser, prompts: list[str], seeds: list[int],
                       guidance: float, device) -> torch.Tensor:
    """The final latents of :func:`images_from_seeds`, before decoding."""
    noise = per_image_noise(model.latent_shape(), [torch.Generator().manual_seed(s) for s in seeds], device)
    final, _ = run_chain(model, sampler, denoiser, noise(None), model.encode(prompts), guidance, noise)
    return final


def run_chain(model: ModelFamily, sampler: Sampler, denoiser, x: torch.Tensor, cond: Conditioning, guidance: float,
              noise: NoiseSource | None = None, record: bool = False, keep_grad: list[bool] | None = None,
              checkpoint_denoiser: bool = False, record_outputs: bool = False) -> tuple[torch.Tensor, Trajectory | None]:
    """The chain from ``x [B,C,h,w]`` (initial noise) to clean latents; returns ``(final, trajectory or None)``.

    ``noise(i)`` supplies stochastic step i's draw (after the step's denoiser call). ``keep_grad[i]`` says whether
    step i's denoiser output keeps its gradient (reward backprop; None = no step does). Detached outputs still pass
    gradient along the latent chain. Run under ``torch.no_grad()`` when nothing keeps a gradient.
    ``record_outputs`` also keeps each step's denoiser output in the trajectory (the old policy's predictions).
    """
    x = x.float()
    batch = x.shape[0]
    uncond = model.negative
    before, after, log_probs, steps, outputs = [], [], [], [], []
    for i in range(sampler.num_steps):
        step = torch.full((batch,), i, dtype=torch.long, device=x.device)
        t = sampler.model_time(step)

        def predict(latents):
            return model.predict(denoiser, latents, t, cond, uncond, guidance)

        if keep_grad is not None and keep_grad[i]:
            output = checkpoint(predict, x, use_reentrant=False) if checkpoint_denoiser else predict(x)
        else:
            with torch.no_grad():
                output = predict(x)
        if sampler.is_stochastic(i):
            mean, std = sampler.step_distribution(output, x, step)
            x_next = mean + std * noise(i)
            log_prob = sampler.log_prob(x_next.detach(), mean, std) if record else None
        else:
            x_next = sampler.step(output, x, step)
            log_prob = torch.zeros(batch, device=x.device) if record else None
        if record:
            before.append(x)
            after.append(x_next.detach())
            log_probs.append(log_prob)
            steps.append(step)
            if record_outputs:
                outputs.append(output.detach().float())
        x = x_next
    if not record:
        return x, None
    return x, Trajectory(torch.stack(before, 1), torch.stack(after, 1), torch.stack(log_probs, 1),
                         torch.stack(steps, 1), x, torch.stack(outputs, 1) if record_outputs else None)


# ----------------------------------------------------------------------------------------------- update step
def policy_step(model: ModelFamily, sampler: Sampler, denoiser, latents: torch.Tensor, next_latents: torch.Tensor,
                steps: torch.Tensor, cond: Conditioning, guidance: float) -> dict[str, torch.Tensor]:
    """For (sample, step) pairs: ``log pi(next | latents, c)`` ``[P]``, the step's ``mean``, ``std``, the
    denoiser ``output`` (after CFG) and the ``clean_estimate`` it implies, with the same maths and guidance as
    sampling (ratio == 1 before an update)."""
    output = model.predict(denoiser, latents, sampler.model_time(steps), cond, model.negative, guidance)
    mean, std = sampler.step_distribution(output, latents, steps)
    return {"log_prob": sampler.log_prob(next_latents.detach().float(), mean, std), "mean": mean, "std": std,
            "output": output, "clean_estimate": sampler.clean_estimate(output, latents, steps)}


def output_drift(model: ModelFamily, sampler: Sampler, denoiser, reference, latents: torch.Tensor,
                 steps: torch.Tensor, cond: Conditioning, guidance: float) -> torch.Tensor:
    """``[P]`` mean squared difference between the policy's guided output and the base model's (the same denoiser
    in the ``reference()`` context, :mod:`ddpo_cli.reference`, no gradient) at states ``latents`` of step indices
    ``steps`` (prior preservation)."""
    t = sampler.model_time(steps)
    with torch.no_grad(), reference():  # first: a full fine-tuning reference swaps weights the graph would keep
        base = model.predict(denoiser, latents, t, cond, model.negative, guidance)
    policy = model.predict(denoiser, latents, t, cond, model.negative, guidance)
    return ((policy.float() - base.float()) ** 2).mean(dim=tuple(range(1, latents.ndim)))


def preservation_drift(model: ModelFamily, sampler: Sampler, denoiser, reference, traj: Trajectory,
                       rows: torch.Tensor, cols: torch.Tensor, prompts: list[str], pairs: int, guidance: float,
                       generator: torch.Generator) -> torch.Tensor:
    """Prior preservation (``train.preserve``): the mean :func:`output_drift` at ``pairs`` of the update's stored
    states ``(rows, cols)``, each under a prompt drawn from the preserved ``prompts``."""
    picked = torch.randint(rows.numel(), (pairs,), generator=generator)
    chosen = [prompts[i] for i in torch.randint(len(prompts), (pairs,), generator=generator).tolist()]
    r, c = rows[picked], cols[picked]
    return output_drift(model, sampler, denoiser, reference, traj.latents[r, c], traj.steps[r, c],
                        model.encode(chosen), guidance).mean()


def denoising_errors(model: ModelFamily, sampler: Sampler, denoiser, x0: torch.Tensor,
                     cond: Conditioning) -> torch.Tensor:
    """Per-pair mean squared error ``[P]`` of the family's training loss at a random training time (no CFG)."""
    t = sampler.training_times(x0.shape[0], x0.device)
    noisy, target = sampler.noisy_and_target(x0, torch.randn_like(x0), t)
    prediction = model.predict(denoiser, noisy, t, cond, model.negative, 1.0)
    return ((prediction - target) ** 2).mean(dim=tuple(range(1, x0.ndim)))


def kl_to_base(model: ModelFamily, sampler: Sampler, denoiser, reference, traj: Trajectory, prompts: list[str],
               guidance: float, max_samples: int = 2, max_steps: int = 3) -> torch.Tensor:
    """Mean KL(policy step || base step) over the first ``max_samples`` chains at up to ``max_steps`` evenly spaced
    stochastic steps (the base model: the same denoiser in the ``reference()`` context, without gradient). The
    policy's side keeps its gradient unless called under ``torch.no_grad()`` (a reading during training)."""
    n, t = traj.log_probs.shape
    stochastic = torch.tensor([i for i in range(t) if sampler.is_stochastic(i)] or [0])
    picked = stochastic[torch.linspace(0, len(stochastic) - 1, min(len(stochastic), max_steps)).round().long()]
    rows = torch.arange(min(n, max_samples)).repeat_interleave(len(picked))
    cols = picked.repeat(min(n, max_samples))
    cond = model.encode([prompts[i] for i in rows.tolist()])
    args = (traj.latents[rows, cols], traj.next_latents[rows, cols], traj.steps[rows, cols], cond, guidance)
    with torch.no_grad(), reference():  # first: a full fine-tuning reference swaps weights the graph would keep
        base = policy_step(model, sampler, denoiser, *args)
    policy = policy_step(model, sampler, denoiser, *args)
    return gaussian_kl(policy["mean"], base["mean"], policy["std"]).mean()
