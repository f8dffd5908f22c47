"""Run by tests/cli/test_distributed.py under `accelerate launch`: train (or resume), then dump this rank's LoRA
(gathered whole from the shards under FSDP2) and the initial noise it sampled in epoch 0."""
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from ddpo_cli.config import compose
from ddpo_cli.distributed import whole_weights
from ddpo_cli.trainer import Trainer

run_dir = Path(sys.argv[1])
cfg = compose("train", sys.argv[2:])
trainer = Trainer(cfg, run_dir)
trainer.setup()
trainer.train()
rank = trainer.accelerator.process_index
weights = trainer.model.lora_state_dict(trainer.unwrapped, whole_weights(trainer.unwrapped, trainable_only=True))
save_file({k: v.contiguous() for k, v in weights.items()}, run_dir / f"rank{rank}_lora.safetensors")
samples, _ = trainer.sample(0)  # what this rank sampled in epoch 0 (randomness is a function of seed, epoch, rank)
save_file({"initial_noise": samples.trajectory.latents[:, 0].contiguous()}, run_dir / f"rank{rank}_epoch0.safetensors")
trainer.accelerator.wait_for_everyone()
print(f"rank {rank} of {os.environ.get('WORLD_SIZE')} done: {trainer.sharded=}", flush=True)
trainer.cleanup()
