"""``ddpo doctor``: the invariants that make RL on a diffusion model correct, checked on the run as ``ddpo train``
would build it (model, precision, sampler, algorithm, reward, launcher), in a minute or two, before GPU days are
spent on a run that is wrong from step 0.

Each check returns a :class:`Check`: what was measured, the threshold, and whether it passed (None: does not apply
to this run). The run is built by :class:`~ddpo_cli.trainer.Trainer` in a temporary folder, from one batch of
samples (a mini-epoch); nothing of the user's is written.
"""
from __future__ import annotations

import random
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from . import checkpoint
from .config import plan_run
from .errors import UserError
from .models import adapters_disabled
from .pairs import draws_for
from .probe import fixed_sampler_config, plan_probe, probe_images
from .rollout import is_deterministic, kl_to_base, policy_step, trained_steps
from .samplers import build_sampler, noise_key

# |ratio - 1| allowed at the first update, and between chunkings of the same pairs (or the algorithm's clip range,
# when smaller): fp32 recomputes the sampled log-probs to ~1e-6 (docs/monitoring.md)
RATIO_TOLERANCE = {"no": 1e-3, "bf16": 2e-2, "fp16": 2e-2}
ZERO_NOISE_TOLERANCE = 1e-4   # max |SDE mean at zero noise - deterministic step|, latents of unit scale
KL_AT_INIT = 1e-8
PAIRS = 8                     # (sample, step) pairs the log-prob checks recompute
NO_STORED_STEPS = "the algorithm trains no stored step"


@dataclass
class Check:
    name: str
    measured: str
    threshold: str
    passed: bool | None       # None: does not apply to this run


@dataclass
class MiniEpoch:
    """One batch of samples, as the trainer drew and scored it, and what it cost."""

    samples: object
    rewards: object
    sample_seconds: float


def run_doctor(cfg: DictConfig) -> tuple[list[Check], list[tuple[str, str]]]:
    """Every check on ``cfg`` (a ``ddpo train`` config); returns the checks and information rows (seconds per epoch).
    A config that ``ddpo train`` refuses is the first check, failed, and nothing else runs."""
    from .trainer import Trainer  # deferred: the command layer imports this module for --help too

    try:
        plan = plan_run(cfg)
    except UserError as exc:
        return [Check("config", str(exc), "ddpo train accepts it", False)], []
    checks = [Check("config", f"{plan.algorithm.name} / {plan.reward.name}, {cfg.sampler.name}", "accepted", True)]
    run_dir = Path(tempfile.mkdtemp(prefix="ddpo_doctor_"))
    trainer = Trainer(doctor_config(cfg), run_dir, plan)
    try:
        trainer.setup()
        mini = mini_epoch(trainer)
        pairs, trained = log_prob_pairs(trainer, mini), update_pairs(trainer, mini)
        checks += [ratio_at_first_update(trainer, mini, pairs), log_prob_chunking(trainer, mini, pairs),
                   zero_noise_limit(trainer, mini), kl_to_base_check(trainer, mini), reward_contract(trainer, mini),
                   paired_measure_check(trainer), only_trainable_get_gradients(trainer, mini, trained)]
        info = [("seconds / epoch (estimated)", seconds_per_epoch(trainer, mini, trained))]
        checks.append(save_resume_round_trip(trainer))
        return checks, info
    finally:
        trainer.cleanup()
        shutil.rmtree(run_dir, ignore_errors=True)


def doctor_config(cfg: DictConfig) -> DictConfig:
    """The run's config with nothing logged or measured on the side (the doctor measures what it needs itself)."""
    cfg = cfg.copy()
    cfg.log.tracker, cfg.log.paired.every, cfg.log.kl_to_base_every, cfg.log.async_reward = "none", 0, 0, False
    cfg.monitor = {**cfg.monitor, "every": 0, "stop_when": []} if cfg.monitor else None
    cfg.resume = None
    return cfg


