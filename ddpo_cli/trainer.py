"""The training loop. Reads like the DDPO algorithm box: sample -> reward -> advantages -> update -> log/save.

What differs between algorithms is declared by the algorithm (``rollout``, ``targets``, ``needs``: see
:mod:`ddpo_cli.algorithms.base`); what differs between model families and samplers lives behind their seams
(:mod:`ddpo_cli.models`, :mod:`ddpo_cli.samplers`). Randomness is a pure function of (seed, epoch, process, purpose):
every epoch re-seeds its generators, so a resumed run draws exactly what the uninterrupted run would have drawn.
"""
from __future__ import annotations

import json
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import gather_object
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape

from . import checkpoint, report
from .advantages import PerPromptStatTracker, compute_advantages
from .config import RunPlan, plan_run
from .guards import check_gradient, check_rewards, check_weights
from .errors import UserError
from .models import adapters_disabled, load_model, resolve_model_path
from .probe import (Probe, describe_sampler, fixed_sampler_config, paired_gain, plan_probe, probe_images,
                    probe_scores)
from .prompts.run_files import HELDOUT_PROMPTS_FILE, PROMPTS_FILE, prepare_run_sets
from .runs import lock_run, supersede_after
from .rollout import (EpochSamples, Trajectory, branched_noise, denoising_errors, generator_noise, kl_to_base,
                      mirrored_noise, output_drift, policy_step, run_chain)
from .runtime import (WEIGHT_DTYPES, derive_seed, epoch_randomness, pick_device, precision_rows, quiet_libraries,
                      resolve_precision, set_tf32, set_threads)
from .samplers import build_sampler
from .schedules import learning_rate

