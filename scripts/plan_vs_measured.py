#!/usr/bin/env python
"""`ddpo plan`'s memory formula against one measured training step on this CPU, for small configurations
(prints one JSON line each; numbers, not pass/fail).

Measured: the bytes torch holds for the pipeline's weights, then the peak of what the step allocates on top (the
memory timeline of torch's profiler: every tensor created and destroyed, in time order): the forward of one chunk of (sample, timestep) pairs with its graph, the
backward, and AdamW's first step (which creates its moments). The plan's terms are computed on the meta device
with the same settings. Run from the repository root:

    python scripts/plan_vs_measured.py
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch.profiler._memory_profiler import Action, MemoryProfile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ddpo_cli.config import compose  # noqa: E402
from ddpo_cli.memory import MemoryInputs, memory_terms  # noqa: E402
from ddpo_cli.models import load_model, resolve_model_path  # noqa: E402
from ddpo_cli.models.meta import meta_model, training_activations  # noqa: E402
from ddpo_cli.planner import component_rows  # noqa: E402

CONFIGURATIONS = {
    "tiny_sd3 LoRA, chunk 8, CFG": ["model=tiny_sd3", "sampler=flow_sde"],
    "tiny SD full fine-tuning, chunk 8, CFG": ["model=tiny", "model.use_lora=false", "model.resolution=128"],
    "tiny SD LoRA, gradient checkpointing, chunk 16": ["model=tiny", "model.gradient_checkpointing=true",
                                                      "model.resolution=128", "train.timesteps_per_forward=8"],
}


def planned(cfg) -> dict[str, float]:
    model = meta_model(cfg.model, torch.float32, resolve_model_path(cfg.model))
    _, counts = component_rows(model)
    chunk = cfg.train.batch_size * cfg.train.timesteps_per_forward
    activations, _ = training_activations(model, chunk, cfg.sampler.guidance_scale)
    return memory_terms(MemoryInputs(counts["frozen_denoiser"], counts["trainable"], counts["encoders_and_vae"], 0,
                                     counts["buffer_bytes"], 4, 1, 1, False, 0, activations, 0))


def measured(cfg) -> dict[str, float]:
    model = load_model(cfg.model, torch.device("cpu"), torch.float32, lora_seed=0)
    weights = sum(t.numel() * t.element_size() for m in model.modules() for t in [*m.parameters(), *m.buffers()])
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    chunk = cfg.train.batch_size * cfg.train.timesteps_per_forward
    x = torch.randn(chunk, *model.latent_shape())
    cond, uncond = model.example_conditioning(chunk), model.example_conditioning(1)
    cond, uncond = cond.map(torch.randn_like), uncond.map(torch.randn_like)
    model.denoiser.train()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                record_shapes=True, with_stack=True) as profiler:
        out = model.predict(model.denoiser, x, torch.full((chunk,), 500.0), cond, uncond, cfg.sampler.guidance_scale)
        out.square().mean().backward()
        optimizer.step()
    # torch's memory timeline of the step (every tensor created and destroyed, in time order): its peak
    level = peak = 0
    for _, action, _, size in sorted(MemoryProfile(profiler.profiler.kineto_results).timeline, key=lambda e: e[0]):
        level += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, level)
    return {"weights": weights, "step peak": peak, "total": weights + peak}


def main() -> None:
    torch.manual_seed(0)
    for name, overrides in CONFIGURATIONS.items():
        cfg = compose("train", [*overrides, "train.batch_size=2", "precision=no"])
        plan, real = planned(cfg), measured(cfg)
        print(json.dumps({"configuration": name, "planned_mb": {k: round(v / 2**20, 2) for k, v in plan.items()},
                          "measured_mb": {k: round(v / 2**20, 2) for k, v in real.items()},
                          "planned / measured total": round(plan["total"] / real["total"], 3)}))


if __name__ == "__main__":
    main()