def mini_epoch(trainer) -> MiniEpoch:
    """One batch sampled and scored exactly as an epoch's batches are."""
    batches = trainer.cfg.sampler.num_batches_per_epoch
    trainer.cfg.sampler.num_batches_per_epoch = 1
    try:
        start = time.perf_counter()
        samples, _ = trainer.sample(0) if trainer.algo.rollout != "backprop" else (None, None)
        seconds = time.perf_counter() - start
    finally:
        trainer.cfg.sampler.num_batches_per_epoch = batches
    rewards = samples.rewards.detach().float().cpu() if samples is not None else None
    return MiniEpoch(samples, rewards, seconds)


def log_prob_pairs(trainer, mini: MiniEpoch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Up to :data:`PAIRS` (sample, step) pairs of the trained steps, spread over the samples; None when the run
    trains no stored step (reward backprop, forward-process rules, or no update at all)."""
    if mini.samples is None or trainer.algo.rollout != "sample" or trainer.algo.trains_on != "chain":
        return None
    steps = trained_steps(trainer.sampler, trainer.counts.window).tolist()
    n = len(mini.samples.prompts)
    rows = torch.arange(n).repeat_interleave(len(steps))[:PAIRS]
    cols = torch.tensor(steps * n)[:PAIRS]
    return rows, cols


def update_pairs(trainer, mini: MiniEpoch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The pairs an update trains: the stored steps, or (forward-process rules) each sample at one fresh noise
    level, drawn as an epoch draws them."""
    if trainer.algo.trains_on != "forward" or mini.samples is None:
        return log_prob_pairs(trainer, mini)
    n = len(mini.samples.prompts)
    trainer.draws = draws_for(trainer.algo, trainer.sampler, trainer.model, made_up_targets(trainer, n), 1,
                              torch.Generator().manual_seed(0), trainer.counts.window)
    return torch.arange(n), torch.zeros(n, dtype=torch.long)


def made_up_targets(trainer, n: int) -> torch.Tensor:
    """Targets of ``n`` samples from made-up rewards ``-1 .. 1`` (non-zero advantages, distinct preferences)."""
    rewards = np.linspace(-1.0, 1.0, n)
    algo = trainer.algo
    targets = rewards if algo.targets == "advantages" else \
        algo.targets_from_rewards(rewards[::-1].copy(), trainer.cfg.sampler.group_size)
    return torch.as_tensor(targets, dtype=torch.float32, device=trainer.device)


def recomputed_log_probs(trainer, mini: MiniEpoch, rows: torch.Tensor, cols: torch.Tensor,
                         chunk: int) -> torch.Tensor:
    """``[P]`` the policy's log-probs of the stored pairs, recomputed in chunks of ``chunk`` pairs in the run's
    precision, as the update does."""
    traj, out = mini.samples.trajectory, []
    with torch.no_grad(), trainer.accelerator.autocast():
        for first in range(0, rows.numel(), chunk):
            r, c = rows[first:first + chunk], cols[first:first + chunk]
            cond = trainer.model.encode([mini.samples.prompts[i] for i in r.tolist()])
            out.append(policy_step(trainer.model, trainer.sampler, trainer.denoiser, traj.latents[r, c],
                                   traj.next_latents[r, c], traj.steps[r, c], cond,
                                   trainer.training_guidance)["log_prob"].float())
    return torch.cat(out)


def ratio_tolerance(trainer) -> float:
    """The precision's tolerance, or the algorithm's clip range when smaller: a ratio already outside it at the
    first update is clipped before the policy has changed (the bf16 failure of the peers' trackers)."""
    tolerance = RATIO_TOLERANCE.get(trainer.precision, RATIO_TOLERANCE["bf16"])
    clip = getattr(trainer.algo, "clip_range", None) if getattr(trainer.algo, "importance_sampling", True) else None
    return min(tolerance, clip) if clip else tolerance


def ratio_at_first_update(trainer, mini: MiniEpoch, pairs) -> Check:
    """pi / pi_old of the sampled steps before any update: 1 when the update recomputes the sampler's log-probs."""
    name = "ratio at the first update"
    if pairs is None:
        return Check(name, NO_STORED_STEPS, "-", None)
    rows, cols = pairs
    chunk = trainer.cfg.train.batch_size * trainer.cfg.train.timesteps_per_forward
    log_ratio = recomputed_log_probs(trainer, mini, rows, cols, chunk) - \
        mini.samples.trajectory.log_probs[rows, cols].float()
    deviation = float((log_ratio.exp() - 1).abs().max())
    approx_kl = float((0.5 * log_ratio ** 2).mean())
    tolerance = ratio_tolerance(trainer)
    precision = "fp32" if trainer.precision == "no" else trainer.precision
    return Check(name, f"max |ratio - 1| {deviation:.2e}, approx KL {approx_kl:.2e} ({precision}, "
                       f"{rows.numel()} pairs)", f"< {tolerance:g}", bool(deviation < tolerance))


def log_prob_chunking(trainer, mini: MiniEpoch, pairs) -> Check:
    """The same pairs' log-probs one at a time, all at once, and in the run's chunks: the batch a pair is computed
    in must not change its log-prob."""
    name = "log-prob vs batch size / chunking"
    if pairs is None:
        return Check(name, NO_STORED_STEPS, "-", None)
    rows, cols = pairs
    chunk = trainer.cfg.train.batch_size * trainer.cfg.train.timesteps_per_forward
    results = [recomputed_log_probs(trainer, mini, rows, cols, size) for size in (1, rows.numel(), chunk)]
    spread = max(float((a - results[0]).exp().sub(1).abs().max()) for a in results[1:])
    tolerance = ratio_tolerance(trainer)
    return Check(name, f"max |exp(difference) - 1| {spread:.2e} (chunks of 1, {rows.numel()}, {chunk})",
                 f"< {tolerance:g}", bool(spread < tolerance))


def zero_noise_limit(trainer, mini: MiniEpoch) -> Check:
    """The stochastic step with its noise set to 0 lands where the deterministic step of inference does, along a
    whole chain from the mini-epoch's first initial noise."""
    name = "zero-noise limit = deterministic sampler"
    key = noise_key(trainer.cfg.sampler.name)
    zero_cfg = trainer.cfg.sampler.copy()
    zero_cfg[key] = 0.0
    zero = build_sampler(zero_cfg, trainer.model)
    model = trainer.model
    x = torch.randn((1, *model.latent_shape()), generator=torch.Generator().manual_seed(0)).to(trainer.device)
    cond, worst = model.encode([mini.samples.prompts[0] if mini.samples else ""]), 0.0
    with torch.no_grad(), trainer.accelerator.autocast():
        for i in range(zero.num_steps):
            steps = torch.full((1,), i, dtype=torch.long, device=trainer.device)
            output = model.predict(trainer.denoiser, x, zero.model_time(steps), cond, model.negative,
                                   trainer.cfg.sampler.guidance_scale)
            mean, _ = zero.step_distribution(output, x, steps)
            x_next = zero.step(output, x, steps)
            worst = max(worst, float((mean - x_next).abs().max()))
            x = x_next
    return Check(name, f"max |mean - step| {worst:.2e} over {zero.num_steps} steps ({key}=0)",
                 f"< {ZERO_NOISE_TOLERANCE:g}", bool(worst < ZERO_NOISE_TOLERANCE))


def kl_to_base_check(trainer, mini: MiniEpoch) -> Check:
    """KL(policy || base) is 0 before training, and after a small change of the trained weights it is positive and
    has a gradient reaching them (the base model: the run's reference, :mod:`ddpo_cli.reference`)."""
    name = "KL to base: 0 at init, gradient after a change"
    if trainer.reference is None:
        return Check(name, "this full fine-tuning run keeps no copy of the base model (nothing reads it)", "-", None)
    if mini.samples is None:
        return Check(name, NO_STORED_STEPS, "-", None)
    if is_deterministic(trainer.sampler):
        return Check(name, "a deterministic sampler has no step distribution", "-", None)
    traj, prompts = mini.samples.trajectory, mini.samples.prompts
    args = (trainer.model, trainer.sampler, trainer.unwrapped, trainer.reference, traj, prompts,
            trainer.training_guidance)
    with torch.no_grad(), trainer.accelerator.autocast():
        at_init = float(kl_to_base(*args))
    params = [p for p in trainer.params if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(1e-2 * torch.randn(p.shape, generator=generator).to(p.device, p.dtype))
    try:
        with trainer.accelerator.autocast():  # the first chain's first stochastic step, with its gradient
            kl = kl_to_base(*args, max_samples=1, max_steps=1)
        grads = torch.autograd.grad(kl, params, allow_unused=True) if kl.requires_grad else []
        grad_norm = float(sum((g.float() ** 2).sum() for g in grads if g is not None) ** 0.5) if grads else 0.0
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
    after = float(kl.detach())
    ok = at_init <= KL_AT_INIT and after > 0 and grad_norm > 0
    return Check(name, f"at init {at_init:.1e}; after a change {after:.2e}, gradient norm {grad_norm:.2e}",
                 f"<= {KL_AT_INIT:g} at init; > 0 after", ok)


def reward_contract(trainer, mini: MiniEpoch) -> Check:
    """What the reward is given and returns: images in the range it declares it expects ([0, 1]), one finite float
    per image, within its declared output range, a gradient to the images when the algorithm backpropagates it."""
    name = "reward contract"
    reward = trainer.reward_fn
    generator = torch.Generator().manual_seed(0)
    n = trainer.cfg.sampler.batch_size
    prompts, metadata = trainer.prompt_set.draw(n, random.Random(0))
    if mini.samples is not None:
        images = trainer.model.decode(mini.samples.trajectory.final[:n]).detach()
        prompts = mini.samples.prompts[:n]
        metadata = [dict(m) for m in mini.samples.metadata[:n]]
    else:
        images = torch.rand((n, 3, trainer.model.resolution, trainer.model.resolution), generator=generator)
    images = images.float().to(reward.device)
    problems = []
    low, high = float(images.min()), float(images.max())
    if tuple(reward.input_range) != (0.0, 1.0):
        problems.append(f"it expects images in {list(reward.input_range)} and is given [0, 1]")
    if low < 0 or high > 1:
        problems.append(f"the images it is given span [{low:.3g}, {high:.3g}], not [0, 1]")
    differentiable = trainer.algo.rollout == "backprop"
    images.requires_grad_(differentiable)
    start = time.perf_counter()
    rewards, _ = reward(images, prompts, metadata)
    per_image = (time.perf_counter() - start) / n
    if not torch.is_tensor(rewards) or rewards.shape != (n,) or not rewards.is_floating_point():
        problems.append(f"it returns {getattr(rewards, 'shape', type(rewards))} "
                        f"{getattr(rewards, 'dtype', '')}, not one float per image [{n}]")
    elif not bool(torch.isfinite(rewards).all()):
        problems.append(f"{int((~torch.isfinite(rewards)).sum())} of {n} rewards are NaN/inf")
    else:
        lo, hi = reward.output_range
        low_r, high_r = float(rewards.detach().min()), float(rewards.detach().max())
        if (lo is not None and low_r < lo) or (hi is not None and high_r > hi):
            problems.append(f"rewards [{low_r:.3g}, {high_r:.3g}] leave its declared "
                            f"range {list(reward.output_range)}")
        if differentiable:
            grad = torch.autograd.grad(rewards.sum(), images, allow_unused=True)[0] if rewards.requires_grad else None
            if grad is None or not bool(grad.abs().sum() > 0):
                problems.append("its rewards carry no gradient to the images, which this algorithm backpropagates")
    values = rewards.detach() if torch.is_tensor(rewards) else None
    measured = "; ".join(problems) if problems else \
        f"[{n}] finite floats in {[round(float(values.min()), 4), round(float(values.max()), 4)]}, images " \
        f"[{low:.2f}, {high:.2f}], {per_image * 1000:.1f} ms / image"
    return Check(name, measured, "as declared", not problems)


def paired_measure_check(trainer) -> Check:
    """The paired measure draws base and policy with the same fixed sampler and per-image noise: before any update
    the policy's images are the base model's, to the bit (LoRA starts at zero; full fine-tuning draws twice)."""
    name = "paired measure: base = policy at init"
    cfg = trainer.cfg
    sampler = build_sampler(fixed_sampler_config(cfg.sampler), trainer.model)
    probe = plan_probe("doctor", trainer.prompt_set, 2, cfg.seed)

    def draw(base: bool) -> torch.Tensor:
        context = adapters_disabled(trainer.unwrapped) if base and cfg.model.use_lora else nullcontext()
        with torch.no_grad(), context, trainer.accelerator.autocast():
            return probe_images(trainer.model, sampler, trainer.unwrapped, probe, cfg.sampler.guidance_scale, 2,
                                trainer.device).float()

    difference = float((draw(base=True) - draw(base=False)).abs().max())
    return Check(name, f"max |base - policy| {difference:.1e} over {len(probe)} images", "0", difference == 0.0)


def loss_backward(trainer, samples, targets: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
    """The algorithm's loss on the pairs ``(rows, cols)`` in the run's precision, and its backward pass."""
    with trainer.accelerator.autocast():
        loss, _ = trainer.algo.loss(**trainer.pair_tensors(samples, targets, rows, cols))
    loss.backward()


def only_trainable_get_gradients(trainer, mini: MiniEpoch, pairs) -> Check:
    """A backward pass of the algorithm's loss gives gradients to the optimizer's parameters and to nothing else in
    the pipeline (a gradient outside the optimizer is memory spent on weights that never train)."""
    name = "gradients reach only trainable parameters"
    if pairs is None:
        return Check(name, NO_STORED_STEPS, "-", None)
    rows, cols = pairs
    samples = mini.samples
    targets = made_up_targets(trainer, len(samples.prompts))
    trainer.optimizer.zero_grad(set_to_none=True)
    loss_backward(trainer, samples, targets, rows, cols)
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    named = [(f"{i}.{n}", p) for i, module in enumerate(trainer.model.modules()) for n, p in module.named_parameters()]
    outside = [n for n, p in named if p.grad is not None and id(p) not in in_optimizer]
    reached = sum(1 for p in trainer.params if p.grad is not None and bool(p.grad.abs().sum() > 0))
    for _, p in named:
        p.grad = None
    ok = not outside and reached > 0
    measured = f"{reached} of {len(trainer.params)} trained tensors have a gradient; outside the optimizer: " \
               f"{len(outside)}" + (f" ({outside[0]}, ...)" if outside else "")
    return Check(name, measured, "> 0 trained, 0 outside", ok)


def seconds_per_epoch(trainer, mini: MiniEpoch, pairs) -> str:
    """The mini-epoch's sampling time x batches per epoch, plus one update's time x updates per epoch."""
    counts = trainer.counts
    if pairs is None:
        return f"{mini.sample_seconds * trainer.cfg.sampler.num_batches_per_epoch:.1f} s of sampling per process" \
            if mini.samples is not None else "not estimated for reward backprop"
    sample = mini.sample_seconds * trainer.cfg.sampler.num_batches_per_epoch
    rows, cols = pairs
    start = time.perf_counter()
    loss_backward(trainer, mini.samples, made_up_targets(trainer, len(mini.samples.prompts)), rows, cols)
    per_pair = (time.perf_counter() - start) / rows.numel()
    trainer.optimizer.zero_grad(set_to_none=True)
    update = per_pair * counts.pairs_per_update * counts.updates_per_epoch * trainer.cfg.train.num_inner_epochs
    return f"{sample + update:.1f} s (sampling {sample:.1f} s, updates {update:.1f} s) per process"


def save_resume_round_trip(trainer) -> Check:
    """A checkpoint written and read back gives the weights bit for bit (in the family's diffusers format)."""
    name = "save -> resume gives the same weights"
    params = [p for p in trainer.params if p.requires_grad]
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in params:  # weights that are not the initial ones (LoRA's up-projections start at zero)
            p.add_(1e-3 * torch.randn(p.shape, generator=generator).to(p.device, p.dtype))
    before = [p.detach().clone() for p in params]
    saved = trainer.save_checkpoint(0)
    with torch.no_grad():
        for p in params:
            p.mul_(0.5)
    checkpoint.load_weights(trainer.model, trainer.unwrapped, saved, trainer.cfg.model.use_lora)
    worst = max(float((p.detach() - b).abs().max()) for p, b in zip(params, before))
    return Check(name, f"max |saved - loaded| {worst:.1e} ({len(params)} tensors)", "0", worst == 0.0)
