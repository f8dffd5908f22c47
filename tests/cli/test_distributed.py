"""Two CPU processes (gloo) under torchrun: ranks sample different data, yet hold identical LoRA weights after
training (gradients are synchronised), and checkpoint saving on every rank does not hang."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_metrics

pytestmark = pytest.mark.slow


def test_two_process_training_keeps_ranks_identical(tmp_path, cache_dir):
    run_dir = tmp_path / "ddp"
    run_dir.mkdir()
    # a fresh model cache: both processes build the tiny model at once (they once left it without text-encoder weights)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DDPO_CACHE": str(tmp_path / "fresh_cache")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(Path(__file__).resolve().parents[1] / "helpers" / "ddp_worker.py"), str(run_dir), "model=tiny", "sampler.num_steps=3",
               "sampler.batch_size=2", "sampler.num_batches_per_epoch=1", "train.batch_size=1",
               "train.gradient_accumulation_steps=2", "advantage.min_count=2", "log.tracker=none",
               "train.num_epochs=2", "train.lr=1e-2", "threads=1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)  # a hang fails here
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 of 2 done" in result.stdout and "rank 1 of 2 done" in result.stdout
    rank0, rank1 = load_file(run_dir / "rank0_lora.safetensors"), load_file(run_dir / "rank1_lora.safetensors")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora.up" in k or "lora_B" in k), "LoRA must train"
    rows = read_metrics(run_dir)
    assert [r["samples"] for r in rows] == [4, 4]  # 2 per process, gathered from both ranks
    noise0 = load_file(run_dir / "rank0_epoch0.safetensors")["initial_noise"]
    noise1 = load_file(run_dir / "rank1_epoch0.safetensors")["initial_noise"]
    assert not torch.allclose(noise0, noise1), "the two ranks must sample different data"
    saved = load_file(run_dir / "checkpoints" / "epoch_0001" / "pytorch_lora_weights.safetensors")
    torch.testing.assert_close(saved[f"unet.{next(iter(rank0))}"], rank0[next(iter(rank0))])
