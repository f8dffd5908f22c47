"""The per-pair tensors an update rule's loss declares (``algo.needs``, :mod:`ddpo_cli.algorithms.base`), for one
chunk of (sample, column) pairs of an epoch's samples.

Chain pairs (``trains_on = "chain"``): column = a stored step of the sampled chain. Forward pairs (``"forward"``):
column = one of the sample's fresh noise levels, drawn per epoch with their noise by :func:`draw_forward` (a pair's
two samples share theirs: Diffusion-DPO compares them at one noise level and one noise).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .books import EpochSamples
from .models import ModelFamily
from .old_policy import OldPolicy
from .rollout import Trajectory, denoising_errors, policy_step
from .runtime import derive_seed
from .samplers import Sampler

POLICY_TENSORS = {"log_prob", "mean", "std", "output", "clean_estimate"}
BASE_TENSORS = {"base_mean", "base_output"}
RECORDED_OUTPUTS = {"old_clean_estimate", "old_mean"}  # need each step's output recorded when sampling


@dataclass
class PairSource:
    """What computes the tensors: the model family, the sampler, the trained denoiser (as prepared: DDP-wrapped)
    and the bare one, the guidance of chain steps, the old policy if the algorithm keeps one, and the reference
    (``reference()``: the context in which the bare denoiser is the base model, :mod:`ddpo_cli.reference`)."""

    model: ModelFamily
    sampler: Sampler
    denoiser: object
    unwrapped: object
    guidance: float
    old_policy: OldPolicy | None = None
    reference: object = None


@dataclass
class ForwardDraws:
    noise: torch.Tensor   # [N, T, C, h, w]
    times: torch.Tensor   # [N, T] the denoiser's time input


def draw_forward(sampler: Sampler, n: int, times_per_sample: int, latent_shape: tuple, generator: torch.Generator,
                 device, partners: torch.Tensor | None = None, window: tuple[int, int] | None = None) -> ForwardDraws:
    """``times_per_sample`` noise levels and noise draws per sample (a CPU ``generator``: the same on any device):
    the sampler's own times at steps drawn from ``window`` (step indices ``[first, end)``), or, without a window,
    the family's training distribution over the whole noise scale. ``partners`` [N]: offsets to each sample's pair
    partner (0 = none); a pair's second member takes the first's draws."""
    noise = torch.randn((n, times_per_sample, *latent_shape), generator=generator)
    if window is None:
        times = sampler.training_times(n * times_per_sample, "cpu", generator)
    else:
        steps = torch.randint(window[0], window[1], (n * times_per_sample,), generator=generator)
        times = sampler.model_time(steps).cpu()
    times = times.view(n, times_per_sample)
    if partners is not None:
        for i, offset in enumerate(partners.long().tolist()):
            if offset > 0:  # i is the pair's first member: the second takes its draws
                noise[i + offset], times[i + offset] = noise[i], times[i]
    return ForwardDraws(noise.to(device), times.to(device))


def draws_for(algo, sampler: Sampler, model: ModelFamily, targets: torch.Tensor, times_per_sample: int,
              generator: torch.Generator, window: tuple[int, int]) -> ForwardDraws:
    """The draws of a forward-process algorithm's samples (``targets`` [N] or [N, 2]: its pairs share theirs) at
    its ``algo.times``: the sampler's times inside the training window (``schedule``) or ``uniform``."""
    partners = targets[:, 0] if algo.targets == "pairs" else None
    return draw_forward(sampler, len(targets), times_per_sample, model.latent_shape(), generator, targets.device,
                        partners, window if algo.times == "schedule" else None)


def needs_recorded_outputs(needs) -> bool:
    return bool(set(needs) & RECORDED_OUTPUTS)


def pair_tensors(source: PairSource, algo, samples: EpochSamples, targets: torch.Tensor, rows: torch.Tensor,
                 cols: torch.Tensor, draws: ForwardDraws | None = None) -> dict[str, torch.Tensor]:
    """Exactly the per-pair tensors the algorithm's loss declares (``algo.needs``) plus its targets."""
    out = {algo.targets: targets[rows]}
    if algo.trains_on == "forward":
        out.update(forward_tensors(source, algo, samples, targets, rows, cols, draws))
    else:
        out.update(chain_tensors(source, set(algo.needs), samples, rows, cols))
    return {key: out[key] for key in (*algo.needs, algo.targets)}


def chain_tensors(source: PairSource, needs: set[str], samples: EpochSamples, rows: torch.Tensor,
                  cols: torch.Tensor) -> dict[str, torch.Tensor]:
    model, sampler, traj = source.model, source.sampler, samples.trajectory
    cond = model.encode([samples.prompts[i] for i in rows.tolist()])
    step = (traj.latents[rows, cols], traj.next_latents[rows, cols], traj.steps[rows, cols], cond, source.guidance)
    out = {}
    if "old_log_prob" in needs:
        out["old_log_prob"] = traj.log_probs[rows, cols]
    if needs & BASE_TENSORS:  # before the policy's graph: a full fine-tuning reference swaps the weights in place
        with torch.no_grad(), source.reference():
            base = policy_step(model, sampler, source.unwrapped, *step)
        out.update(base_mean=base["mean"], base_output=base["output"])
    if needs & POLICY_TENSORS:
        out.update(policy_step(model, sampler, source.denoiser, *step))
    if needs & RECORDED_OUTPUTS:
        recorded = traj.outputs[rows, cols]
        out["old_clean_estimate"] = sampler.clean_estimate(recorded, traj.latents[rows, cols], traj.steps[rows, cols])
        out["old_mean"] = sampler.step_distribution(recorded, traj.latents[rows, cols], traj.steps[rows, cols])[0]
    if "clean_latents" in needs:
        out["clean_latents"] = traj.final[rows].float()
    if "errors" in needs:
        out["errors"] = denoising_errors(model, sampler, source.denoiser, traj.final[rows], cond)
    return out


