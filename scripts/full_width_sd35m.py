#!/usr/bin/env python
"""The full-width SD3.5 Medium transformer (2.24 B parameters, joint attention 4096, pooled 2048; random weights) in
bf16 on this CPU: one sampling step and one LoRA training step through the training code, with the peak memory next
to `ddpo plan`'s estimate for the same settings. Opt-in (about 10 GB of RAM and some minutes on 2 cores); prints
one JSON object:

    python scripts/full_width_sd35m.py [--resolution 256] [--threads 2]

Only the transformer is built (from its shipped config, on the meta device, then materialised with random bf16
weights): the prompt conditioning is random at the real widths (333 tokens x 4096, pooled 2048), as the text
encoders would give it. The sampling step is the chain's step (flow_sde, classifier-free guidance, no graph); the
training step is DDPO-IS's loss on that step's log-probability through `policy_step`, backward, and AdamW.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from torch.profiler._memory_profiler import Action, MemoryProfile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ddpo_cli.config import build, compose  # noqa: E402
from ddpo_cli.models import resolve_model_path  # noqa: E402
from ddpo_cli.models.meta import meta_model  # noqa: E402
from ddpo_cli.planner import plan_task  # noqa: E402
from ddpo_cli.rollout import policy_step  # noqa: E402
from ddpo_cli.samplers import build_sampler  # noqa: E402


def materialise(denoiser: torch.nn.Module) -> None:
    """Random weights on the CPU for a denoiser built on the meta device (LoRA B at zero, as peft starts it)."""
    denoiser.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        for buffer in denoiser.buffers():
            buffer.zero_()


def peak_of(profiler) -> int:
    level = peak = 0
    for _, action, _, size in sorted(MemoryProfile(profiler.profiler.kineto_results).timeline, key=lambda e: e[0]):
        level += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, level)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose("train", ["model=sd35_medium", "sampler=flow_sde", "precision=bf16", "reward=jpeg_compressibility",
                            f"model.resolution={args.resolution}", "sampler.num_steps=10", "sampler.batch_size=1",
                            "train.batch_size=1", "train.timesteps_per_forward=1"])
    planned = plan_task(cfg, gpus=1, strategy="ddp", benchmark=None)

    model = meta_model(cfg.model, torch.bfloat16, resolve_model_path(cfg.model))
    materialise(model.denoiser)
    model.device = torch.device("cpu")
    denoiser, config = model.denoiser, model.denoiser.config
    cond = model.example_conditioning(1).map(torch.randn_like)
    model._negative = model.example_conditioning(1).map(torch.randn_like)  # the encoded empty prompt, stand-in
    sampler = build_sampler(cfg.sampler, model)
    algorithm = build(cfg.algo, "algo")
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    weights = sum(t.numel() * t.element_size() for t in [*denoiser.parameters(), *denoiser.buffers()])
    guidance = cfg.sampler.guidance_scale

    x = torch.randn(1, *model.latent_shape(), generator=torch.Generator().manual_seed(1))
    step = torch.zeros(1, dtype=torch.long)
    start = time.perf_counter()
    with torch.no_grad():  # one step of the sampling chain (run_chain's stochastic step)
        output = model.predict(denoiser, x, sampler.model_time(step), cond, model.negative, guidance)
        mean, std = sampler.step_distribution(output, x, step)
        x_next = mean + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
        old_log_prob = sampler.log_prob(x_next, mean, std)
    sample_seconds = time.perf_counter() - start

    denoiser.train()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                record_shapes=True, with_stack=True) as profiler:
        new = policy_step(model, sampler, denoiser, x, x_next, step, cond, guidance)
        loss, info = algorithm.loss(log_prob=new["log_prob"], old_log_prob=old_log_prob,
                                    advantages=torch.ones(1))
        loss.backward()
        optimizer.step()
    train_seconds = time.perf_counter() - start
    gib = 2 ** 30
    print(json.dumps({
        "transformer": {"parameters": sum(p.numel() for p in denoiser.parameters()),
                        "joint_attention_dim": config.joint_attention_dim,
                        "pooled_projection_dim": config.pooled_projection_dim, "layers": config.num_layers},
        "resolution": args.resolution, "image_tokens": (args.resolution // 8 // 2) ** 2,
        "text_tokens": cond.embeds.shape[1], "dtype": "bf16 frozen, fp32 LoRA", "threads": args.threads,
        "ratio_at_first_update": round(float((new["log_prob"] - old_log_prob).exp()), 6),
        "sample_step_seconds": round(sample_seconds, 1), "train_step_seconds": round(train_seconds, 1),
        "measured_gib": {"denoiser weights": round(weights / gib, 2),
                         "training step peak on top": round(peak_of(profiler) / gib, 2),
                         "process peak rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)},
        "planned_gib": {"denoiser weights (frozen bf16 + LoRA fp32 + buffers)": round(
                            (sum(p.numel() * p.element_size() for p in denoiser.parameters() if not p.requires_grad)
                             + sum(b.numel() * b.element_size() for b in denoiser.buffers())) / gib
                            + planned["trainable weights"] / gib, 2),
                        "training step on top (gradients + optimizer state + activations)": round(
                            (planned["gradients"] + planned["optimizer state"] + planned["activations"]) / gib, 2),
                        "total (with text encoders and VAE)": round(planned["total"] / gib, 2)},
    }, indent=2))


if __name__ == "__main__":
    main()
