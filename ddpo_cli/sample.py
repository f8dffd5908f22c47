"""``ddpo sample``: images from a run's checkpoint (or the base model) with per-image seeds.

Image ``i`` of prompt ``p`` (its index in the prompt set) starts from the noise of ``derive_seed(seed, p, i)`` and
draws every stochastic step's noise from that same generator (``sampler.eta=0``: deterministic DDIM, no step noise),
so it does not depend on the checkpoint, the batch it is drawn in, or which other prompts are sampled:
``checkpoint=none`` gives the base model's image for the very same noise. Outputs (in Hydra's output dir)::

    images/<p>_<prompt>_<i>.png   grid.png (captioned, one row per prompt)   samples.jsonl   resolved_config.yaml
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from . import checkpoint, report
from .report import console
from .config import build
from .images import to_uint8_hwc
from .models import load_model, set_lora_scale
from .rewards.base import score_in_batches
from .prompts.run_files import load_run_set
from .rollout import images_from_seeds
from .runs import resolve_checkpoint
from .runtime import WEIGHT_DTYPES, autocast, derive_seed, pick_device, quiet_libraries, resolve_precision, set_threads
from .config.run_defaults import apply_run_defaults
from .samplers import build_sampler



# ----------------------------------------------------------------------------------------------- what to draw
@dataclass
class ImageSpec:
    """One image to draw: prompt ``prompt_index`` of the set, its ``image_index``-th image, and its seed."""

    prompt_index: int
    image_index: int
    prompt: str
    metadata: dict
    seed: int


def select_prompts(num_items: int, num_prompts: int | None) -> list[int]:
    """``num_prompts`` evenly spaced indices of a set of ``num_items`` (all when None or larger)."""
    if num_prompts is None or num_prompts >= num_items:
        return list(range(num_items))
    return [int(i * num_items / num_prompts) for i in range(num_prompts)]


def build_prompts(cfg: DictConfig):
    """The prompt set of ``cfg.prompts``; a set made at run time (``prompts=llm``) is read from the run's file
    (or ``prompts.cache``), never generated."""
    return load_run_set(build(cfg.prompts, "prompts"), cfg.run)


def plan_images(prompt_set, num_prompts: int | None, n: int, seed: int) -> list[ImageSpec]:
    """The images to draw, prompt by prompt; seeds depend only on (seed, prompt index, image index)."""
    return [ImageSpec(p, i, prompt_set.items[p][0], dict(prompt_set.items[p][1]), derive_seed(seed, p, i))
            for p in select_prompts(len(prompt_set), num_prompts) for i in range(n)]


# ----------------------------------------------------------------------------------------------- the model
class ImageSampler:
    """A model that switches between the base weights and checkpoints and draws images from per-image seeds, with
    the training set-up (:func:`~ddpo_cli.models.load_model`) and chain loop (:func:`~ddpo_cli.rollout.run_chain`).
    A sampler with ``eta = 0`` (DDIM) draws deterministically."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg, self.device = cfg, pick_device(cfg.device)
        set_threads(cfg.threads)
        quiet_libraries()
        self.dtype = WEIGHT_DTYPES[resolve_precision(cfg.precision, self.device, "precision")]
        self.model = load_model(cfg.model, self.device, self.dtype)  # with the LoRA adapter to load weights into
        self.denoiser = self.model.denoiser.requires_grad_(False).eval()  # eval: the LoRA modules' dropout is off
        self.sampler = build_sampler(cfg.sampler, self.model)
        self.use_lora = bool(cfg.model.use_lora)
        self.base_state: dict | None = None                    # full fine-tuning: the base weights (CPU)
        self.use(None)

    def use(self, path: Path | None, scale: float = 1.0) -> None:
        """Switch to checkpoint ``path`` with ``W = W0 + scale * dW``, or to the base model (``path=None``)."""
        if self.use_lora:
            if path is not None:
                checkpoint.load_weights(self.model, self.denoiser, path, use_lora=True)
            set_lora_scale(self.denoiser, 0.0 if path is None else scale)
            return
        if self.base_state is None:
            self.base_state = {k: v.detach().cpu().clone() for k, v in self.denoiser.state_dict().items()}
        if path is None:
            self.denoiser.load_state_dict(self.base_state)
            return
        checkpoint.load_weights(self.model, self.denoiser, path, use_lora=False)
        if scale != 1.0:
            self.denoiser.load_state_dict(interpolate(self.base_state, self.denoiser.state_dict(), scale))

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Images ``[N,3,H,W]`` float32 in [0,1] on the CPU, in batches of ``sampler.batch_size``."""
        size = self.cfg.sampler.batch_size
        return torch.cat([self._batch(prompts[i:i + size], seeds[i:i + size]) for i in range(0, len(prompts), size)])

    def _batch(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """One generator per image (:func:`~ddpo_cli.rollout.images_from_seeds`): image k does not depend on the
        batch it is drawn in."""
        with autocast(self.device, self.dtype):
            return images_from_seeds(self.model, self.sampler, self.denoiser, prompts, seeds,
                                     self.cfg.sampler.guidance_scale, self.device).cpu()


def interpolate(base: dict, tuned: dict, scale: float) -> dict:
    """``W0 + scale * (W1 - W0)`` for every floating-point tensor of a state dict (others as in ``tuned``)."""
    out = {}
    for key, w1 in tuned.items():
        w0 = base[key].to(w1)
        out[key] = w0 + scale * (w1 - w0) if w1.is_floating_point() else w1
    return out


# ----------------------------------------------------------------------------------------------- rewards
def score(reward_fn, images: torch.Tensor, specs: list[ImageSpec], batch_size: int) -> tuple[list[float], dict]:
    """Rewards ``[N]`` (as a list) and per-image info of ``images [N,3,H,W]``, in batches."""
    return score_in_batches(reward_fn, images, [s.prompt for s in specs], [s.metadata for s in specs], batch_size)


def build_reward(node: DictConfig, device: torch.device):
    reward_fn = build(node, "reward")
    reward_fn.setup(device, torch.float32)
    return reward_fn


# ----------------------------------------------------------------------------------------------- outputs
def image_file(spec: ImageSpec) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", spec.prompt).strip("_")[:40] or "prompt"
    return f"images/{spec.prompt_index:03d}_{slug}_{spec.image_index}.png"


def save_png(image: torch.Tensor, path: Path) -> None:
    """``[3,H,W]`` in [0,1] -> 8-bit PNG."""
    Image.fromarray(to_uint8_hwc(image[None])[0]).save(path)


def write_samples(out_dir: Path, images: torch.Tensor, specs: list[ImageSpec], rows: list[dict], n: int) -> None:
    """Individual PNGs, ``grid.png`` (one row per prompt) and ``samples.jsonl`` (one row per image)."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for image, row in zip(images, rows):
        save_png(image, out_dir / row["file"])
    captions = [f"{report.shown_prompt(s.prompt)} #{s.image_index}"
                + (f" | {r['reward']:.3g}" if "reward" in r else "") for s, r in zip(specs, rows)]
    report.image_grid(images, captions, columns=n).save(out_dir / "grid.png")
    with open(out_dir / "samples.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def sample_images(cfg: DictConfig, out_dir: Path) -> list[dict]:
    """Draw the images of ``cfg`` (already merged with the run's settings) into ``out_dir``; returns the rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = resolve_checkpoint(cfg.run, cfg.checkpoint)
    specs = plan_images(build_prompts(cfg), cfg.num_prompts, cfg.n, cfg.seed)
    sampler = ImageSampler(cfg)
    sampler.use(path, cfg.lora_scale)
    console.print(f"sampling {len(specs)} images from {path or 'the base model'} (lora_scale {cfg.lora_scale}, "
                  f"{cfg.sampler.num_steps} {cfg.sampler.name} steps, eta {cfg.sampler.eta}) on {sampler.device}")
    images = sampler.generate([s.prompt for s in specs], [s.seed for s in specs])
    rows = [{"prompt": s.prompt, "prompt_index": s.prompt_index, "image_index": s.image_index,
             "metadata": s.metadata, "seed": s.seed, "file": image_file(s),
             "checkpoint": str(path) if path else None, "lora_scale": cfg.lora_scale if path else None}
            for s in specs]
    if cfg.reward is not None:
        reward_fn = build_reward(cfg.reward, sampler.device)
        values, info = score(reward_fn, images, specs, cfg.sampler.batch_size)
        for k, row in enumerate(rows):
            row.update(reward_name=reward_fn.name, reward=values[k],
                       reward_info={key: value[k] for key, value in info.items() if len(value) == len(rows)})
    write_samples(out_dir, images, specs, rows, cfg.n)
    return rows


def sample_task(cfg: DictConfig) -> None:
    """Hydra task of ``ddpo sample``: merge the run's settings, save the effective config, draw the images."""
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    cfg = apply_run_defaults(cfg, list(hydra_cfg.overrides.task), ("model", "sampler", "prompts"))
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out_dir / "resolved_config.yaml")
    rows = sample_images(cfg, out_dir)
    console.print(f"[green]{len(rows)} images, grid.png and samples.jsonl in {out_dir}[/]")
