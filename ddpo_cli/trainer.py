"""The training loop. Reads like the DDPO algorithm box: sample -> reward -> advantages -> update -> log/save.

Randomness is a pure function of (seed, epoch, process, purpose): every epoch re-seeds its generators, so a resumed
run draws exactly what the uninterrupted run would have drawn, without saving RNG states.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from . import checkpoint, report
from .advantages import PerPromptStatTracker, compute_advantages
from .config import build_algorithm, derive_counts, validate
from .errors import UserError
from .pipeline import PromptEmbeddingCache, decode_latents, latent_shape, load_pipeline, prepare_for_training
from .algorithms.dpok import gaussian_kl
from .sampling import (NoiseSchedule, Trajectory, ddim_step_with_logprob, guided_noise_pred, sample_trajectory,
                       sample_with_grad)

console = Console(stderr=True)


def derive_seed(*keys) -> int:
    """A stable 63-bit seed from any keys (same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA with bf16 support, fp16 on other CUDA, ``no`` (fp32) on CPU."""
    if name != "auto":
        if name != "no" and device.type != "cuda":
            console.print(f"[yellow]train.mixed_precision={name} needs CUDA; running fp32 on {device.type}[/]")
            return "no"
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@contextmanager
def adapters_disabled(unet):
    """The base model: the same UNet with its LoRA adapter switched off (no second copy in memory)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def merge_info(infos: list[dict]) -> dict[str, list]:
    """Per-batch reward info dicts -> one dict of per-image lists (tensors become plain lists)."""
    merged: dict[str, list] = {}
    for info in infos:
        for key, values in info.items():
            merged.setdefault(key, []).extend(values.tolist() if torch.is_tensor(values) else list(values))
    return merged


@dataclass
class EpochSamples:
    """Everything one epoch sampled on this process (B = samples per process)."""

    trajectory: Trajectory | None  # tensors [B, T, ...]; None for reward backprop
    prompts: list[str]
    metadata: list[dict]
    rewards: torch.Tensor        # [B]
    images: torch.Tensor         # [n, 3, H, W] the first few images (for the grid), CPU
    info: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Validate, then build the accelerator, the model, the optimizer and the pluggable parts; resume."""
        cfg = self.cfg
        validate(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._quiet_libraries()
        self._setup_accelerator()
        self._setup_model()
        self.prompt_set = instantiate(cfg.prompts)
        self.reward_fn = instantiate(cfg.reward, _convert_="all")
        self.reward_fn.setup(self.device, torch.float32)
        self.algo = build_algorithm(cfg)
        self.tracker = PerPromptStatTracker(cfg.advantage.buffer_size, cfg.advantage.min_count)
        # The reward thread gets its own small torch thread team: a second full-size OpenMP team (created the first
        # time that thread runs a torch op) slows every later op of the main thread ~1.7x on a 2-core CPU.
        self.executor = ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads,
                                           initargs=(cfg.log.reward_worker_threads,))
        self.start_epoch, self.global_step = 0, 0
        if cfg.resume:
            self._resume(checkpoint.find_checkpoint(cfg.resume))
        if self.accelerator.is_main_process:
            (self.run_dir / "images").mkdir(parents=True, exist_ok=True)
            report.truncate_metrics(self.run_dir, self.start_epoch)
        if cfg.log.tracker != "none":
            self.accelerator.init_trackers(cfg.log.project, config=self._flat_config())
        self._print_startup()

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator

        cfg = self.cfg
        on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        self.precision = resolve_precision(cfg.train.mixed_precision, torch.device("cpu" if on_cpu else "cuda"))
        self.accelerator = Accelerator(mixed_precision=self.precision, cpu=on_cpu, project_dir=str(self.run_dir),
                                       log_with=None if cfg.log.tracker == "none" else cfg.log.tracker)
        self.device = self.accelerator.device
        self.counts = derive_counts(cfg, self.accelerator.num_processes)
        if self.device.type == "cuda" and cfg.model.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _setup_model(self) -> None:
        """Pipeline (frozen parts in the compute dtype), LoRA in fp32, AdamW, DDP wrapping, noise schedule, prompts."""
        from accelerate.utils import set_seed

        cfg = self.cfg
        self.weight_dtype = WEIGHT_DTYPES[self.precision]
        self.pipe = load_pipeline(cfg)
        set_seed(cfg.seed)  # after loading (building the tiny model draws numbers): same LoRA init on every rank
        self.params = prepare_for_training(self.pipe, cfg.model, self.weight_dtype)
        self.pipe.to(self.device)
        self.num_trainable = sum(p.numel() for p in self.params)
        t = cfg.train
        optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                      weight_decay=t.weight_decay, eps=t.adam_epsilon)
        self.unet, self.optimizer = self.accelerator.prepare(self.pipe.unet, optimizer)
        self.schedule = NoiseSchedule.from_scheduler(self.pipe.scheduler, cfg.sampler.num_steps, self.device)
        self.embed = PromptEmbeddingCache(self.pipe, self.device)
        self.uncond = self.embed([""])[0]
        self.latent_shape = latent_shape(self.pipe, self.cfg.model.resolution)  # (C, h, w)

    def _quiet_libraries(self) -> None:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()

    def _flat_config(self) -> dict:
        flat = {}

        def walk(node, prefix=""):
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")
                else:
                    flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)

        walk(OmegaConf.to_container(self.cfg, resolve=True))
        return flat

    def _print_startup(self) -> None:
        if not self.accelerator.is_main_process:
            return
        cfg = self.cfg
        rows = [("run dir", str(self.run_dir)), ("model", f"{cfg.model.name} ({'LoRA r=' + str(cfg.model.lora.rank) if cfg.model.use_lora else 'full fine-tuning'})"),
                ("algorithm / reward", f"{self.algo.name} / {self.reward_fn.name}"),
                ("prompts", f"{getattr(self.prompt_set, 'name', '?')} ({len(self.prompt_set)})"),
                ("device / precision", f"{self.device} / {self.precision}"),
                ("image size", f"{self.latent_shape[1] * self.pipe.vae_scale_factor} px"),
                ("trainable parameters", f"{self.num_trainable:,}"),
                *self.counts.as_rows(), ("epochs", f"{self.start_epoch} -> {cfg.train.num_epochs}")]
        console.print(report.startup_table("ddpo train", rows))

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> None:
        cfg = self.cfg
        with self._progress() as progress:
            task = progress.add_task("training", total=cfg.train.num_epochs, completed=self.start_epoch)
            for epoch in range(self.start_epoch, cfg.train.num_epochs):
                row, samples = self.run_epoch(epoch)
                self.log_epoch(epoch, row, samples)
                if epoch == cfg.train.num_epochs - 1 or (epoch + 1) % cfg.checkpoint.every == 0:
                    self.save_checkpoint(epoch)
                progress.update(task, advance=1, description=f"reward {row['reward_mean']:.4g}")

    def _progress(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
                        TimeRemainingColumn(), console=console,
                        disable=not (console.is_terminal and self.accelerator.is_main_process))

    def run_epoch(self, epoch: int) -> tuple[dict, EpochSamples]:
        """One epoch of the chosen algorithm; returns the metrics row for metrics.jsonl and the samples."""
        start = time.perf_counter()
        torch.manual_seed(derive_seed(self.cfg.seed, epoch, self.accelerator.process_index, "torch"))
        if self.algo.kind == "backprop":
            samples, all_rewards, metrics, timings = self.backprop_epoch(epoch)
        else:
            samples, all_rewards, metrics, timings = self.sample_and_update_epoch(epoch)
        row = {"epoch": epoch, "global_step": self.global_step,
               "reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std()),
               **metrics, "samples": int(all_rewards.size), "epoch_seconds": time.perf_counter() - start,
               **timings, **{f"reward_info/{k}": v for k, v in report.numeric_means(samples.info).items()}}
        return row, samples

    def sample_and_update_epoch(self, epoch: int) -> tuple[EpochSamples, np.ndarray, dict, dict]:
        """Sample-based algorithms: sample -> rewards -> advantages (or weights) -> updates -> KL-to-base metric."""
        samples, sample_seconds, reward_seconds = self.sample_epoch(epoch)
        targets, all_rewards = self.training_targets(samples)
        train_start = time.perf_counter()
        metrics = {} if self.algo.kind == "none" else self.train_epoch(epoch, samples, targets)
        train_seconds = time.perf_counter() - train_start
        every = self.cfg.log.kl_to_base_every
        if every and epoch % every == 0:
            metrics["kl_to_base"] = self.kl_to_base(samples)
        return samples, all_rewards, metrics, {"sample_seconds": sample_seconds, "reward_seconds": reward_seconds,
                                               "train_seconds": train_seconds}

    def epoch_randomness(self, epoch: int) -> tuple[random.Random, torch.Generator]:
        """This process's prompt RNG and noise generator for ``epoch`` (a function of seed, epoch and rank only)."""
        cfg, rank = self.cfg, self.accelerator.process_index
        rng = random.Random(derive_seed(cfg.seed, epoch, rank, "prompts"))
        generator = torch.Generator(self.device).manual_seed(derive_seed(cfg.seed, epoch, rank, "noise"))
        return rng, generator

    def sample_epoch(self, epoch: int) -> tuple[EpochSamples, float, float]:
        """``num_batches_per_epoch`` batches; rewards run in a worker thread while the next batch samples."""
        cfg = self.cfg
        rng, generator = self.epoch_randomness(epoch)
        unet = self.accelerator.unwrap_model(self.unet)
        unet.eval()
        trajectories, prompts, metadata, futures, images_kept = [], [], [], [], []
        start = time.perf_counter()
        for _ in range(cfg.sampler.num_batches_per_epoch):
            batch_prompts, batch_meta = self._draw_prompts(rng)
            trajectory, images = self.sample_batch(unet, batch_prompts, generator)
            futures.append(self._submit_reward(images, batch_prompts, batch_meta))
            trajectories.append(trajectory)
            prompts += batch_prompts
            metadata += batch_meta
            if sum(len(i) for i in images_kept) < cfg.log.grid_images:
                images_kept.append(images.cpu())
        sample_seconds = time.perf_counter() - start
        wait_start = time.perf_counter()
        results = [f.result() if isinstance(f, Future) else f for f in futures]
        reward_seconds = time.perf_counter() - wait_start
        rewards = torch.cat([r for r, _ in results]).to(self.device)
        info = merge_info([i for _, i in results])
        trajectory = Trajectory(*(torch.cat([getattr(t, f) for t in trajectories]) for f in
                                  ("latents", "next_latents", "log_probs", "timesteps", "final")))
        return (EpochSamples(trajectory, prompts, metadata, rewards,
                             torch.cat(images_kept)[: cfg.log.grid_images], info), sample_seconds, reward_seconds)

    def _draw_prompts(self, rng: random.Random) -> tuple[list[str], list[dict]]:
        """``batch_size / group_size`` prompts, each repeated ``group_size`` times (consecutive)."""
        group = self.cfg.sampler.group_size
        pairs = self.prompt_set.sample(self.cfg.sampler.batch_size // group, rng)
        pairs = [pair for pair in pairs for _ in range(group)]
        return [p for p, _ in pairs], [dict(m) for _, m in pairs]

    @torch.no_grad()
    def sample_batch(self, unet, prompts: list[str], generator: torch.Generator) -> tuple[Trajectory, torch.Tensor]:
        cfg, group = self.cfg, self.cfg.sampler.group_size
        n_groups = len(prompts) // group
        noise = torch.randn((n_groups, *self.latent_shape), generator=generator, device=self.device)
        noise = noise.repeat_interleave(group, dim=0)  # [B, C, h, w]: one initial noise per group
        cond = self.embed(prompts)
        uncond = self.uncond.expand_as(cond)
        with self.accelerator.autocast():
            trajectory = sample_trajectory(unet, self.schedule, noise, cond, uncond, cfg.sampler.guidance_scale,
                                           cfg.sampler.eta, generator, self.weight_dtype)
        return trajectory, decode_latents(self.pipe.vae, trajectory.final)

    def _submit_reward(self, images, prompts, metadata):
        if self.cfg.log.async_reward:
            return self.executor.submit(self.reward_fn, images, prompts, metadata)
        return self.reward_fn(images, prompts, metadata)

    def training_targets(self, samples: EpochSamples) -> tuple[torch.Tensor, np.ndarray]:
        """Gather rewards and prompts from all processes (rank order) and turn them into this rank's advantages
        (policy gradient) or sample weights (reward-weighted denoising). Also returns all rewards."""
        from accelerate.utils import gather_object

        all_rewards = self.accelerator.gather(samples.rewards.float()).cpu().numpy()
        all_prompts = gather_object(samples.prompts) if self.accelerator.num_processes > 1 else samples.prompts
        if self.algo.kind == "denoising":
            targets = self.algo.weights(all_rewards)
        else:
            targets = compute_advantages(self.cfg.advantage.mode, all_rewards, all_prompts, self.tracker,
                                         self.cfg.sampler.group_size)
        n = len(samples.prompts)
        rank = self.accelerator.process_index
        return torch.as_tensor(targets[rank * n:(rank + 1) * n], dtype=torch.float32, device=self.device), all_rewards

    # ------------------------------------------------------------------------------------------------ update
    def train_epoch(self, epoch: int, samples: EpochSamples, targets: torch.Tensor) -> dict:
        """``num_inner_epochs`` passes over this rank's samples in optimizer steps of batch_size x accumulation."""
        cfg = self.cfg
        traj = samples.trajectory
        n_samples = traj.log_probs.shape[0]
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, self.accelerator.process_index, "shuffle"))
        totals: dict[str, float] = {}
        updates = 0
        window_start, window_end = self.counts.window
        self.unet.train()
        for _ in range(cfg.train.num_inner_epochs):
            order = torch.randperm(n_samples, generator=generator)
            steps = torch.stack([window_start + torch.randperm(window_end - window_start, generator=generator)
                                 for _ in range(n_samples)])
            steps = steps[:, : self.counts.train_timesteps]  # [B, T_train]: an independent subset per sample
            per_update = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
            for first in range(0, n_samples, per_update):
                sample_ids = order[first:first + per_update]
                metrics = self.update(traj, samples.prompts, targets, sample_ids, steps[sample_ids])
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value
                updates += 1
        return {key: value / max(updates, 1) for key, value in totals.items()}

    def update(self, traj: Trajectory, prompts: list[str], targets: torch.Tensor, sample_ids: torch.Tensor,
               steps: torch.Tensor) -> dict:
        """One optimizer step over all (sample, timestep) pairs of ``sample_ids`` x ``steps`` [S, T_train].

        Pairs go through the UNet in chunks of ``train.batch_size x train.timesteps_per_forward``; each chunk's mean
        loss is weighted by its share of pairs, so every pair counts equally (exact gradient accumulation).
        """
        cfg = self.cfg
        rows = sample_ids.repeat_interleave(steps.shape[1])          # [P] sample index of each pair
        cols = steps.reshape(-1)                                     # [P] step index of each pair
        n_pairs = rows.numel()
        chunk = cfg.train.batch_size * cfg.train.timesteps_per_forward
        sums: dict[str, float] = {}
        for first in range(0, n_pairs, chunk):
            r, c = rows[first:first + chunk], cols[first:first + chunk]
            is_last = first + chunk >= n_pairs
            sync = nullcontext() if is_last else self.accelerator.no_sync(self.unet)
            with sync, self.accelerator.autocast():
                loss, metrics = self.pair_loss(traj, prompts, targets, r, c)
                self.accelerator.backward(loss * (r.numel() / n_pairs))
            for key, value in {"loss": loss.detach(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * r.numel() / n_pairs
        sums["grad_norm"] = self.optimizer_step()
        return self.mean_over_processes(sums)

    def optimizer_step(self) -> float:
        grad_norm = self.accelerator.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return float(grad_norm)

    def mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        keys = list(values)
        reduced = self.accelerator.reduce(torch.tensor([values[k] for k in keys], device=self.device), "mean")
        return dict(zip(keys, reduced.tolist()))

    def pair_loss(self, traj: Trajectory, prompts: list[str], targets: torch.Tensor, rows: torch.Tensor,
                  cols: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The algorithm's loss on the (sample, timestep) pairs (rows, cols)."""
        cond = self.embed([prompts[i] for i in rows.tolist()])       # [P, L, D]
        if self.algo.kind == "denoising":
            return self.algo.loss(errors=self.denoising_errors(traj.final[rows], cond), weights=targets[rows])
        step = self.policy_step(self.unet, traj, cond, rows, cols)
        extra = {}
        if self.algo.needs_base:
            with torch.no_grad(), adapters_disabled(self.accelerator.unwrap_model(self.unet)):
                base = self.policy_step(self.accelerator.unwrap_model(self.unet), traj, cond, rows, cols)
            extra = {"mean": step["mean"], "base_mean": base["mean"], "std": step["std"], "eps": step["eps"],
                     "base_eps": base["eps"]}
        return self.algo.loss(log_prob=step["log_prob"], old_log_prob=traj.log_probs[rows, cols],
                              advantages=targets[rows], **extra)

    def policy_step(self, unet, traj: Trajectory, cond: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> dict:
        """log pi(x_{t-1} | x_t, c), step mean/std and guided eps for pairs: the same CFG and maths as sampling."""
        cfg = self.cfg
        latents = traj.latents[rows, cols]                           # [P, C, h, w]
        timesteps = traj.timesteps[rows, cols]                       # [P]
        guidance = cfg.sampler.guidance_scale if cfg.train.cfg else 1.0
        eps = guided_noise_pred(unet, latents, timesteps, cond, self.uncond.expand_as(cond), guidance,
                                self.weight_dtype)
        a_t, a_prev = self.schedule.alphas(timesteps)
        _, log_prob, mean, std = ddim_step_with_logprob(eps, latents, a_t, a_prev, cfg.sampler.eta,
                                                        self.schedule.prediction_type,
                                                        prev_sample=traj.next_latents[rows, cols])
        return {"log_prob": log_prob, "mean": mean, "std": std, "eps": eps}

    def denoising_errors(self, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Per-pair mean squared error of the ordinary diffusion loss at a random training timestep ``[P]``."""
        scheduler = self.pipe.scheduler
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=self.device)
        noise = torch.randn_like(x0)
        a = self.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if self.schedule.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        pred = self.unet(noisy.to(self.weight_dtype), t, encoder_hidden_states=cond.to(self.weight_dtype)).sample
        return ((pred.float() - target) ** 2).mean(dim=(1, 2, 3))

    @torch.no_grad()
    def kl_to_base(self, samples: EpochSamples, max_samples: int = 2, max_steps: int = 3) -> float | None:
        """Mean KL(policy step || base step) on a few stored (sample, step) pairs: an over-optimization signal.

        None for full fine-tuning (there is no base model without a second copy)."""
        if not self.cfg.model.use_lora:
            return None
        traj, unet = samples.trajectory, self.accelerator.unwrap_model(self.unet)
        n, t = traj.log_probs.shape
        rows = torch.arange(min(n, max_samples)).repeat_interleave(min(t, max_steps))
        cols = torch.linspace(0, t - 1, min(t, max_steps)).round().long().repeat(min(n, max_samples))
        cond = self.embed([samples.prompts[i] for i in rows.tolist()])
        with self.accelerator.autocast():
            policy = self.policy_step(unet, traj, cond, rows, cols)
            with adapters_disabled(unet):
                base = self.policy_step(unet, traj, cond, rows, cols)
        kl = gaussian_kl(policy["mean"], base["mean"], policy["std"]).mean()
        return float(self.accelerator.reduce(kl, "mean"))

    def backprop_epoch(self, epoch: int) -> tuple[EpochSamples, np.ndarray, dict, dict]:
        """Reward backprop (AlignProp / DRaFT): generate with the graph kept, loss = f(reward), backward, step."""
        cfg = self.cfg
        rng, generator = self.epoch_randomness(epoch)
        truncation_rng = random.Random(derive_seed(cfg.seed, epoch, self.accelerator.process_index, "truncation"))
        accumulation = cfg.train.gradient_accumulation_steps
        n_micro = self.counts.samples_per_process // cfg.train.batch_size
        self.unet.train()
        rewards, prompts, metadata, images_kept, infos, totals = [], [], [], [], [], {}
        start = time.perf_counter()
        for micro in range(n_micro):
            pairs = self.prompt_set.sample(cfg.train.batch_size, rng)
            batch_prompts, batch_meta = [p for p, _ in pairs], [dict(m) for _, m in pairs]
            keep = self.algo.steps_with_gradient(len(self.schedule.timesteps), truncation_rng)
            noise = torch.randn((len(pairs), *self.latent_shape), generator=generator, device=self.device)
            cond = self.embed(batch_prompts)
            boundary = (micro + 1) % accumulation == 0
            with (nullcontext() if boundary else self.accelerator.no_sync(self.unet)), self.accelerator.autocast():
                final = sample_with_grad(self.unet, self.schedule, noise, cond, self.uncond.expand_as(cond),
                                         cfg.sampler.guidance_scale, cfg.sampler.eta, keep, generator,
                                         self.weight_dtype, self.algo.checkpoint_unet)
                images = decode_latents(self.pipe.vae, final)
                batch_rewards, batch_info = self.reward_fn(images, batch_prompts, batch_meta)
                loss, _ = self.algo.loss(rewards=batch_rewards)
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
        train_seconds = time.perf_counter() - start
        local_rewards = torch.cat(rewards)
        all_rewards = self.accelerator.gather(local_rewards.float()).cpu().numpy()
        samples = EpochSamples(None, prompts, metadata, local_rewards, torch.cat(images_kept)[: cfg.log.grid_images],
                               merge_info(infos))
        return samples, all_rewards, self.mean_over_processes(totals), {
            "sample_seconds": 0.0, "reward_seconds": 0.0, "train_seconds": train_seconds}

    # ------------------------------------------------------------------------------------------------ outputs
    def log_epoch(self, epoch: int, row: dict, samples: EpochSamples) -> None:
        if self.cfg.log.tracker != "none":
            self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)
        if not self.accelerator.is_main_process:
            return
        report.append_metrics(self.run_dir, row)
        if epoch % self.cfg.log.image_every == 0 or epoch == self.cfg.train.num_epochs - 1:
            report.plot_reward_curve(self.run_dir)
            n = samples.images.shape[0]
            captions = [f"{report.shown_prompt(p)} | {r:.2f}"
                        for p, r in zip(samples.prompts[:n], samples.rewards[:n].tolist())]
            report.image_grid(samples.images, captions).save(self.run_dir / "images" / f"epoch_{epoch:04d}.png")
        shown = [f"{key} {row[key]:.3g}" for key in ("loss", "approx_kl", "clipfrac", "kl_to_base", "kl_penalty")
                 if isinstance(row.get(key), float)]
        console.print(f"epoch {epoch:4d} | reward {row['reward_mean']:.4f} +- {row['reward_std']:.4f} | "
                      f"{' | '.join(shown)} | {row['epoch_seconds']:.1f}s (sample {row['sample_seconds']:.1f}, "
                      f"reward wait {row['reward_seconds']:.1f}, train {row['train_seconds']:.1f})",
                      highlight=False)

    def save_checkpoint(self, epoch: int) -> Path:
        state = {"global_step": self.global_step, "stat_tracker": self.tracker.state_dict(),
                 "seed": self.cfg.seed, "config": json.dumps(OmegaConf.to_container(self.cfg, resolve=True))}
        return checkpoint.save(self.accelerator, self.unet, self.optimizer, state, self.run_dir, epoch,
                               self.cfg.model.use_lora, self.cfg.checkpoint.keep_last)

    def _resume(self, path: Path) -> None:
        checkpoint.load_model(self.accelerator.unwrap_model(self.unet), path, self.cfg.model.use_lora)
        state = checkpoint.load_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["stat_tracker"])
        self.global_step = int(state["global_step"])
        self.start_epoch = int(state["epoch"]) + 1
        if self.accelerator.is_main_process:
            console.print(f"[green]resumed from {path}: epoch {self.start_epoch}, global step {self.global_step}[/]")

    def cleanup(self) -> None:
        """Release workers and trackers; reset accelerate's global state so the next sweep job starts clean."""
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown(wait=True)
        if getattr(self, "accelerator", None) is not None:
            if self.cfg.log.tracker != "none":
                self.accelerator.end_training()
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=False)
            GradientState._reset_state()