def forward_tensors(source: PairSource, algo, samples: EpochSamples, targets: torch.Tensor, rows: torch.Tensor,
                    cols: torch.Tensor, draws: ForwardDraws) -> dict[str, torch.Tensor]:
    """Outputs at the pairs' fresh noise levels: the old policy's and the base model's first (no gradient; the old
    weights are swapped in and out in place), then the policy's with its gradient."""
    needs, model = set(algo.needs), source.model
    noise, times = draws.noise[rows, cols], draws.times[rows, cols]
    noisy, target = source.sampler.noisy_and_target(samples.trajectory.final[rows].float(), noise, times)
    cond = model.encode([samples.prompts[i] for i in rows.tolist()])

    def predict(denoiser, x, c):
        return model.predict(denoiser, x, times, c, model.negative, algo.guidance)

    out = {"target": target}
    if "old_prediction" in needs:
        with source.old_policy.swapped_in():
            out["old_prediction"] = predict(source.unwrapped, noisy, cond)
    if "partner_prediction" in needs:
        partner = rows + targets[rows, 0].long()
        p_noisy, p_target = source.sampler.noisy_and_target(samples.trajectory.final[partner].float(), noise, times)
        p_cond = model.encode([samples.prompts[i] for i in partner.tolist()])
        out["partner_target"] = p_target
        with torch.no_grad():
            out["partner_prediction"] = predict(source.unwrapped, p_noisy, p_cond)
            with source.reference():
                out["partner_base_prediction"] = predict(source.unwrapped, p_noisy, p_cond)
    if "base_prediction" in needs:
        with torch.no_grad(), source.reference():
            out["base_prediction"] = predict(source.unwrapped, noisy, cond)
    out["prediction"] = predict(source.denoiser, noisy, cond)
    return out


class OfflinePairs:
    """The pairs of a preference file (``algo=dpo_offline``), their images encoded once by the model's VAE."""

    def __init__(self, pairs: list, model: ModelFamily, device, batch_size: int = 16) -> None:
        from .preferences import load_image

        self.prompts = [pair.prompt for pair in pairs]

        def encoded(paths):
            chunks = [torch.stack([load_image(p, model.resolution) for p in paths[i:i + batch_size]])
                      for i in range(0, len(paths), batch_size)]
            return torch.cat([model.encode_images(chunk) for chunk in chunks]).to(device)

        self.chosen = encoded([pair.chosen for pair in pairs])
        self.rejected = encoded([pair.rejected for pair in pairs])

    @classmethod
    def of(cls, algo, model: ModelFamily, device) -> "OfflinePairs | None":
        return cls(algo.pairs(), model, device) if algo.rollout == "offline" else None

    def __len__(self) -> int:
        return len(self.prompts)

    def order(self, seed: int, first: int, count: int) -> list[int]:
        """Items ``first .. first + count - 1`` of an endless sequence of shuffled passes through the pairs."""
        size, picked = len(self), []
        for position in range(first, first + count):
            rank = position // size
            generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
            picked.append(int(torch.randperm(size, generator=generator)[position % size]))
        return picked

    def epoch_samples(self, cfg, algo, epoch: int, n_pairs: int, process: int,
                      processes: int) -> tuple[EpochSamples, torch.Tensor]:
        """This process's ``n_pairs`` pairs of the epoch as samples ``[chosen..., rejected...]`` and their targets
        ``[2 n, 2]`` (partner offset, side; swapped by the algorithm's coin flips in a control run)."""
        picked = self.order(cfg.seed, (epoch * processes + process) * n_pairs, n_pairs)
        final = torch.cat([self.chosen[picked], self.rejected[picked]])
        prompts = [self.prompts[i] for i in picked] * 2
        trajectory = Trajectory(None, None, None, None, final)
        samples = EpochSamples(trajectory, prompts, [{}] * len(prompts), torch.zeros(len(prompts)), final[:0])
        targets = np.concatenate([np.stack([np.full(n_pairs, n_pairs), np.ones(n_pairs)], 1),
                                  np.stack([np.full(n_pairs, -n_pairs), -np.ones(n_pairs)], 1)]).astype(np.float64)
        if cfg.advantage.shuffle:
            targets = algo.shuffled(targets, np.random.default_rng(derive_seed(cfg.seed, epoch, process, "control")))
        return samples, torch.as_tensor(targets, dtype=torch.float32, device=final.device)
