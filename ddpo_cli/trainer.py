"""The training loop, as the algorithm box reads: sample -> reward -> advantages -> update -> log and save.

Algorithms declare what differs (``rollout``, ``targets``, ``needs``: :mod:`ddpo_cli.algorithms.base`); the epoch body
is chosen once from ``rollout``. Models, samplers and noise strategies live behind their seams. Randomness is a pure
function of (seed, epoch, process, purpose), so a resumed run draws what the uninterrupted run would have drawn.
"""
from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate.state import AcceleratorState, GradientState
from omegaconf import DictConfig, OmegaConf

from . import checkpoint, report
from .advantages import PerPromptStatTracker, compute_advantages
from .books import EpochBooks, EpochSamples
from .config import RunPlan, plan_run
from . import distributed
from .distributed import gathered_prompts, is_sharded, make_accelerator, mean_over_processes, micro_step, strategy
from .guards import check_gradient, check_rewards, check_weights
from .models import load_model, resolve_model_path
from .noise import batch_noise, generator_noise
from .old_policy import old_policy_for
from .pairs import OfflinePairs, PairSource, draws_for, needs_recorded_outputs, pair_tensors
from .probe import describe_sampler, start_paired_measure
from .reference import loaded_weights, needs_reference, reference_for
from .prompts.run_files import HELDOUT_PROMPTS_FILE, PROMPTS_FILE, prepare_run_sets
from .report import console, warn
from .rollout import is_deterministic, kl_to_base, preservation_drift, run_chain, trained_steps
from .runs import lock_run, supersede_after
from .runtime import (WEIGHT_DTYPES, derive_seed, epoch_randomness, pick_device, precision_rows, quiet_libraries,
                      resolve_precision, set_tf32, set_threads)
