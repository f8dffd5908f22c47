"""Learning tests: on the shipped tiny_shapes model a reward must actually go up, over several seeds, by a stated
margin, measured on fixed prompts and seeds before and after training (not on the noisy per-epoch batches)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from ddpo_cli.cli import compose
from ddpo_cli.trainer import Trainer, derive_seed

pytestmark = pytest.mark.slow
PROMPTS = ["one red circle", "two green squares", "three blue triangles", "four yellow circles"]


def fixed_eval(trainer: Trainer, n_per_prompt: int = 4) -> float:
    """Mean reward of the current policy on fixed prompts and fixed noise (the same for every call)."""
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    prompts = [p for p in PROMPTS for _ in range(n_per_prompt)]
    generator = torch.Generator().manual_seed(derive_seed("fixed-eval"))
    with torch.no_grad():
        _, images = trainer.sample_batch(unet, prompts, generator)
        rewards, _ = trainer.reward_fn(images, prompts, [{}] * len(prompts))
    return float(rewards.mean())


def train_and_measure(*overrides: str) -> tuple[float, float]:
    cfg = compose("train", ["model=tiny_shapes", "prompts=from_list", f"prompts.prompts=[{','.join(PROMPTS)}]",
                            "sampler.num_steps=6", "log.tracker=none", "threads=2", *overrides])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir))
        trainer.setup()
        try:
            before = fixed_eval(trainer)
            trainer.train()
            return before, fixed_eval(trainer)
        finally:
            trainer.cleanup()


@pytest.mark.parametrize("seed", [0, 1])
def test_alignprop_raises_a_differentiable_reward(seed):
    # brightness (mean pixel, in [0, 1]) backpropagated through the last 2 of 6 DDIM steps
    before, after = train_and_measure("algo=draft", "algo.k=2", "reward=custom", "train.lr=3e-3",
                                      "sampler.batch_size=8", "sampler.num_batches_per_epoch=1",
                                      "train.batch_size=4", "train.gradient_accumulation_steps=1",
                                      "train.num_epochs=4", f"seed={seed}")
    assert after > before + 0.02, (before, after)