console = Console(stderr=True, soft_wrap=True)  # long lines (paths) stay greppable
POLICY_TENSORS = {"log_prob", "mean", "std", "output", "clean_estimate"}
BASE_TENSORS = {"base_mean", "base_output"}


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, plan: RunPlan | None = None) -> None:
        self.cfg, self.run_dir, self.plan = cfg, Path(run_dir), plan

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Plan (validate once), then the accelerator, the model and sampler, the optimizer; resume."""
        cfg = self.cfg
        plan = self.plan = self.plan or plan_run(cfg)
        set_threads(cfg.threads)
        quiet_libraries()
        resolve_model_path(cfg.model)  # a tiny model is built and saved before any process group exists
        device = pick_device(cfg.device)  # accelerate picks the GPU of each process
        self.precision = resolve_precision(cfg.precision, device)
        self.accelerator = Accelerator(mixed_precision=self.precision, cpu=device.type == "cpu",
                                       project_dir=str(self.run_dir),
                                       log_with=None if cfg.log.tracker == "none" else cfg.log.tracker)
        self.device = self.accelerator.device
        if self.accelerator.is_main_process:
            lock_run(self.run_dir)  # one writer per run folder
        set_tf32(self.device, cfg.model.allow_tf32)
        self.counts = plan.counts.for_processes(self.accelerator.num_processes)
        self.algo, self.prompt_set, self.reward_fn = plan.algorithm, plan.prompts, plan.reward
        prepare_run_sets([(plan.prompts, PROMPTS_FILE), (plan.heldout, HELDOUT_PROMPTS_FILE)], self.run_dir,
                         self.device, self.accelerator.is_main_process, self.accelerator.wait_for_everyone,
                         resuming=plan.resume is not None)
        self.reward_fn.setup(self.device, torch.float32)
        self.model = load_model(cfg.model, self.device, WEIGHT_DTYPES[self.precision], lora_seed=cfg.seed)
        self.sampler = build_sampler(cfg.sampler, self.model)
        self.params = self.model.trainable_parameters()
        t = cfg.train
        optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                      weight_decay=t.weight_decay, eps=t.adam_epsilon)
        self.denoiser, self.optimizer = self.accelerator.prepare(self.model.denoiser, optimizer)
        self.tracker = PerPromptStatTracker(cfg.advantage.buffer_size, cfg.advantage.min_count)
        # The reward thread gets its own small torch thread team: a second full-size OpenMP team (created the first
        # time that thread runs a torch op) slows every later op of the main thread ~1.7x on a 2-core CPU.
        self.executor = ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads,
                                           initargs=(cfg.log.reward_worker_threads,))
        self.start_epoch, self.global_step, superseded = 0, 0, None
        if plan.resume:
            superseded = self._resume(Path(cfg.resume).expanduser())
        if self.accelerator.is_main_process:
            (self.run_dir / "images").mkdir(parents=True, exist_ok=True)
            report.truncate_metrics(self.run_dir, self.start_epoch, superseded)
        if cfg.log.tracker != "none":
            self.accelerator.init_trackers(cfg.log.project, config=report.flat_config(cfg))
        if self.accelerator.is_main_process:
            console.print(report.startup_table("ddpo train", self.startup_rows()))
            for warning in plan.warnings:
                console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
        self.probes, self.probe_base = self.setup_paired(plan)

    def setup_paired(self, plan: RunPlan) -> tuple[list[Probe], dict]:
        """The probes of ``log.paired`` (main process only) and the base model's scores on them: with LoRA the
        adapter switched off; with full fine-tuning the weights at the start of a fresh run."""
        paired = self.cfg.log.paired
        if not paired.every or not self.accelerator.is_main_process:
            return [], {}
        if not self.cfg.model.use_lora and self.start_epoch > 0:
            console.print("[yellow]warning:[/] log.paired is off for this resumed full fine-tuning run: the base "
                          "weights are gone (LoRA runs keep them)", highlight=False)
            return [], {}
        self.probe_sampler = build_sampler(fixed_sampler_config(self.cfg.sampler), self.model)
        sets = [("trained", self.prompt_set)] + ([("held-out", plan.heldout)] if plan.heldout is not None else [])
        probes = [plan_probe(name, prompt_set, paired.images, self.cfg.seed) for name, prompt_set in sets]
        denoiser = self.accelerator.unwrap_model(self.denoiser)
        with adapters_disabled(denoiser) if self.cfg.model.use_lora else nullcontext():
            base = {probe.name: self.probe_scores(probe) for probe in probes}
        keys = sorted(next(iter(base.values())))
        if paired.metric not in keys:
            raise UserError(f"log.paired.metric={paired.metric!r}: reward {self.reward_fn.name} reports "
                            f"{', '.join(keys)}; choose one of them")
        return probes, base

    def probe_scores(self, probe: Probe) -> dict[str, np.ndarray]:
        """The current weights' per-image scores on ``probe`` (a fixed sampler, fixed per-image noise)."""
        denoiser = self.accelerator.unwrap_model(self.denoiser)
        was_training = denoiser.training
        denoiser.eval()
        with self.accelerator.autocast():
            images = probe_images(self.model, self.probe_sampler, denoiser, probe, self.cfg.sampler.guidance_scale,
                                  self.cfg.sampler.batch_size, self.device)
        denoiser.train(was_training)
        return probe_scores(self.reward_fn, images, probe, self.cfg.sampler.batch_size)

    def paired_row(self, epoch: int) -> dict:
        """``{"paired": {set: {key: base, policy, gain, gain_se}}, "paired_seconds"}`` on the epochs of
        ``log.paired.every`` and the last epoch; empty otherwise."""
        every, last = self.cfg.log.paired.every, epoch == self.cfg.train.num_epochs - 1
        if not self.probes or not (last or (epoch + 1) % every == 0):
            return {}
        start = time.perf_counter()
        paired = {p.name: paired_gain(self.probe_scores(p), self.probe_base[p.name]) for p in self.probes}
        return {"paired": paired, "paired_seconds": time.perf_counter() - start}

    def startup_rows(self) -> list[tuple[str, str]]:
        cfg, model = self.cfg, self.model
        lora = f"LoRA r={cfg.model.lora.rank}" if cfg.model.use_lora else "full fine-tuning"
        return [("run dir", str(self.run_dir)), ("model", f"{cfg.model.name} (family {model.family}, {lora})"),
                ("algorithm / reward", f"{self.algo.name} / {self.reward_fn.name}"),
                ("prompts", f"{getattr(self.prompt_set, 'name', '?')} ({len(self.prompt_set)})"),
                ("sampler", f"{self.sampler.name}, {self.sampler.num_steps} steps, guidance "
                            f"{cfg.sampler.guidance_scale}"),
                *precision_rows(self.precision, self.device), ("image size", f"{model.resolution} px"),
                ("trainable parameters", f"{sum(p.numel() for p in self.params):,}"),
                *self.counts.as_rows(), ("epochs", f"{self.start_epoch} -> {cfg.train.num_epochs}")]

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> None:
        cfg = self.cfg
        with report.epoch_progress(console, self.accelerator.is_main_process) as progress:
            task = progress.add_task("training", total=cfg.train.num_epochs, completed=self.start_epoch)
            for epoch in range(self.start_epoch, cfg.train.num_epochs):
                row, samples = self.run_epoch(epoch)
                row.update(self.paired_row(epoch))
                self.log_epoch(epoch, row, samples)
                if epoch == cfg.train.num_epochs - 1 or (epoch + 1) % cfg.checkpoint.every == 0:
                    self.save_checkpoint(epoch)
                progress.update(task, advance=1, description=f"reward {row['reward_mean']:.4g}")
        if self.accelerator.is_main_process:
            console.print(report.run_summary(self.run_dir, self.cfg.log.paired.metric, self.cfg.log.paired.heldout,
                                             describe_sampler(self.cfg.sampler)), highlight=False)

    def run_epoch(self, epoch: int) -> tuple[dict, EpochSamples]:
        """One epoch of the chosen algorithm; returns the metrics row for metrics.jsonl and the samples."""
        start = time.perf_counter()
        torch.manual_seed(derive_seed(self.cfg.seed, epoch, self.accelerator.process_index, "torch"))
        self.sampler.set_epoch(epoch)  # a sliding SDE window moves
        if self.algo.rollout == "backprop":
            samples, metrics, timings = self.backprop_epoch(epoch)
        else:
            samples, timings = self.sample_epoch(epoch)
        all_rewards = self.gather_rewards(samples)
        check_rewards(all_rewards, self.gather_prompts(samples), self.reward_fn.name, epoch,
                      self.cfg.train.nonfinite_rewards)
        if self.algo.rollout != "backprop":
            metrics = {}
            train_start = time.perf_counter()
            if self.algo.rollout == "sample":
                metrics = self.update_epoch(epoch, samples, self.training_targets(samples, all_rewards, epoch))
            timings["train_seconds"] = time.perf_counter() - train_start
            every = self.cfg.log.kl_to_base_every
            if every and epoch % every == 0:
                metrics["kl_to_base"] = self.kl_to_base(samples)
        finite = all_rewards[np.isfinite(all_rewards)]  # all of them unless train.nonfinite_rewards=drop
        row = {"epoch": epoch, "global_step": self.global_step, "lr": self.optimizer.param_groups[0]["lr"],
               "reward_mean": float(finite.mean()),
               "reward_std": float(finite.std()), **metrics, "samples": int(all_rewards.size),
               "nonfinite_rewards": int(all_rewards.size - finite.size), "epoch_seconds": time.perf_counter() - start,
               **timings, **{f"reward_info/{k}": v for k, v in report.numeric_means(samples.info).items()}}
        return row, samples

    # ------------------------------------------------------------------------------------------------ sample
    def sample_epoch(self, epoch: int) -> tuple[EpochSamples, dict]:
        """``num_batches_per_epoch`` batches; rewards run in a worker thread while the next batch samples."""
        cfg = self.cfg
        rng, generator = epoch_randomness(cfg.seed, epoch, self.accelerator.process_index, self.device)
        self.denoiser.eval()
        trajectories, prompts, metadata, futures, images_kept = [], [], [], [], []
        start = time.perf_counter()
        for _ in range(cfg.sampler.num_batches_per_epoch):
            batch_prompts, batch_meta = self.prompt_set.draw(cfg.sampler.batch_size, rng, cfg.sampler.group_size)
            trajectory, images = self.sample_batch(batch_prompts, generator)
            futures.append(self.submit_reward(images, batch_prompts, batch_meta))
            trajectories.append(trajectory)
            prompts += batch_prompts
            metadata += batch_meta
            if sum(len(i) for i in images_kept) < cfg.log.grid_images:
                images_kept.append(images.cpu())
        sample_seconds = time.perf_counter() - start
        wait_start = time.perf_counter()
        results = [f.result() if isinstance(f, Future) else f for f in futures]
        reward_seconds = time.perf_counter() - wait_start
        rewards, info = torch.cat([r for r, _ in results]).to(self.device), report.merge_info([i for _, i in results])
        samples = EpochSamples(Trajectory.cat(trajectories), prompts, metadata, rewards,
                               torch.cat(images_kept)[: cfg.log.grid_images], info)
        return samples, {"sample_seconds": sample_seconds, "reward_seconds": reward_seconds}

    @torch.no_grad()
    def sample_batch(self, prompts: list[str], generator: torch.Generator) -> tuple[Trajectory, torch.Tensor]:
        """Chains with log-probs from the current policy, one initial noise per group, and their images. With
        ``sampler.branch`` each group also shares its step noise except at one trained step (its branch step); with
        ``sampler.antithetic`` images come in mirrored pairs (the trained steps' noise negated, the rest shared)."""
        group, shape = self.cfg.sampler.group_size, self.model.latent_shape()
        noise = torch.randn((len(prompts) // group, *shape), generator=generator, device=self.device)
        noise = noise.repeat_interleave(group, dim=0)  # [B, C, h, w]
        branch = self.branch_steps(len(prompts) // group, generator) if self.cfg.sampler.branch else None
        if branch is not None:
            step_noise = branched_noise(noise.shape, group, branch, generator, self.device)
        elif self.cfg.sampler.antithetic:
            step_noise = mirrored_noise(noise.shape, self.trainable_steps(), generator, self.device)
        else:
            step_noise = generator_noise(noise.shape, generator, self.device)
        with self.accelerator.autocast():
            _, trajectory = run_chain(self.model, self.sampler, self.accelerator.unwrap_model(self.denoiser), noise,
                                      self.model.encode(prompts), self.cfg.sampler.guidance_scale, step_noise,
                                      record=True, record_outputs="old_clean_estimate" in self.algo.needs)
        trajectory.branch = branch
        return trajectory, self.model.decode(trajectory.final)

    def trainable_steps(self) -> torch.Tensor:
        """The stochastic steps of the training window this epoch (an SDE window may slide)."""
        first, end = self.counts.window
        return torch.tensor([i for i in range(first, end) if self.sampler.is_stochastic(i)])

    def branch_steps(self, groups: int, generator: torch.Generator) -> torch.Tensor:
        """``[B]`` each image's branch step: the trainable steps in turn over the groups from a random start."""
        trainable = self.trainable_steps()
        start = int(torch.randint(len(trainable), (1,), generator=generator, device=generator.device))
        per_group = trainable[(start + torch.arange(groups)) % len(trainable)]
        return per_group.repeat_interleave(self.cfg.sampler.group_size).to(self.device)

    def submit_reward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]):
        if self.cfg.log.async_reward:
            return self.executor.submit(self.reward_fn, images, prompts, metadata)
        return self.reward_fn(images, prompts, metadata)

    def gather_rewards(self, samples: EpochSamples) -> np.ndarray:
        """Rewards of every process, in rank order ``[N]``."""
        return self.accelerator.gather(samples.rewards.detach().float()).cpu().numpy()

    def gather_prompts(self, samples: EpochSamples) -> list[str]:
        """Prompts of every process, in rank order (as :meth:`gather_rewards`)."""
        return gather_object(samples.prompts) if self.accelerator.num_processes > 1 else samples.prompts

    def training_targets(self, samples: EpochSamples, all_rewards: np.ndarray, epoch: int) -> torch.Tensor:
        """This rank's per-sample targets from everyone's rewards: the algorithm's weights, or advantages (permuted
        across the batch in a control run, ``advantage.shuffle``)."""
        if self.algo.targets == "weights":
            targets = self.algo.weights(all_rewards)
        else:
            targets = compute_advantages(self.cfg.advantage.mode, all_rewards, self.gather_prompts(samples),
                                         self.tracker, self.cfg.sampler.group_size, self.cfg.sampler.antithetic)
        if self.cfg.advantage.shuffle:
            control = np.random.default_rng(derive_seed(self.cfg.seed, epoch, "control"))
            targets = targets[control.permutation(targets.size)]
        n, rank = len(samples.prompts), self.accelerator.process_index
        return torch.as_tensor(targets[rank * n:(rank + 1) * n], dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------------------------------------ update
    def update_epoch(self, epoch: int, samples: EpochSamples, targets: torch.Tensor) -> dict:
        """``num_inner_epochs`` passes over this rank's samples in optimizer steps of batch_size x accumulation;
        each sample trains an independent random subset of the steps of the window."""
        cfg = self.cfg
        n_samples = len(samples.prompts)
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, self.accelerator.process_index,
                                                              "shuffle"))
        totals: dict[str, float] = {}
        updates = 0
        trainable = self.trainable_steps()
        per_update = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
        self.denoiser.train()
        for _ in range(cfg.train.num_inner_epochs):
            order = torch.randperm(n_samples, generator=generator)
            if samples.trajectory.branch is not None:   # trajectory branching trains each image's branch step
                steps = samples.trajectory.branch.cpu()[:, None]
            else:
                steps = torch.stack([trainable[torch.randperm(len(trainable), generator=generator)]
                                     for _ in range(n_samples)])[:, : self.counts.train_timesteps]   # [B, T_train]
            for first in range(0, n_samples, per_update):
                sample_ids = order[first:first + per_update]
                for key, value in self.update(samples, targets, sample_ids, steps[sample_ids]).items():
                    totals[key] = totals.get(key, 0.0) + value
                updates += 1
        return {key: value / max(updates, 1) for key, value in totals.items()}

    def update(self, samples: EpochSamples, targets: torch.Tensor, sample_ids: torch.Tensor,
               steps: torch.Tensor) -> dict:
        """One optimizer step over all (sample, step) pairs of ``sample_ids`` x ``steps`` [S, T_train].

        Pairs go through the denoiser in chunks of ``train.batch_size x train.timesteps_per_forward``; each chunk's
        mean loss is weighted by its share of pairs, so every pair counts equally (exact gradient accumulation).
        """
        rows = sample_ids.repeat_interleave(steps.shape[1])          # [P] sample index of each pair
        cols = steps.reshape(-1)                                     # [P] trajectory column of each pair
        n_pairs = rows.numel()
        chunk = self.cfg.train.batch_size * self.cfg.train.timesteps_per_forward
        sums: dict[str, float] = {}
        if self.plan.preserve:
            with self.accelerator.no_sync(self.denoiser), self.accelerator.autocast():
                drift = self.preservation_drift(samples, rows, cols)
                self.accelerator.backward(self.cfg.train.preserve.weight * drift)
            sums["preserve_drift"] = float(drift.detach())
        for first in range(0, n_pairs, chunk):
            r, c = rows[first:first + chunk], cols[first:first + chunk]
            sync = nullcontext() if first + chunk >= n_pairs else self.accelerator.no_sync(self.denoiser)
            with sync, self.accelerator.autocast():
                loss, metrics = self.pair_loss(samples, targets, r, c)
                self.accelerator.backward(loss * (r.numel() / n_pairs))
            for key, value in {"loss": loss.detach(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * r.numel() / n_pairs
        sums["grad_norm"] = self.optimizer_step()
        return self.mean_over_processes(sums)

    def preservation_drift(self, samples: EpochSamples, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Mean output drift from the base model (``train.preserve``) at ``pairs`` of this update's stored states,
        each under a prompt drawn from the preserved set (a generator seeded by the optimizer step: exact resume)."""
        p, traj = self.cfg.train.preserve, samples.trajectory
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.global_step,
                                                              self.accelerator.process_index, "preserve"))
        picked = torch.randint(rows.numel(), (p.pairs,), generator=generator)
        prompts = [self.plan.preserve[i] for i in torch.randint(len(self.plan.preserve), (p.pairs,),
                                                                 generator=generator).tolist()]
        r, c = rows[picked], cols[picked]
        return output_drift(self.model, self.sampler, self.denoiser, traj.latents[r, c], traj.steps[r, c],
                            self.model.encode(prompts), self.cfg.sampler.guidance_scale).mean()

    def pair_loss(self, samples: EpochSamples, targets: torch.Tensor, rows: torch.Tensor,
                  cols: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The algorithm's loss and metrics on the (sample, step) pairs (rows, cols)."""
        return self.algo.loss(**self.pair_tensors(samples, targets, rows, cols))

    def pair_tensors(self, samples: EpochSamples, targets: torch.Tensor, rows: torch.Tensor,
                     cols: torch.Tensor) -> dict[str, torch.Tensor]:
        """Exactly the per-pair tensors the algorithm's loss declares (``algo.needs``) plus its targets."""
        needs, traj = set(self.algo.needs), samples.trajectory
        cond = self.model.encode([samples.prompts[i] for i in rows.tolist()])       # [P] rows
        out = {self.algo.targets: targets[rows]}
        if "old_log_prob" in needs:
            out["old_log_prob"] = traj.log_probs[rows, cols]
        if needs & POLICY_TENSORS:
            out.update(self.policy_step(self.denoiser, traj, cond, rows, cols))
        if needs & BASE_TENSORS:
            base_denoiser = self.accelerator.unwrap_model(self.denoiser)
            with torch.no_grad(), adapters_disabled(base_denoiser):
                base = self.policy_step(base_denoiser, traj, cond, rows, cols)
            out.update(base_mean=base["mean"], base_output=base["output"])
        if "old_clean_estimate" in needs:
            out["old_clean_estimate"] = self.sampler.clean_estimate(traj.outputs[rows, cols], traj.latents[rows, cols],
                                                                    traj.steps[rows, cols])
        if "clean_latents" in needs:
            out["clean_latents"] = traj.final[rows].float()
        if "errors" in needs:
            out["errors"] = denoising_errors(self.model, self.sampler, self.denoiser, traj.final[rows], cond)
        return {key: out[key] for key in (*self.algo.needs, self.algo.targets)}

    def policy_step(self, denoiser, traj: Trajectory, cond, rows: torch.Tensor, cols: torch.Tensor) -> dict:
        guidance = self.cfg.sampler.guidance_scale if self.cfg.train.guidance_in_training else 1.0
        return policy_step(self.model, self.sampler, denoiser, traj.latents[rows, cols], traj.next_latents[rows, cols],
                           traj.steps[rows, cols], cond, guidance)

    def optimizer_step(self) -> float:
        grad_norm = self.accelerator.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
        check_gradient(grad_norm, self.global_step)
        t = self.cfg.train
        lr = learning_rate(t.lr, t.lr_schedule, self.global_step, self.counts.updates_per_epoch * t.num_epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return float(grad_norm)

    def mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        keys = list(values)
        reduced = self.accelerator.reduce(torch.tensor([values[k] for k in keys], device=self.device), "mean")
        return dict(zip(keys, reduced.tolist()))

    def kl_to_base(self, samples: EpochSamples) -> float | None:
        """Mean KL(policy step || base step) on a few stored pairs: an over-optimisation signal (None for full
        fine-tuning: there is no base model without a second copy)."""
        if not self.cfg.model.use_lora:
            return None
        guidance = self.cfg.sampler.guidance_scale if self.cfg.train.guidance_in_training else 1.0
        with self.accelerator.autocast():
            kl = kl_to_base(self.model, self.sampler, self.accelerator.unwrap_model(self.denoiser),
                            samples.trajectory, samples.prompts, guidance)
        return float(self.accelerator.reduce(kl, "mean"))

    def backprop_epoch(self, epoch: int) -> tuple[EpochSamples, dict, dict]:
        """Reward backprop (AlignProp / DRaFT): generate with the graph kept, loss = f(reward), backward, step."""
        cfg = self.cfg
        rng, generator = epoch_randomness(cfg.seed, epoch, self.accelerator.process_index, self.device)
        truncation_rng = random.Random(derive_seed(cfg.seed, epoch, self.accelerator.process_index, "truncation"))
        accumulation = cfg.train.gradient_accumulation_steps
        n_micro = self.counts.samples_per_process // cfg.train.batch_size
        self.denoiser.train()
        rewards, prompts, metadata, images_kept, infos, totals = [], [], [], [], [], {}
        start = time.perf_counter()
        for micro in range(n_micro):
            batch_prompts, batch_meta = self.prompt_set.draw(cfg.train.batch_size, rng)
            keep = self.algo.steps_with_gradient(self.sampler.num_steps, truncation_rng)
            noise = torch.randn((len(batch_prompts), *self.model.latent_shape()), generator=generator,
                                device=self.device)
            boundary = (micro + 1) % accumulation == 0
            with (nullcontext() if boundary else self.accelerator.no_sync(self.denoiser)), self.accelerator.autocast():
                final, _ = run_chain(self.model, self.sampler, self.denoiser, noise, self.model.encode(batch_prompts),
                                     cfg.sampler.guidance_scale, generator_noise(noise.shape, generator, self.device),
                                     keep_grad=keep, checkpoint_denoiser=self.algo.checkpoint_unet)
                images = self.model.decode(final)
                batch_rewards, batch_info = self.reward_fn(images, batch_prompts, batch_meta)
                finite = check_rewards(batch_rewards.detach().cpu().numpy(), batch_prompts, self.reward_fn.name, epoch,
                                       cfg.train.nonfinite_rewards, whole_epoch=False)
                loss, _ = self.algo.loss(rewards=batch_rewards[torch.from_numpy(finite).to(batch_rewards.device)])
                if finite.any():  # train.nonfinite_rewards=drop: the other images take no part
                    self.accelerator.backward(loss / accumulation)
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) / n_micro
            totals["kept_steps"] = totals.get("kept_steps", 0.0) + sum(keep) / n_micro
            if boundary:
                totals["grad_norm"] = totals.get("grad_norm", 0.0) + self.optimizer_step() * accumulation / n_micro
            rewards.append(batch_rewards.detach())
            prompts += batch_prompts
            metadata += batch_meta
            infos.append(batch_info)
            if sum(len(i) for i in images_kept) < cfg.log.grid_images:
                images_kept.append(images.detach().cpu())
        samples = EpochSamples(None, prompts, metadata, torch.cat(rewards),
                               torch.cat(images_kept)[: cfg.log.grid_images], report.merge_info(infos))
        timings = {"sample_seconds": 0.0, "reward_seconds": 0.0, "train_seconds": time.perf_counter() - start}
        return samples, self.mean_over_processes(totals), timings

    # ------------------------------------------------------------------------------------------------ outputs
    def log_epoch(self, epoch: int, row: dict, samples: EpochSamples) -> None:
        if self.cfg.log.tracker != "none":
            self.accelerator.log(report.tracker_values(row), step=epoch)
        if not self.accelerator.is_main_process:
            return
        report.append_metrics(self.run_dir, row)
        if epoch % self.cfg.log.image_every == 0 or epoch == self.cfg.train.num_epochs - 1:
            report.plot_reward_curve(self.run_dir, metric=self.cfg.log.paired.metric)
            report.epoch_grid(samples.images, samples.prompts, samples.rewards.tolist()).save(
                self.run_dir / "images" / f"epoch_{epoch:04d}.png")
        console.print(report.epoch_line(row, self.cfg.log.paired.metric), highlight=False)

    def save_checkpoint(self, epoch: int) -> Path:
        check_weights(self.params, epoch)
        state = {"global_step": self.global_step, "stat_tracker": self.tracker.state_dict(),
                 "seed": self.cfg.seed, "config": json.dumps(OmegaConf.to_container(self.cfg, resolve=True))}
        return checkpoint.save(self.accelerator, self.model, self.denoiser, self.optimizer, state, self.run_dir,
                               epoch, self.cfg.model.use_lora, self.cfg.checkpoint.keep_last)

    def _resume(self, requested: Path) -> Path | None:
        """Load the newest readable checkpoint of ``requested``; returns where later checkpoints of the run were
        moved, if any (resuming from an older one keeps what came after it in ``superseded/``)."""
        path, state, skipped = checkpoint.resume(self.model, self.accelerator.unwrap_model(self.denoiser),
                                                 self.optimizer, requested, self.cfg.model.use_lora)
        for line in skipped if self.accelerator.is_main_process else []:
            console.print(f"[yellow]skipped an unreadable checkpoint: {escape(line)}[/]", highlight=False)
        self.tracker.load_state_dict(state["stat_tracker"])
        self.global_step = int(state["global_step"])
        self.start_epoch = int(state["epoch"]) + 1
        superseded = supersede_after(self.run_dir, int(state["epoch"])) if self.accelerator.is_main_process else None
        if self.accelerator.is_main_process:
            console.print(f"[green]resumed from {path}: epoch {self.start_epoch}, global step {self.global_step}[/]")
            if superseded:
                console.print(f"[yellow]later checkpoints and metrics of this run moved to {superseded}[/]")
        return superseded

    def cleanup(self, wait: bool = True) -> None:
        """Release workers and trackers; reset accelerate's global state so the next sweep job starts clean.
        ``wait=False`` (Ctrl-C) drops queued reward calls instead of waiting for them."""
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown(wait=wait, cancel_futures=not wait)
        if getattr(self, "accelerator", None) is not None:
            if self.cfg.log.tracker != "none":
                self.accelerator.end_training()
            AcceleratorState._reset_state(reset_partial_state=False)
            GradientState._reset_state()
