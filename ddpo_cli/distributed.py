"""How a run spreads over processes. ``accelerate launch --config_file conf/accelerate/<name>.yaml`` decides the
strategy (DDP, FSDP2, DeepSpeed ZeRO, multi-node); this module turns it into an :class:`~accelerate.Accelerator`,
refuses what does not work with one line, runs the backward passes and optimizer steps the strategy's way, and moves
whole weights and optimizer state in and out of the shards for checkpoints.

FSDP2 on a CPU: accelerate drops an FSDP request to plain multi-process (DDP) when its processes run on CPUs. The
request is then restored on accelerate's own state, so ``accelerator.prepare`` shards the denoiser through the same
``fully_shard`` path a GPU run takes (gloo instead of NCCL). This is how the FSDP2 tests run on this CPU-only machine.
DeepSpeed on a CPU runs its own CPU accelerator over gloo, but accelerate then counts one process; the counts are
restored from the process group.

DeepSpeed's engine owns the update: gradients are reduced when the engine is told a backward pass is the last one
before a step (:func:`micro_step`), it clips and steps (:func:`optimizer_step`), and its optimizer state is saved in
its own per-process files (:func:`save_deepspeed_state`), which only a DeepSpeed run with as many processes resumes.

Checkpoints hold whole tensors: every process takes part in gathering them (:func:`whole_weights`,
:func:`whole_optimizer_state`), the main process writes one file, and a resumed run loads that file into the
unsharded model before ``prepare`` and the optimizer state after it (each process keeps its own shard).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, gather_object

from .errors import UserError

DEEPSPEED_TAG = "optimizer"  # checkpoints/epoch_XXXX/deepspeed/optimizer/: DeepSpeed's per-process state files


def env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def make_accelerator(precision: str, cpu: bool, project_dir: str, log_with: str | None) -> Accelerator:
    """The run's Accelerator, with the strategy its launch config asked for; UserError for one that cannot run."""
    refuse_unsupported_launch()
    deepspeed = env_flag("ACCELERATE_USE_DEEPSPEED")  # accelerate sets DeepSpeed up only when not told "cpu"
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu and not deepspeed, project_dir=project_dir,
                              log_with=log_with)
    if env_flag("ACCELERATE_USE_FSDP") and accelerator.distributed_type == DistributedType.MULTI_CPU:
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the launch config's env
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState sets it
    if uses_deepspeed(accelerator):
        if accelerator.num_processes != torch.distributed.get_world_size():  # a CPU run: accelerate counted one
            counts = {"num_processes": torch.distributed.get_world_size(),
                      "process_index": torch.distributed.get_rank(),
                      "local_process_index": int(os.environ.get("LOCAL_RANK", 0))}
            PartialState._shared_state.update(counts)
            AcceleratorState._shared_state.update(counts)
        # accelerate registers its DeepSpeed config with transformers, whose from_pretrained then partitions every
        # model it loads under ZeRO-3: the frozen text encoders and reward models must load whole
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return accelerator


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    """The DeepSpeed ZeRO stage (0 without DeepSpeed)."""
    return accelerator.state.deepspeed_plugin.zero_stage if uses_deepspeed(accelerator) else 0


def configure_deepspeed(accelerator: Accelerator, micro_batch: int, max_grad_norm: float) -> None:
    """Before ``prepare``: DeepSpeed's batch and clipping settings from ``train.*`` (ddpo decides when a step
    happens, so the engine's own accumulation count stays 1)."""
    if uses_deepspeed(accelerator):
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1,
            train_batch_size=micro_batch * accelerator.num_processes, gradient_clipping=max_grad_norm)


def accelerate_has_fsdp2() -> bool:
    """Whether the installed accelerate knows FSDP2 (its FSDP plugin takes ``fsdp_version``)."""
    import dataclasses

    return "fsdp_version" in {f.name for f in dataclasses.fields(FullyShardedDataParallelPlugin)}


def refuse_unsupported_launch() -> None:
    """FSDP1, FSDP2 on an accelerate without it, and DeepSpeed when it is not installed are refused before any
    process group exists."""
    if env_flag("ACCELERATE_USE_FSDP") and not accelerate_has_fsdp2():
        import accelerate

        raise UserError(f"FSDP2 needs a newer accelerate than {accelerate.__version__} (its FSDP plugin has no "
                        f"fsdp_version): pip install -U accelerate")
    if env_flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("this launch config asks for FSDP version 1: ddpo-cli shards with FSDP2; set "
                        "fsdp_config.fsdp_version: 2 (conf/accelerate/fsdp2.yaml)")
    if env_flag("ACCELERATE_USE_DEEPSPEED"):
        import importlib.util

        if int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")) not in (1, 2, 3):
            raise UserError("this launch config asks for DeepSpeed ZeRO stage "
                            f"{os.environ['ACCELERATE_DEEPSPEED_ZERO_STAGE']}: use 1, 2 or 3 (or multi_gpu.yaml "
                            f"for plain DDP)")
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError("this launch config asks for DeepSpeed, which is not installed: pip install "
                            "'ddpo-cli[deepspeed]' (or launch with conf/accelerate/fsdp2.yaml)")