from .samplers import build_sampler
from .watch import Verdict, epoch_verdict, start_watch
from .schedules import learning_rate


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, plan: RunPlan | None = None) -> None:
        self.cfg, self.run_dir, self.plan = cfg, Path(run_dir), plan

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Plan (validate once), then the accelerator, the model and sampler, the optimizer; resume; the paired
        measure's base scores."""
        cfg = self.cfg
        plan = self.plan = self.plan or plan_run(cfg)
        set_threads(cfg.threads)
        quiet_libraries()
        resolve_model_path(cfg.model)  # a tiny model is built and saved before any process group exists
        device = pick_device(cfg.device)  # accelerate picks the GPU of each process
        self.precision = resolve_precision(cfg.precision, device)
        self.accelerator = make_accelerator(self.precision, device.type == "cpu", str(self.run_dir),
                                            None if cfg.log.tracker == "none" else cfg.log.tracker)
        self.device, self.is_main = self.accelerator.device, self.accelerator.is_main_process
        self.sharded = is_sharded(self.accelerator)  # then every process runs every forward pass (the probe's too)
        if self.is_main:
            lock_run(self.run_dir)  # one writer per run folder
        set_tf32(self.device, cfg.model.allow_tf32)
        self.counts = plan.counts.for_processes(self.accelerator.num_processes)
        self.algo, self.prompt_set, self.reward_fn = plan.algorithm, plan.prompts, plan.reward
        prepare_run_sets([(plan.prompts, PROMPTS_FILE), (plan.heldout, HELDOUT_PROMPTS_FILE)], self.run_dir,
                         self.device, self.is_main, self.accelerator.wait_for_everyone,
                         resuming=plan.resume is not None)
        self.reward_fn.setup(self.device, torch.float32)
        self.model = load_model(cfg.model, self.device, WEIGHT_DTYPES[self.precision], lora_seed=cfg.seed)
        self.sampler, self.noise = build_sampler(cfg.sampler, self.model), batch_noise(cfg.sampler)
        self.training_guidance = cfg.sampler.guidance_scale if cfg.train.guidance_in_training else 1.0
        t = cfg.train
        optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                      weight_decay=t.weight_decay, eps=t.adam_epsilon)
        self.start_epoch, self.global_step, superseded, resumed = 0, 0, None, None
        loaded = loaded_weights(self.model, cfg.model.use_lora, needs_reference(self.algo, bool(plan.preserve)),
                                self.sharded, strategy(self.accelerator))  # full fine-tuning's reference, as loaded
        if plan.resume:  # weights into the whole model, before prepare shards it
            resumed = checkpoint.resume(self.model, self.model.denoiser, Path(cfg.resume).expanduser(),
                                        cfg.model.use_lora)
        distributed.configure_deepspeed(self.accelerator, t.batch_size, t.max_grad_norm)
        self.denoiser, self.optimizer = self.accelerator.prepare(self.model.denoiser, optimizer)
        self.unwrapped = self.accelerator.unwrap_model(self.denoiser)
        self.backward = partial(distributed.backward, self.accelerator, self.denoiser)  # the strategy's backward
        self.params = self.model.trainable_parameters()  # FSDP2 replaced them with their shards, ZeRO-3 emptied them
        self.old_policy = old_policy_for(self.algo, self.params, self.sharded, strategy(self.accelerator))
        self.reference = reference_for(self.unwrapped, self.params, cfg.model.use_lora, loaded)
        self.pair_source = PairSource(self.model, self.sampler, self.denoiser, self.unwrapped, self.training_guidance,
                                      self.old_policy, self.reference)
        self.draws = None  # forward-process algorithms: the epoch's noise levels and noise
        self.tracker = PerPromptStatTracker(cfg.advantage.buffer_size, cfg.advantage.min_count)
        # The reward thread gets its own small torch thread team: a second full-size OpenMP team (created the first
        # time that thread runs a torch op) slows every later op of the main thread ~1.7x on a 2-core CPU.
        self.executor = ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads,
                                           initargs=(cfg.log.reward_worker_threads,))
        self.run_epoch = {"backprop": self.backprop_epoch, "offline": self.offline_epoch}.get(
            self.algo.rollout, partial(self.sample_epoch, update=self.algo.rollout == "sample"))
        self.offline = OfflinePairs.of(self.algo, self.model, self.device)  # algo=dpo_offline's pairs, encoded
        if resumed:
            superseded = self.resume(*resumed)
        if self.is_main:
            (self.run_dir / "images").mkdir(parents=True, exist_ok=True)
            report.truncate_metrics(self.run_dir, self.start_epoch, superseded)
        if cfg.log.tracker != "none":
            self.accelerator.init_trackers(cfg.log.project, config=report.flat_config(cfg))
        if self.is_main:
            console.print(report.startup_table("ddpo train", self.startup_rows()))
            for warning in plan.warnings:
                warn(warning)
        self.paired = start_paired_measure(cfg, self.prompt_set, plan.heldout, self.model, self.reward_fn,
                                           self.unwrapped, self.device, self.accelerator.autocast,
                                           resumed=self.start_epoch > 0) if self.is_main or self.sharded else None
        self.watch = start_watch(cfg, plan, self.model, self.unwrapped, self.device, self.accelerator.autocast,
                                 self.run_dir, write=self.is_main) if self.is_main or self.sharded else None

    def startup_rows(self) -> list[tuple[str, str]]:
        cfg, model = self.cfg, self.model
        lora = f"LoRA r={cfg.model.lora.rank}" if cfg.model.use_lora else "full fine-tuning"
        return [("run dir", str(self.run_dir)), ("model", f"{cfg.model.name} (family {model.family}, {lora})"),
                ("algorithm / reward", f"{self.algo.name} / {self.reward_fn.name}"),
                ("prompts", f"{getattr(self.prompt_set, 'name', '?')} ({len(self.prompt_set)})"),
                ("sampler", f"{self.sampler.name}, {self.sampler.num_steps} steps, guidance "
                            f"{cfg.sampler.guidance_scale}"),
                *precision_rows(self.precision, self.device), ("image size", f"{model.resolution} px"),
                ("trainable parameters", f"{distributed.parameter_count(self.params):,}"),
                ("processes", strategy(self.accelerator)), *self.counts.as_rows(),
                ("epochs", f"{self.start_epoch} -> {cfg.train.num_epochs}")]

    # ------------------------------------------------------------------------------------------------ the loop
    def train(self) -> None:
        cfg = self.cfg
        with report.epoch_progress(console, self.is_main) as progress:
            task = progress.add_task("training", total=cfg.train.num_epochs, completed=self.start_epoch)
            for epoch in range(self.start_epoch, cfg.train.num_epochs):
                start = time.perf_counter()
                torch.manual_seed(derive_seed(cfg.seed, epoch, self.accelerator.process_index, "torch"))
                self.sampler.set_epoch(epoch)  # a sliding SDE window moves
                samples, rewards, metrics, timings = self.run_epoch(epoch)
                timings = {"epoch_seconds": time.perf_counter() - start, **timings}
                row = report.metrics_row(epoch, self.global_step, self.optimizer.param_groups[0]["lr"], rewards,
                                         metrics, timings, samples.info)
                row.update(self.paired.row(epoch, self.unwrapped) if self.paired else {})
                verdict = epoch_verdict(self.watch, self.accelerator, epoch, self.unwrapped, row)
                self.log_epoch(epoch, row, samples)
                self.checkpoint_epoch(epoch, verdict)
                progress.update(task, advance=1, description=f"reward {row['reward_mean']:.4g}")
                if verdict.stop:
                    break
        if self.is_main:
            console.print(report.run_summary(self.run_dir, cfg.log.paired.metric, cfg.log.paired.heldout,
                                             describe_sampler(cfg.sampler), cfg.checkpoint.best_by), highlight=False)

    def checkpoint_epoch(self, epoch: int, verdict: Verdict) -> None:
        """Save on the checkpoint.every epochs, the last one, a monitor's stop and a new best (kept as best/)."""
        due = epoch == self.cfg.train.num_epochs - 1 or (epoch + 1) % self.cfg.checkpoint.every == 0
        if due or verdict.stop or verdict.best:
            saved = self.save_checkpoint(epoch)
            if verdict.best and self.is_main:
                checkpoint.keep_as_best(saved)

    # ------------------------------------------------------------------------------------------------ sample, update
    def sample_epoch(self, epoch: int, update: bool = True) -> tuple[EpochSamples, np.ndarray, dict, dict]:
        """Sample and score the epoch's batches, then (``update``) ``num_inner_epochs`` passes of updates on them."""
        samples, timings = self.sample(epoch)
        rewards = self.gathered_rewards(samples, epoch)
        start = time.perf_counter()
        metrics = self.update_epoch(epoch, samples, self.training_targets(samples, rewards, epoch)) if update else {}
        if self.old_policy is not None and update:
            metrics["old_policy_decay"] = self.old_policy.update()
        timings["train_seconds"] = time.perf_counter() - start
        every = self.cfg.log.kl_to_base_every
        if every and epoch % every == 0:
            metrics["kl_to_base"] = self.kl_reading(samples)
        return samples, rewards, metrics, timings

    def offline_epoch(self, epoch: int) -> tuple[EpochSamples, np.ndarray, dict, dict]:
        """Sample and score the policy's own images (the run's yardstick), then update on pairs from a file."""
        samples, rewards, metrics, timings = self.sample_epoch(epoch, update=False)
        start = time.perf_counter()
        pairs, targets = self.offline.epoch_samples(self.cfg, self.algo, epoch, self.counts.samples_per_process // 2,
                                                    self.accelerator.process_index, self.accelerator.num_processes)
        metrics.update(self.update_epoch(epoch, pairs, targets))
        timings["train_seconds"] = time.perf_counter() - start
        return samples, rewards, metrics, timings

    def sample(self, epoch: int) -> tuple[EpochSamples, dict]:
        """This process's ``num_batches_per_epoch`` batches, each scored in a worker thread while the next samples."""
        cfg = self.cfg
        rng, generator = epoch_randomness(cfg.seed, epoch, self.accelerator.process_index, self.device)
        trained = trained_steps(self.sampler, self.counts.window)
        books, start = EpochBooks(cfg.log.grid_images), time.perf_counter()
        self.denoiser.eval()
        with self.old_policy.swapped_in() if self.algo.samples_with_old_policy else nullcontext():
            for _ in range(cfg.sampler.num_batches_per_epoch):
                prompts, metadata = self.prompt_set.draw(cfg.sampler.batch_size, rng, cfg.sampler.group_size)
                trajectory, images = self.sample_batch(prompts, generator, trained)
                reward = self.executor.submit(self.reward_fn, images, prompts, metadata) if cfg.log.async_reward \
                    else self.reward_fn(images, prompts, metadata)
                books.add(prompts, metadata, reward, images, trajectory)
        sample_seconds = time.perf_counter() - start
        samples, waited = books.close(self.device)
        return samples, {"sample_seconds": sample_seconds, "reward_seconds": waited}

    @torch.no_grad()
    def sample_batch(self, prompts: list[str], generator: torch.Generator, trained: torch.Tensor):
        """Chains with log-probs from the current policy, noise drawn by the run's strategy, and their images."""
        noise = self.noise.draw(len(prompts), self.model.latent_shape(), generator, self.device, trained)
        with self.accelerator.autocast():
            _, trajectory = run_chain(self.model, self.sampler, self.unwrapped, noise.initial, self.model.encode(prompts),
                                      self.cfg.sampler.guidance_scale, noise.steps, record=True,
                                      record_outputs=needs_recorded_outputs(self.algo.needs))
        trajectory.branch = noise.branch
        return trajectory, self.model.decode(trajectory.final)

    def gathered_rewards(self, samples: EpochSamples, epoch: int) -> np.ndarray:
        """Every process's rewards ``[N]`` in rank order, checked (NaN / inf: ``train.nonfinite_rewards``)."""
        rewards = self.accelerator.gather(samples.rewards.detach().float()).cpu().numpy()
        check_rewards(rewards, gathered_prompts(self.accelerator, samples.prompts), self.reward_fn.name, epoch,
                      self.cfg.train.nonfinite_rewards)
        return rewards

    def training_targets(self, samples: EpochSamples, rewards: np.ndarray, epoch: int) -> torch.Tensor:
        """This rank's per-sample targets from everyone's rewards: advantages, or the algorithm's own (weights,
        preference pairs); scrambled by the algorithm in a control run (``advantage.shuffle``)."""
        cfg = self.cfg
        if self.algo.targets == "advantages":
            prompts = gathered_prompts(self.accelerator, samples.prompts)
            targets = compute_advantages(cfg.advantage.mode, rewards, prompts, self.tracker, cfg.sampler.group_size,
                                         cfg.sampler.antithetic)
        else:
            targets = self.algo.targets_from_rewards(rewards, cfg.sampler.group_size)
        if cfg.advantage.shuffle:
            targets = self.algo.shuffled(targets, np.random.default_rng(derive_seed(cfg.seed, epoch, "control")))
        n, rank = len(samples.prompts), self.accelerator.process_index
        return torch.as_tensor(targets[rank * n:(rank + 1) * n], dtype=torch.float32, device=self.device)

    def update_epoch(self, epoch: int, samples: EpochSamples, targets: torch.Tensor) -> dict:
        """``num_inner_epochs`` passes over this rank's samples in optimizer steps of batch_size x accumulation;
        each sample trains an independent random subset of the trained steps (a branched one its branch step)."""
        cfg = self.cfg
        n_samples = len(samples.prompts)
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, self.accelerator.process_index,
                                                              "shuffle"))
        trained = trained_steps(self.sampler, self.counts.window)
        per_update = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
        totals, updates = {}, 0
        self.denoiser.train()
        for _ in range(cfg.train.num_inner_epochs):
            order = torch.randperm(n_samples, generator=generator)
            if self.algo.trains_on == "forward":  # columns index the samples' fresh noise levels
                self.draws = draws_for(self.algo, self.sampler, self.model, targets, self.counts.train_timesteps,
                                       generator, self.counts.window)
                steps = torch.arange(self.counts.train_timesteps).expand(n_samples, -1)
            elif samples.trajectory.branch is not None:
                steps = samples.trajectory.branch.cpu()[:, None]
            else:
                steps = torch.stack([trained[torch.randperm(len(trained), generator=generator)]
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
        cfg = self.cfg
        rows = sample_ids.repeat_interleave(steps.shape[1])          # [P] sample index of each pair
        cols = steps.reshape(-1)                                     # [P] trajectory column of each pair
        n_pairs, chunk, sums = rows.numel(), cfg.train.batch_size * cfg.train.timesteps_per_forward, {}
        if self.plan.preserve:
            generator = torch.Generator().manual_seed(derive_seed(cfg.seed, self.global_step,
                                                                  self.accelerator.process_index, "preserve"))
            with micro_step(self.accelerator, self.denoiser, last=False), self.accelerator.autocast():
                drift = preservation_drift(self.model, self.sampler, self.denoiser, self.reference,
                                           samples.trajectory, rows, cols, self.plan.preserve,
                                           cfg.train.preserve.pairs, cfg.sampler.guidance_scale, generator)
                self.backward(cfg.train.preserve.weight * drift)
            sums["preserve_drift"] = float(drift.detach())
        for first in range(0, n_pairs, chunk):
            r, c = rows[first:first + chunk], cols[first:first + chunk]
            last = first + chunk >= n_pairs
            with micro_step(self.accelerator, self.denoiser, last), self.accelerator.autocast():
                loss, metrics = self.algo.loss(**self.pair_tensors(samples, targets, r, c))
                self.backward(loss * (r.numel() / n_pairs))
            for key, value in {"loss": loss.detach(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * r.numel() / n_pairs
        sums["grad_norm"] = self.optimizer_step()
        return mean_over_processes(self.accelerator, sums)

    def pair_tensors(self, samples: EpochSamples, targets: torch.Tensor, rows: torch.Tensor,
                     cols: torch.Tensor) -> dict[str, torch.Tensor]:
        return pair_tensors(self.pair_source, self.algo, samples, targets, rows, cols, self.draws)

    def optimizer_step(self) -> float:
        t = self.cfg.train
        lr = learning_rate(t.lr, t.lr_schedule, self.global_step, self.counts.updates_per_epoch * t.num_epochs)
        grad_norm = distributed.optimizer_step(self.accelerator, self.denoiser, self.optimizer, self.params, lr,
                                               t.max_grad_norm, partial(check_gradient, global_step=self.global_step))
        self.global_step += 1
        return grad_norm

    def kl_reading(self, samples: EpochSamples) -> float | None:
        """Mean KL(policy step || base step) on a few stored pairs; None without a reference or step distribution."""
        if self.reference is None or is_deterministic(self.sampler):
            return None
        with torch.no_grad(), self.accelerator.autocast():
            kl = kl_to_base(self.model, self.sampler, self.unwrapped, self.reference, samples.trajectory,
                            samples.prompts, self.training_guidance)
        return float(self.accelerator.reduce(kl, "mean"))

    # ------------------------------------------------------------------------------------------------ backprop
    def backprop_epoch(self, epoch: int) -> tuple[EpochSamples, np.ndarray, dict, dict]:
        """Reward backprop (AlignProp / DRaFT): generate with the graph kept, loss = f(reward), backward, step."""
        cfg = self.cfg
        rng, generator = epoch_randomness(cfg.seed, epoch, self.accelerator.process_index, self.device)
        # drawn alike on every process: under FSDP2 all must run the same sharded passes (else gloo / NCCL abort)
        truncation_rng = random.Random(derive_seed(cfg.seed, epoch, "truncation"))
        accumulation = cfg.train.gradient_accumulation_steps
        n_micro = self.counts.samples_per_process // cfg.train.batch_size
        books, totals, start = EpochBooks(cfg.log.grid_images), {}, time.perf_counter()
        self.denoiser.train()
        for micro in range(n_micro):
            prompts, metadata = self.prompt_set.draw(cfg.train.batch_size, rng)
            keep = self.algo.steps_with_gradient(self.sampler.num_steps, truncation_rng)
            noise = torch.randn((len(prompts), *self.model.latent_shape()), generator=generator, device=self.device)
            boundary = (micro + 1) % accumulation == 0
            with micro_step(self.accelerator, self.denoiser, last=boundary), self.accelerator.autocast():
                final, _ = run_chain(self.model, self.sampler, self.denoiser, noise, self.model.encode(prompts),
                                     cfg.sampler.guidance_scale, generator_noise(noise.shape, generator, self.device),
                                     keep_grad=keep, checkpoint_denoiser=self.algo.checkpoint_unet)
                images = self.model.decode(final)
                rewards, info = self.reward_fn(images, prompts, metadata)
                finite = check_rewards(rewards.detach().cpu().numpy(), prompts, self.reward_fn.name, epoch,
                                       cfg.train.nonfinite_rewards, whole_epoch=False)
                loss, _ = self.algo.loss(rewards=rewards[torch.from_numpy(finite).to(rewards.device)])
                if finite.any():  # train.nonfinite_rewards=drop: the other images take no part
                    self.backward(loss / accumulation)
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) / n_micro
            totals["kept_steps"] = totals.get("kept_steps", 0.0) + sum(keep) / n_micro
            if boundary:
                totals["grad_norm"] = totals.get("grad_norm", 0.0) + self.optimizer_step() * accumulation / n_micro
            books.add(prompts, metadata, (rewards.detach(), info), images)
        samples, _ = books.close(self.device)
        timings = {"sample_seconds": 0.0, "reward_seconds": 0.0, "train_seconds": time.perf_counter() - start}
        return samples, self.gathered_rewards(samples, epoch), mean_over_processes(self.accelerator, totals), timings

    # ------------------------------------------------------------------------------------------------ outputs
    def log_epoch(self, epoch: int, row: dict, samples: EpochSamples) -> None:
        if self.cfg.log.tracker != "none":
            self.accelerator.log(report.tracker_values(row), step=epoch)
        if not self.is_main:
            return
        report.append_metrics(self.run_dir, row)
        if epoch % self.cfg.log.image_every == 0 or epoch == self.cfg.train.num_epochs - 1 or "monitor_stop" in row:
            report.plot_reward_curve(self.run_dir, metric=self.cfg.log.paired.metric)
            report.epoch_grid(samples.images, samples.prompts, samples.rewards.tolist()).save(
                self.run_dir / "images" / f"epoch_{epoch:04d}.png")
        console.print(report.epoch_line(row, self.cfg.log.paired.metric), highlight=False)

    def save_checkpoint(self, epoch: int) -> Path:
        check_weights(self.params, epoch)
        state = {"global_step": self.global_step, "stat_tracker": self.tracker.state_dict(),
                 "seed": self.cfg.seed, "config": json.dumps(OmegaConf.to_container(self.cfg, resolve=True))}
        return checkpoint.save(self.accelerator, self.model, self.denoiser, self.optimizer, state, self.run_dir,
                               epoch, self.cfg.model.use_lora, self.cfg.checkpoint.keep_last, self.old_policy)

    def resume(self, path: Path, state: dict, skipped: list[str]) -> Path | None:
        """Continue from checkpoint ``path`` (weights loaded); returns where later checkpoints went, if anywhere."""
        checkpoint.restore_optimizer(self.accelerator, self.denoiser, self.optimizer, state, path)
        checkpoint.restore_old_policy(self.old_policy, path)
        self.tracker.load_state_dict(state["stat_tracker"])
        self.global_step = int(state["global_step"])
        self.start_epoch = int(state["epoch"]) + 1
        superseded = supersede_after(self.run_dir, int(state["epoch"])) if self.is_main else None
        if self.is_main:
            report.print_resumed(path, skipped, self.start_epoch, self.global_step, superseded)
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
