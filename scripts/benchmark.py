#!/usr/bin/env python
"""Benchmark DDPO epochs on a pipeline folder and print one JSON object (not a test: numbers, not pass/fail).

    python scripts/benchmark.py                                   # tiny model, 32x32, the reference workload
    python scripts/benchmark.py --resolution 128                  # same work at 128x128
    python scripts/benchmark.py --pipeline path/to/diffusers/folder -- train.timesteps_per_forward=5
    python scripts/benchmark.py --model tiny_sd3 --resolution 128                 # flow family, Flow-GRPO's SDE
    python scripts/benchmark.py --model tiny_sd3 -- sampler.sde_window=[0,2]      # only 2 stochastic steps trained

Reference workload (issue 2): UNet channels (32, 64), 2 layers per block, cross-attention 32; 10 DDIM steps;
4 samples per epoch; train batch 2; every timestep trained; CFG 5 in sampling and training; LoRA r=4; fp32;
2 threads. A flow model (--model tiny_sd3, tiny_flux, tiny_shapes_flow) samples with Flow-GRPO's SDE
(sampler=flow_sde) unless the overrides choose another flow sampler. Reports per-epoch seconds split into sampling / reward wait / training (epoch 0 is warm-up and is
reported separately), samples per second, UNet calls and UNet batch items per second, and peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ddpo_cli.config import compose  # noqa: E402
from ddpo_cli.models import family_class  # noqa: E402
from ddpo_cli.report import read_metrics  # noqa: E402
from ddpo_cli.trainer import Trainer  # noqa: E402

WORKLOAD = ["sampler.num_steps=10", "sampler.batch_size=4", "sampler.num_batches_per_epoch=1",
            "sampler.guidance_scale=5.0", "train.batch_size=2", "train.gradient_accumulation_steps=1",
            "train.timestep_fraction=1.0", "train.guidance_in_training=true", "precision=no", "model.lora.rank=4",
            "model.lora.alpha=4", "advantage.mode=batch", "log.tracker=none", "log.image_every=1000",
            "checkpoint.every=1000", "checkpoint.keep_last=1"]


class UNetCounter:
    """Counts UNet forward calls and the batch items they process."""

    def __init__(self, unet) -> None:
        self.calls = self.items = self.items_with_graph = 0
        unet.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output) -> None:
        """The batch of the latents input (positional for the UNet, ``hidden_states=`` for the transformers); items
        with a graph are training's (forward and backward), the others sampling's and the base model's."""
        latents = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        self.calls += 1
        self.items += int(latents.shape[0])
        self.items_with_graph += int(latents.shape[0]) if torch.is_grad_enabled() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", help="diffusers pipeline folder (default: the tiny model built in code)")
    parser.add_argument("--model", default="tiny", help="a model option when no --pipeline: tiny (SD), tiny_sdxl, "
                                                        "tiny_sd3, tiny_flux, tiny_shapes, tiny_shapes_flow")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4, help="epochs timed after one warm-up epoch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    args = parser.parse_args()

    model = [f"model.pretrained={args.pipeline}", "model.builder=null", "model.name=custom"] if args.pipeline else \
        [f"model={args.model}"]
    if family_class(compose("train", model).model.family).kind == "flow":
        model.append("sampler=flow_sde")   # before the overrides, which may pick another flow sampler
    cfg = compose("train", [*model, *WORKLOAD, f"model.resolution={args.resolution}", f"threads={args.threads}",
                            f"train.num_epochs={args.epochs + 1}", *args.overrides])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir))
        trainer.setup()
        counter = UNetCounter(trainer.accelerator.unwrap_model(trainer.denoiser))
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        rows = read_metrics(Path(run_dir))
        trainer.cleanup()
    timed = rows[1:]

    def mean(key: str) -> float:
        return sum(r[key] for r in timed) / len(timed)

    epoch_seconds = mean("epoch_seconds")
    result = {
        "resolution": args.resolution, "model": args.pipeline or args.model, "sampler": cfg.sampler.name,
        "trained_steps_per_sample": trainer.counts.train_timesteps,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(trainer.device),
        "timed_epochs": len(timed), "warmup_epoch_seconds": round(rows[0]["epoch_seconds"], 3),
        "epoch_seconds": round(epoch_seconds, 3), "sample_seconds": round(mean("sample_seconds"), 3),
        "reward_wait_seconds": round(mean("reward_seconds"), 3), "train_seconds": round(mean("train_seconds"), 3),
        "samples_per_second": round(rows[0]["samples"] / epoch_seconds, 3),
        "unet_calls_per_second": round(counter.calls / wall, 2),
        "unet_items_per_second": round(counter.items / wall, 2),
        "unet_calls_per_epoch": counter.calls // len(rows),
        # what `ddpo plan --benchmark` reads: denoiser batch items per second without a graph, and with one
        "sample_items_per_second": round((counter.items - counter.items_with_graph) / len(rows)
                                         / mean("sample_seconds"), 2),
        "train_items_per_second": round(counter.items_with_graph / len(rows) / mean("train_seconds"), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "overrides": args.overrides,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
