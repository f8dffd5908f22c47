"""How a run spreads over processes. ``accelerate launch --config_file conf/accelerate/<name>.yaml`` decides the
strategy (DDP, FSDP2, multi-node); this module turns it into an :class:`~accelerate.Accelerator`, refuses what does not
work with one line, and moves whole weights and optimizer state in and out of the shards for checkpoints.

FSDP2 on a CPU: accelerate drops an FSDP request to plain multi-process (DDP) when its processes run on CPUs. The
request is then restored on accelerate's own state, so ``accelerator.prepare`` shards the denoiser through the same
``fully_shard`` path a GPU run takes (gloo instead of NCCL). This is how the FSDP2 tests run on this CPU-only machine.

Checkpoints hold whole tensors: every process takes part in gathering them (:func:`whole_weights`,
:func:`whole_optimizer_state`), the main process writes one file, and a resumed run loads that file into the
unsharded model before ``prepare`` and the optimizer state after it (each process keeps its own shard).
"""
from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, gather_object

from .errors import UserError


def env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def make_accelerator(precision: str, cpu: bool, project_dir: str, log_with: str | None) -> Accelerator:
    """The run's Accelerator, with the strategy its launch config asked for; UserError for one that cannot run."""
    refuse_unsupported_launch()
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu, project_dir=project_dir, log_with=log_with)
    if env_flag("ACCELERATE_USE_FSDP") and accelerator.distributed_type == DistributedType.MULTI_CPU:
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the launch config's env
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState sets it
    return accelerator


def accelerate_has_fsdp2() -> bool:
    """Whether the installed accelerate knows FSDP2 (its FSDP plugin takes ``fsdp_version``)."""
    import dataclasses

    return "fsdp_version" in {f.name for f in dataclasses.fields(FullyShardedDataParallelPlugin)}


def refuse_unsupported_launch() -> None:
    """FSDP1, FSDP2 on an accelerate without it, and DeepSpeed are refused before any process group exists."""
    if env_flag("ACCELERATE_USE_FSDP") and not accelerate_has_fsdp2():
        import accelerate

        raise UserError(f"FSDP2 needs a newer accelerate than {accelerate.__version__} (its FSDP plugin has no "
                        f"fsdp_version): pip install -U accelerate")
    if env_flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("this launch config asks for FSDP version 1: ddpo-cli shards with FSDP2; set "
                        "fsdp_config.fsdp_version: 2 (conf/accelerate/fsdp2.yaml)")
    if env_flag("ACCELERATE_USE_DEEPSPEED"):
        # accelerate's DeepSpeed engine steps the optimizer inside backward(); an update of ddpo train is several
        # backward passes (chunks of pairs) and one step, and its checkpoints gather torch optimizer state
        raise UserError("ddpo train does not run under DeepSpeed: launch with conf/accelerate/fsdp2.yaml, which "
                        "shards weights, gradients and optimizer state as ZeRO-3 does")


def strategy(accelerator: Accelerator) -> str:
    """``"FSDP2 (denoiser fully sharded), 2 processes on 1 machine"``: the startup table's line."""
    kind = accelerator.distributed_type
    name = {DistributedType.FSDP: "FSDP2 (denoiser fully sharded)", DistributedType.NO: "one process"}.get(
        kind, "DDP (weights replicated)")
    machines = accelerator.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return name if kind == DistributedType.NO else \
        f"{name}, {accelerator.num_processes} processes on {machines} machine{'s' if machines > 1 else ''}"


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the denoiser's weights are split over processes, so every process must run each of its forward
    passes (an all-gather) in step with the others."""
    return accelerator.distributed_type == DistributedType.FSDP


def gathered_prompts(accelerator: Accelerator, prompts: list[str]) -> list[str]:
    """Every process's prompts in rank order."""
    return gather_object(prompts) if accelerator.num_processes > 1 else prompts


def mean_over_processes(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the processes (one all-reduce for all of them)."""
    reduced = accelerator.reduce(torch.tensor(list(values.values()), device=accelerator.device), "mean")
    return dict(zip(values, reduced.tolist()))


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter as one whole CPU tensor (a DTensor shard is gathered: every process must call this)."""
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return full.detach().cpu()


def whole_weights(denoiser: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The denoiser's weights as whole CPU tensors under their module names; every process calls it (a gather).
    ``trainable_only`` (LoRA): just the trained ones, so a checkpoint never gathers the frozen base model."""
    if trainable_only:
        return {name: whole(p) for name, p in denoiser.named_parameters() if p.requires_grad}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(denoiser, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def raw_optimizer(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def whole_optimizer_state(denoiser: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state, whole, keyed by parameter name (the same file for one process, DDP and FSDP2, so a
    run can resume under another strategy); every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(denoiser, raw_optimizer(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(denoiser: torch.nn.Module, optimizer, state: dict) -> None:
    """Load a whole optimizer state (:func:`whole_optimizer_state`; or a checkpoint of an older ddpo-cli, keyed by
    position) into this process's optimizer and shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if all(isinstance(key, int) for key in state["state"]):
        raw_optimizer(optimizer).load_state_dict(state)
        return
    set_optimizer_state_dict(denoiser, raw_optimizer(optimizer), state,
                             options=StateDictOptions(full_state_dict=True))
