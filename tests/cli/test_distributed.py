"""Two CPU processes (gloo) launched by `accelerate launch` with the shipped configs (conf/accelerate/): DDP keeps the
ranks identical; FSDP2 (accelerate's own fully_shard path, see ddpo_cli/distributed.py) trains to DDP's weights,
writes one whole checkpoint and resumes from it exactly; so do DeepSpeed ZeRO-2 and ZeRO-3 (DeepSpeed's CPU
accelerator over gloo, its optimizer state in its own per-process files); two "machines" on 127.0.0.1 (one process
each, static rendezvous) train, save once and resume exactly."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ddpo, free_port, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "helpers" / "ddp_worker.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
ARGS = ["model=tiny", "monitor.every=0",
        "sampler.num_steps=3", "sampler.batch_size=2", "sampler.num_batches_per_epoch=1",
        "train.batch_size=1", "train.gradient_accumulation_steps=2", "advantage.min_count=2", "log.tracker=none",
        "train.num_epochs=2", "train.lr=1e-2", "threads=1", "checkpoint.every=1"]
LORA = "pytorch_lora_weights.safetensors"


def launch_command(config: str, run_dir: Path, *overrides: str, launch_args: tuple = ()) -> list[str]:
    return [str(ACCELERATE), "launch", "--config_file", str(REPO / "conf" / "accelerate" / config), *launch_args,
            str(WORKER), str(run_dir), *ARGS, *overrides]


def environment(cache: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DDPO_CACHE": str(cache)}


def launch(config: str, run_dir: Path, cache: Path, *overrides: str) -> str:
    command = launch_command(config, run_dir, *overrides,
                             launch_args=("--num_processes", "2", "--main_process_port", str(free_port())))
    result = subprocess.run(command, env=environment(cache), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]  # a hang fails at the timeout
    return result.stdout + result.stderr


def launch_two_machines(run_dir: Path, cache: Path, *overrides: str) -> list[str]:
    """One process on each of two 'machines' (two launches on 127.0.0.1 that meet at a static rendezvous)."""
    port = free_port()
    nodes = [subprocess.Popen(launch_command("multi_node.yaml", run_dir, *overrides, launch_args=(
                 "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                 "--main_process_ip", "127.0.0.1", "--main_process_port", str(port))),
                              env=environment(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    return [stdout for stdout, _ in outputs]


def rank_weights(run_dir: Path) -> tuple[dict, dict]:
    return load_file(run_dir / "rank0_lora.safetensors"), load_file(run_dir / "rank1_lora.safetensors")


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol)


def assert_saved_once(run_dir: Path, weights: dict, extra: tuple = ()) -> None:
    """Each checkpoint is one LoRA file (no per-rank shards) holding exactly the gathered weights."""
    for folder in (run_dir / "checkpoints").iterdir():
        assert sorted(p.name for p in folder.iterdir()) == sorted([LORA, "training_state.pt", *extra]), folder
    saved = load_file(run_dir / "checkpoints" / "epoch_0001" / LORA)
    assert_same({f"unet.{k}": v for k, v in weights.items()}, saved)


def resume_matches(run_dir: Path, relaunch) -> None:
    """Resume from epoch 0's checkpoint into the same folder: epoch 1 is written again, equal to the one it
    superseded bit for bit (the optimizer state went out of the shards and back into them exactly)."""
    first = load_file(run_dir / "checkpoints" / "epoch_0001" / LORA)
    relaunch(f"resume={run_dir / 'checkpoints' / 'epoch_0000'}")
    (superseded,) = (run_dir / "superseded").iterdir()
    assert_same(load_file(superseded / "epoch_0001" / LORA), first)
    assert_same(load_file(run_dir / "checkpoints" / "epoch_0001" / LORA), first)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp")
    # a fresh model cache: both processes build the tiny model at once (they once left it without text-encoder weights)
    stdout = launch("multi_gpu.yaml", run_dir, tmp_path_factory.mktemp("fresh_cache"))
    assert "rank 0 of 2 done: trainer.sharded=False" in stdout and "rank 1 of 2 done" in stdout
    return run_dir


def test_ddp_keeps_ranks_identical_on_different_data(ddp_run):
    rank0, rank1 = rank_weights(ddp_run)
    assert_same(rank0, rank1)
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora.up" in k), "LoRA must train"
    assert [r["samples"] for r in read_metrics(ddp_run)] == [4, 4]  # 2 per process, gathered from both ranks
    noise0 = load_file(ddp_run / "rank0_epoch0.safetensors")["initial_noise"]
    noise1 = load_file(ddp_run / "rank1_epoch0.safetensors")["initial_noise"]
    assert not torch.allclose(noise0, noise1), "the two ranks must sample different data"
    assert_saved_once(ddp_run, rank0)


def test_fsdp2_trains_like_ddp_saves_once_and_resumes_exactly(ddp_run, tmp_path, cache_dir):
    run_dir = tmp_path / "fsdp2"
    stdout = launch("fsdp2.yaml", run_dir, cache_dir)
    assert "rank 0 of 2 done: trainer.sharded=True" in stdout
    assert "FSDP2 (denoiser fully sharded)" in stdout  # the startup table's processes line
    rank0, rank1 = rank_weights(run_dir)
    assert_same(rank0, rank1)
    # the same maths, summed in another order (reduce-scatter of shards instead of an all-reduce), which Adam's
    # normalisation magnifies where a gradient is tiny. Measured on 2026-12-06: of 23,040 weights 89 differ by more
    # than 1e-6, the largest by 2.4e-4, the mean by 4e-8; two Adam steps of lr 1e-2 moved each by about 2e-2
    ddp = rank_weights(ddp_run)[0]
    difference = torch.cat([(rank0[k] - ddp[k]).abs().flatten() for k in rank0])
    assert difference.max() < 1e-3 and difference.mean() < 1e-6, (difference.max(), difference.mean())
    assert_saved_once(run_dir, rank0)
    optimizer = torch.load(run_dir / "checkpoints" / "epoch_0001" / "training_state.pt")["optimizer"]
    # whole, not this rank's shard: as many moments as there are LoRA weights, keyed by parameter name
    assert all(".lora_" in name for name in optimizer["state"])
    assert sum(s["exp_avg"].numel() for s in optimizer["state"].values()) == sum(v.numel() for v in rank0.values())
    resume_matches(run_dir, lambda *overrides: launch("fsdp2.yaml", run_dir, cache_dir, *overrides))


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_trains_like_ddp_saves_once_and_resumes_exactly(ddp_run, tmp_path, cache_dir, stage):
    run_dir, config = tmp_path / f"zero{stage}", f"deepspeed_zero{stage}.yaml"
    stdout = launch(config, run_dir, cache_dir)
    assert f"rank 0 of 2 done: trainer.sharded={stage == 3}" in stdout  # ZeRO-3 splits the weights
    assert f"DeepSpeed ZeRO-{stage}, 2 processes" in stdout
    rank0, rank1 = rank_weights(run_dir)
    assert_same(rank0, rank1)
    # measured on 2026-12-06: ZeRO-2 max 6.1e-5, mean 3.0e-8; ZeRO-3 max 1.0e-4, mean 6.6e-8 (see the FSDP2 test)
    ddp = rank_weights(ddp_run)[0]
    difference = torch.cat([(rank0[k] - ddp[k]).abs().flatten() for k in rank0])
    assert difference.max() < 1e-3 and difference.mean() < 1e-6, (difference.max(), difference.mean())
    assert_saved_once(run_dir, rank0, extra=("deepspeed",))
    shards = sorted(p.name for p in (run_dir / "checkpoints" / "epoch_0001" / "deepspeed" / "optimizer").iterdir())
    assert [name for name in shards if "optim_states" in name] == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                                                                    for r in (0, 1)]
    resume_matches(run_dir, lambda *overrides: launch(config, run_dir, cache_dir, *overrides))


def test_a_deepspeed_checkpoint_resumed_without_deepspeed_is_one_line(tmp_path, cache_dir):
    run_dir = tmp_path / "zero2"
    launch("deepspeed_zero2.yaml", run_dir, cache_dir, "train.num_epochs=1")
    result = ddpo("train", *ARGS, "train.num_epochs=2", f"hydra.run.dir={run_dir}", f"resume={run_dir}",
                  env=environment(cache_dir))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "was written under DeepSpeed (conf/accelerate/deepspeed_zero*.yaml): resume it the same way" in result.stderr


def test_two_machines_train_save_once_and_resume_exactly(ddp_run, tmp_path, cache_dir):
    run_dir = tmp_path / "two_machines"
    stdouts = launch_two_machines(run_dir, cache_dir)
    assert "rank 0 of 2 done" in stdouts[0] and "rank 1 of 2 done" in stdouts[1]
    rank0, rank1 = rank_weights(run_dir)
    assert_same(rank0, rank1)
    assert_same(rank0, rank_weights(ddp_run)[0])  # the same two ranks and seeds as on one machine
    assert_saved_once(run_dir, rank0)
    resume_matches(run_dir, lambda *overrides: launch_two_machines(run_dir, cache_dir, *overrides))


@pytest.mark.parametrize("config", ["fsdp2.yaml", "deepspeed_zero3.yaml"])
def test_full_fine_tuning_sharded_from_the_command_line(tmp_path, cache_dir, config):
    """The user's own command (`accelerate launch ... -m ddpo_cli train`): the whole UNet trains sharded, each
    checkpoint is one folder that plain `from_pretrained` loads, and a resumed run writes the same epoch 1."""
    from diffusers import UNet2DConditionModel

    run_dir = tmp_path / "full"

    def train(*overrides):
        command = [str(ACCELERATE), "launch", "--config_file", str(REPO / "conf" / "accelerate" / config),
                   "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "ddpo_cli", "train",
                   *ARGS, "model.use_lora=false", "train.lr=1e-3", f"hydra.run.dir={run_dir}", *overrides]
        result = subprocess.run(command, env=environment(cache_dir), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    train()
    final = run_dir / "checkpoints" / "epoch_0001" / "unet"
    trained = UNet2DConditionModel.from_pretrained(final).state_dict()
    base = UNet2DConditionModel.from_pretrained(run_dir / "checkpoints" / "epoch_0000" / "unet").state_dict()
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in trained)
    first = load_file(final / "diffusion_pytorch_model.safetensors")
    train(f"resume={run_dir / 'checkpoints' / 'epoch_0000'}")
    assert_same(load_file(final / "diffusion_pytorch_model.safetensors"), first)


def test_reward_backprop_with_random_truncation_runs_sharded(tmp_path, cache_dir):
    """AlignProp keeps a random step's gradient per micro-batch: every process must keep the same one, or the
    sharded forward and backward passes stop matching (gloo aborted with a collective mismatch before)."""
    run_dir = tmp_path / "alignprop"
    command = [str(ACCELERATE), "launch", "--config_file", str(REPO / "conf" / "accelerate" / "fsdp2.yaml"),
               "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "ddpo_cli", "train",
               *ARGS, "algo=alignprop", "reward=custom", "train.num_epochs=1", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, env=environment(cache_dir), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(run_dir)[0]["loss"] < 0  # -reward, trained through the chain