def strategy(accelerator: Accelerator) -> str:
    """``"FSDP2 (denoiser fully sharded), 2 processes on 1 machine"``: the startup table's line."""
    kind = accelerator.distributed_type
    name = {DistributedType.FSDP: "FSDP2 (denoiser fully sharded)", DistributedType.NO: "one process",
            DistributedType.DEEPSPEED: f"DeepSpeed ZeRO-{zero_stage(accelerator)}"}.get(
        kind, "DDP (weights replicated)")
    machines = accelerator.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return name if kind == DistributedType.NO else \
        f"{name}, {accelerator.num_processes} processes on {machines} machine{'s' if machines > 1 else ''}"


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the denoiser's weights are split over processes, so every process must run each of its forward
    passes (an all-gather) in step with the others."""
    return accelerator.distributed_type == DistributedType.FSDP or zero_stage(accelerator) == 3


def parameter_count(params: list[torch.Tensor]) -> int:
    """Elements of ``params`` as the whole model has them (a ZeRO-3 parameter is an empty stand-in for its shard)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in params)


@contextmanager
def micro_step(accelerator: Accelerator, denoiser, last: bool):
    """One forward + backward of an optimizer step; gradients are reduced over processes on the ``last`` one only
    (DDP's ``no_sync`` before it; DeepSpeed is told the boundary)."""
    if uses_deepspeed(accelerator):
        denoiser.set_gradient_accumulation_boundary(last)
        yield
    elif last:
        yield
    else:
        with accelerator.no_sync(denoiser):
            yield


def backward(accelerator: Accelerator, denoiser, loss: torch.Tensor) -> None:
    """``loss.backward()`` through the strategy, with the loss as given (the trainer weights its chunks itself)."""
    if uses_deepspeed(accelerator):
        denoiser.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


def optimizer_step(accelerator: Accelerator, denoiser, optimizer, params: list[torch.Tensor], lr: float,
                   max_grad_norm: float, check) -> float:
    """Set the learning rate, clip, ``check(grad_norm)`` (raises to stop the run), step and zero the gradients;
    returns the norm.
    DeepSpeed clips and steps inside its engine, so there the check comes after the step (the checkpoints on disk
    are intact either way)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if uses_deepspeed(accelerator):
        denoiser.step()
        grad_norm = denoiser.get_global_grad_norm()
        check(float("nan") if grad_norm is None else grad_norm)
        return float(grad_norm)
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    check(grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def gathered_prompts(accelerator: Accelerator, prompts: list[str]) -> list[str]:
    """Every process's prompts in rank order."""
    return gather_object(prompts) if accelerator.num_processes > 1 else prompts


def from_main(accelerator: Accelerator, value):
    """The main process's ``value`` on every process (a decision all must follow, e.g. to stop)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


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
    if any(hasattr(p, "ds_id") for p in denoiser.parameters()):
        return zero3_whole_weights(denoiser, trainable_only)
    if trainable_only:
        return {name: whole(p) for name, p in denoiser.named_parameters() if p.requires_grad}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(denoiser, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def zero3_whole_weights(denoiser: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """:func:`whole_weights` of a ZeRO-3 model, gathered one module at a time (never the whole model at once)."""
    from deepspeed.runtime.zero import GatheredParameters

    weights = {}
    for module_name, module in denoiser.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = [(name, p) for name, p in module.named_parameters(recurse=False) if p.requires_grad or not trainable_only]
        with GatheredParameters([p for _, p in own]):
            weights.update({prefix + name: p.detach().cpu().clone() for name, p in own})
        if not trainable_only:
            weights.update({prefix + name: b.detach().cpu().clone() for name, b in module.named_buffers(recurse=False)
                            if name not in module._non_persistent_buffers_set})
    return weights


def save_deepspeed_state(denoiser, folder: Path, trainable_only: bool) -> dict:
    """Every process writes its shard of DeepSpeed's optimizer state into ``folder``; returns the marker that the
    checkpoint's state file keeps in place of a torch optimizer state."""
    denoiser.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, save_latest=False,
                             exclude_frozen_parameters=trainable_only)
    return {"deepspeed": DEEPSPEED_TAG}


def load_deepspeed_state(denoiser, folder: Path) -> None:
    """Each process's shard of the optimizer state (and the trained weights again) from
    :func:`save_deepspeed_state`."""
    path, _ = denoiser.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise ValueError(f"no DeepSpeed state in {folder}")


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
