"""A sweep job on a cluster (Hydra's submitit launcher) that asks for more than one GPU: it runs as an
``accelerate launch`` of itself, one per node, with the accelerate config ``accelerate_config`` names.

Hydra starts each job's function once per task. With ``hydra.launcher.tasks_per_node=1`` (as ``hydra/launcher=slurm``
sets) that is one task per node; the task composes ``accelerate launch --num_processes <GPUs of all nodes>
--num_machines <nodes> --machine_rank <this node> --main_process_ip <first node> -m ddpo_cli train <the job's
overrides>`` and waits for it. The node ranks and hosts come from submitit's job environment; the rendezvous port from
the job id, so that every node of a job computes the same one.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .config import conf_dir
from .config.compose import LAUNCH_CONFIGS
from .errors import UserError

RELAUNCHED = "DDPO_JOB_DIR"  # set for the processes of a relaunch: the job folder they continue


def requested_gpus(launcher) -> tuple[int, int, int]:
    """``(GPUs per node, nodes, tasks per node)`` a Hydra launcher config asks for (1, 1, 1 when it says nothing)."""
    get = (lambda key: launcher.get(key)) if hasattr(launcher, "get") else (lambda key: getattr(launcher, key, None))
    return int(get("gpus_per_node") or 1), int(get("nodes") or 1), int(get("tasks_per_node") or 1)


def accelerate_config_path(name: str) -> Path:
    """``multi_gpu`` -> conf/accelerate/multi_gpu.yaml; a path as given. UserError if there is no such file."""
    path = Path(name).expanduser() if name.endswith(".yaml") else conf_dir() / LAUNCH_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (conf_dir() / LAUNCH_CONFIGS).glob("*.yaml")))
        raise UserError(f"accelerate_config={name!r}: no such file; choose {known} or give a .yaml path")
    return path


def rendezvous_port(job_id: str) -> int:
    """A port every node of the job derives alike (29500-39499, from the job id's digits)."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 29500 + int(digits) % 10000


def accelerate_command(overrides: list[str], job_dir: Path, config_file: Path, gpus_per_node: int, nodes: int,
                       node_rank: int, main_host: str, port: int) -> list[str]:
    """The command one node of a multi-GPU job runs."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "--num_processes", str(gpus_per_node * nodes), "--num_machines", str(nodes),
            "--machine_rank", str(node_rank), "--main_process_ip", main_host, "--main_process_port", str(port),
            "-m", "ddpo_cli", "train", *[o for o in overrides if not o.startswith("hydra.")],
            f"hydra.run.dir={job_dir}"]


def relaunch_if_multi_gpu(cfg, hydra_config) -> bool:
    """Run this job as an accelerate launch when its launcher asks for more than one GPU; True when it did (the job
    is then done). False outside a submitit job, for one GPU, and inside a launch already."""
    if os.environ.get(RELAUNCHED) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False
    launcher = hydra_config.get("launcher") if hasattr(hydra_config, "get") else None
    if launcher is None or "submitit" not in str(launcher.get("_target_", "")):
        return False
    gpus_per_node, nodes, tasks_per_node = requested_gpus(launcher)
    if gpus_per_node * nodes <= 1:
        return False
    if tasks_per_node != 1:
        raise UserError(f"hydra.launcher.tasks_per_node={tasks_per_node}: use 1 (ddpo starts one accelerate launch per "
                        f"node, which starts a process per GPU)")
    import submitit  # deferred: only sweep jobs on a submitit launcher get here

    job = submitit.JobEnvironment()
    job_dir = Path(hydra_config.runtime.output_dir)
    command = accelerate_command(list(hydra_config.overrides.task), job_dir, accelerate_config_path(cfg.accelerate_config),
                                 gpus_per_node, nodes, job.node, job.hostnames[0], rendezvous_port(job.job_id))
    print(f"job {job.job_id} node {job.node}: {' '.join(command)}", flush=True)
    result = subprocess.run(command, env={**os.environ, RELAUNCHED: str(job_dir)})
    if result.returncode != 0:
        raise UserError(f"the accelerate launch of job {job.job_id} (node {job.node}) exited with code "
                        f"{result.returncode}: its output is in the job's log under {job_dir}")
    return True
