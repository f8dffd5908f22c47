"""``ddpo plan``: what a training run will need, before it runs. The model is built on the meta device from its
configs (:mod:`ddpo_cli.models.meta`: no download, no memory), prepared as for training, and measured: parameters
per module, the activations one training chunk keeps for backward, the conditioning cache. The per-GPU memory is
the formula of :mod:`ddpo_cli.memory`; seconds per epoch come from a benchmark file when one is given.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from .config import plan_run
from .errors import UserError
from .memory import GIB, MemoryInputs, cache_bytes, memory_terms
from .models import resolve_model_path
from .models.meta import meta_model, training_activations
from .reference import needs_reference
from .report import console, startup_table
from .runtime import PRECISIONS, WEIGHT_DTYPES, quiet_libraries

# what each --strategy splits over the GPUs: (weights, gradients and optimizer state, DeepSpeed's fp32 master copy)
STRATEGIES = {"ddp": (False, False, False), "fsdp2": (True, True, False), "zero2": (False, True, True),
              "zero3": (True, True, True)}


def component_rows(model) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """One row per pipeline module (trainable / frozen parameters); the counts by role."""
    rows, counts = [], {"trainable": 0, "frozen_denoiser": 0, "encoders_and_vae": 0, "buffer_bytes": 0}
    for name, module in model.pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        counts["buffer_bytes"] += sum(b.numel() * b.element_size() for b in module.buffers())
        rows.append((f"  {name} ({type(module).__name__})", f"{trainable:,} trainable, {frozen:,} frozen"))
        if module is model.denoiser:
            counts["trainable"], counts["frozen_denoiser"] = trainable, frozen
        else:
            counts["encoders_and_vae"] += trainable + frozen
    return rows, counts


def largest_block(denoiser) -> int:
    """Parameters of the largest block FSDP2 shards as one unit (the classes in ``_no_split_modules``)."""
    names = set(getattr(denoiser, "_no_split_modules", None) or [])
    sizes = [sum(p.numel() for p in m.parameters()) for m in denoiser.modules() if type(m).__name__ in names]
    return max(sizes, default=sum(p.numel() for p in denoiser.parameters()))


def weight_copies(cfg: DictConfig, run_plan, strategy: str) -> int:
    """Whole copies of the trained weights the run keeps beside them: the old policy (``algo.old_policy``) and full
    fine-tuning's reference (ddpo_cli/reference.py). UserError under a strategy that splits the weights: the
    trainer refuses those runs, ddpo does not shard the copies yet."""
    algo = run_plan.algorithm
    reference = not cfg.model.use_lora and needs_reference(algo, bool(run_plan.preserve))
    copies = int(algo.old_policy is not None) + int(reference)
    if copies and STRATEGIES[strategy][0]:
        raise UserError(f"this run keeps a whole copy of the trained weights (algo={algo.name}'s old policy or full "
                        f"fine-tuning's reference), which ddpo does not shard yet: plan it with --strategy ddp or "
                        f"zero2")
    return copies


def plan_precision(name: str) -> str:
    """The precision a GPU run would use: ``auto`` is bf16 (fp16 on GPUs without bf16: say precision=fp16)."""
    if name not in PRECISIONS:
        raise UserError(f"precision={name!r}: choose auto, no, fp16 or bf16")
    return "bf16" if name == "auto" else name


def epoch_items(cfg: DictConfig, run_plan, items_per_pair: int) -> dict[str, int]:
    """Denoiser batch items per process per epoch: sampling (no graph) and training (forward and backward)."""
    counts, algo = run_plan.counts, run_plan.algorithm
    sampling_per_image = items_per_pair if cfg.sampler.guidance_scale != 1.0 else 1
    sampling = counts.samples_per_process * cfg.sampler.num_steps * sampling_per_image
    pairs = counts.samples_per_process * counts.train_timesteps * cfg.train.num_inner_epochs
    needs_base = any(name.startswith("base_") for name in getattr(algo, "needs", ()))
    return {"sampling": sampling, "training": pairs * items_per_pair,
            "base model (no graph)": pairs * items_per_pair if needs_base else 0}


def seconds_per_epoch(items: dict[str, int], benchmark: Path) -> str:
    """From a ``scripts/benchmark.py`` result of the same model on the target GPU: items per second of sampling and
    of training."""
    try:
        measured = json.loads(Path(benchmark).read_text())
        sample_rate, train_rate = measured["sample_items_per_second"], measured["train_items_per_second"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--benchmark {benchmark}: not a scripts/benchmark.py result with sample_items_per_second "
                        f"and train_items_per_second ({exc})") from None
    seconds = (items["sampling"] + items["base model (no graph)"]) / sample_rate + items["training"] / train_rate
    return f"{seconds:,.1f} s (sampling {sample_rate:g} items/s, training {train_rate:g} items/s, from {benchmark})"


def reward_row(reward) -> tuple[tuple[str, str], int]:
    count = reward.model_parameters()
    if count is None:
        return ("  reward model", f"{reward.name}: not sized here (loads at start-up; whole, fp32, on every GPU)"), 0
    return ("  reward model", f"{reward.name}: {count:,} frozen (fp32, whole on every GPU)"), count


def plan_task(cfg: DictConfig, gpus: int, strategy: str, benchmark: Path | None) -> dict[str, float]:
    """Print the plan of ``cfg`` on ``gpus`` GPUs under ``strategy``; returns the memory terms (bytes per GPU)."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy}: choose {', '.join(STRATEGIES)}")
    if gpus < 1:
        raise UserError(f"--gpus {gpus}: use >= 1")
    quiet_libraries()
    run_plan = plan_run(cfg)
    run_plan.counts = run_plan.counts.for_processes(gpus)
    precision = plan_precision(cfg.precision)
    dtype = WEIGHT_DTYPES[precision]
    weight_bytes = torch.finfo(dtype).bits // 8
    model = meta_model(cfg.model, dtype, resolve_model_path(cfg.model))
    rows, counts = component_rows(model)
    reward, reward_parameters = reward_row(run_plan.reward)
    chunk = cfg.train.batch_size * cfg.train.timesteps_per_forward
    activations, items_per_chunk = training_activations(
        model, chunk, cfg.sampler.guidance_scale if cfg.train.guidance_in_training else 1.0)
    per_prompt = sum(torch.Size(shape).numel() for shape in model.conditioning_shapes().values()) * weight_bytes
    split_weights, split_state, master_copy = STRATEGIES[strategy]
    shards = gpus if split_weights else 1
    terms = memory_terms(MemoryInputs(
        counts["frozen_denoiser"], counts["trainable"], counts["encoders_and_vae"], reward_parameters,
        counts["buffer_bytes"], weight_bytes, shards, gpus if split_state else 1, master_copy,
        largest_block(model.denoiser), activations,
        cache_bytes(len(run_plan.prompts), per_prompt, cfg.model.text_cache_mb),
        weight_copies(cfg, run_plan, strategy)))
    items = epoch_items(cfg, run_plan, items_per_chunk // chunk)
    lora = f"LoRA rank {cfg.model.lora.rank}" if cfg.model.use_lora else "full fine-tuning"
    sharding = f" (denoiser over {shards})" if shards > 1 else ""
    summary = [
        ("model", f"{cfg.model.name} (family {model.family}, {lora}, {model.resolution} px)"),
        ("precision / sharding", f"{precision} frozen weights; {gpus} GPU{'s' * (gpus > 1)}, {strategy}{sharding}; "
                                 f"gradient checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}"),
        ("parameters", ""), *rows, reward,
        (f"memory per GPU (chunk of {chunk} pairs, {items_per_chunk} items)", ""),
        *[(f"  {name}", f"{value / GIB:,.2f} GiB") for name, value in terms.items() if name != "total"],
        ("  total", f"{terms['total'] / GIB:,.2f} GiB (+ CUDA context and allocator slack, ~0.5-1 GiB)"),
        ("samples / epoch", f"{run_plan.counts.samples_per_epoch} ({run_plan.counts.samples_per_process} per GPU)"),
        ("denoiser items / epoch / GPU", ", ".join(f"{k} {v:,}" for k, v in items.items() if v)),
        ("seconds / epoch", seconds_per_epoch(items, benchmark) if benchmark else
         "give --benchmark <scripts/benchmark.py result on the target GPU>"),
    ]
    console.print(startup_table("ddpo plan", summary))
    return terms
