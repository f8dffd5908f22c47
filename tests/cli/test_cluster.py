"""Sweeps on a cluster: Hydra's submitit launcher runs the jobs; a job whose launcher asks for several GPUs runs as an
accelerate launch of itself, one per node (ddpo_cli/cluster.py). The Slurm preset composes with the keys users set."""
import os
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, read_metrics, run_cli
from ddpo_cli.cluster import accelerate_command, accelerate_config_path, relaunch_if_multi_gpu, rendezvous_port
from ddpo_cli.config import compose
from ddpo_cli.errors import UserError


def test_a_node_of_a_multi_gpu_job_composes_its_accelerate_launch():
    config = accelerate_config_path("fsdp2")
    assert config == REPO / "conf" / "accelerate" / "fsdp2.yaml"
    command = accelerate_command(["seed=1", "model=sd35_medium", "hydra.job.chdir=false"], Path("/runs/job_3"),
                                 config, gpus_per_node=4, nodes=2, node_rank=1, main_host="gpu-07", port=31234)
    assert command == [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                       "--num_processes", "8", "--num_machines", "2", "--machine_rank", "1",
                       "--main_process_ip", "gpu-07", "--main_process_port", "31234",
                       "-m", "ddpo_cli", "train", "seed=1", "model=sd35_medium", "hydra.run.dir=/runs/job_3"]
    assert rendezvous_port("4242_7") == rendezvous_port("4242_7") == 29500 + 42427 % 10000
    with pytest.raises(UserError, match="accelerate_config='zero9': no such file; choose deepspeed_zero2, "
                                        "deepspeed_zero3, fsdp2, multi_gpu, multi_node"):
        accelerate_config_path("zero9")


def hydra_node(launcher: dict) -> OmegaConf:
    return OmegaConf.create({"launcher": launcher, "runtime": {"output_dir": "/tmp/x"}, "overrides": {"task": []}})


def test_only_a_submitit_job_asking_for_several_gpus_relaunches(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = compose("train", ["model=tiny"])
    local = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    assert not relaunch_if_multi_gpu(cfg, hydra_node({"_target_": "hydra._internal.BasicLauncher"}))
    assert not relaunch_if_multi_gpu(cfg, hydra_node({"_target_": local, "gpus_per_node": 1, "nodes": 1}))
    with pytest.raises(UserError, match="hydra.launcher.tasks_per_node=8: use 1"):
        relaunch_if_multi_gpu(cfg, hydra_node({"_target_": local, "gpus_per_node": 8, "tasks_per_node": 8}))
    monkeypatch.setenv("WORLD_SIZE", "8")  # inside the launch already
    assert not relaunch_if_multi_gpu(cfg, hydra_node({"_target_": local, "gpus_per_node": 8}))


def test_the_slurm_preset_composes_with_the_keys_users_set():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose("train", ["hydra/launcher=slurm", "model=tiny", "hydra.launcher.partition=gpu"],
                  return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.tasks_per_node == 1
    assert {"partition", "gpus_per_node", "nodes", "timeout_min", "account", "mem_gb"} <= set(launcher)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_two_job_sweep_on_submitit_local_with_two_gpus_per_job(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    result = run_cli("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.gpus_per_node=2", "seed=0,1",
                     "model=tiny", "sampler.num_steps=3", "sampler.batch_size=2", "sampler.num_batches_per_epoch=1",
                     "train.batch_size=1", "train.gradient_accumulation_steps=2", "advantage.min_count=2",
                     "log.tracker=none", "train.num_epochs=1", "threads=1", f"hydra.sweep.dir={sweep}",
                     env={"OMP_NUM_THREADS": "1", "DDPO_CACHE": str(cache_dir)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*.out"))
    assert logs.count("-m accelerate.commands.launch") == 2 and "--num_processes 2" in logs
    rewards = []
    for job in ("job_0", "job_1"):
        (row,) = read_metrics(sweep / job)
        assert row["samples"] == 4  # 2 per process: each job ran as a 2-process launch
        assert (sweep / job / "checkpoints" / "epoch_0000" / "pytorch_lora_weights.safetensors").exists()
        rewards.append(row["reward_mean"])
    assert rewards[0] != rewards[1]  # two seeds


def test_a_missing_launcher_plugin_is_one_line_naming_the_install():
    from ddpo_cli.config.compose import config_error_line

    error = Exception("In 'hydra/launcher/slurm': Could not load 'hydra/launcher/submitit_slurm'.")
    assert config_error_line(error) == ("the submitit launchers need hydra-submitit-launcher: pip install "
                                        "'ddpo-cli[cluster]'")
