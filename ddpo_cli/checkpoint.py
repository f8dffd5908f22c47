"""Checkpoints: ``checkpoints/epoch_XXXX/`` with the denoiser's weights in the family's diffusers format plus the
resume state (layout and lookup in :mod:`ddpo_cli.runs`).

Writes go to a hidden staging folder that is renamed into place, so a crash mid-write leaves the previous
checkpoint intact. Only the main process writes; every process calls :func:`save` (it gathers sharded weights and
holds the barriers). The files hold whole tensors whatever the strategy (:mod:`ddpo_cli.distributed`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .distributed import (load_deepspeed_state, load_optimizer_state, save_deepspeed_state, uses_deepspeed,
                          whole_optimizer_state, whole_weights)
from .errors import UserError, brief
from .models import ModelFamily
from .old_policy import OldPolicy
from .runs import STATE_FILE, checkpoint_dir, list_checkpoints, read_state

BEST_DIR = "best"  # checkpoints/best/: the checkpoint of the best check by checkpoint.best_by
DEEPSPEED_DIR = "deepspeed"  # a checkpoint's DeepSpeed optimizer state, one file per process


def write_weights(model: ModelFamily, denoiser, folder: Path, use_lora: bool,
                  weights: dict[str, torch.Tensor] | None = None) -> None:
    """The denoiser's weights in its family's diffusers format (``weights``: whole tensors gathered from shards)."""
    if use_lora:
        model.save_lora(denoiser, folder, weights)
    else:
        model.save_full(denoiser, folder, weights)


def save(accelerator, model: ModelFamily, denoiser, optimizer, state: dict, run_dir: Path, epoch: int,
         use_lora: bool, keep_last: int | None, old_policy: OldPolicy | None = None) -> Path:
    """Write checkpoint ``epoch`` atomically on the main process; all processes gather and wait for it (and the
    algorithm's old policy, if it keeps one)."""
    final = checkpoint_dir(run_dir, epoch)
    staging = final.parent / f".{final.name}.tmp"
    unwrapped = accelerator.unwrap_model(denoiser)
    weights = whole_weights(unwrapped, trainable_only=use_lora)  # every process: the shards are gathered
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    if uses_deepspeed(accelerator):  # each process writes its own shard of DeepSpeed's optimizer state
        optimizer_state = save_deepspeed_state(denoiser, staging / DEEPSPEED_DIR, trainable_only=use_lora)
    else:
        optimizer_state = whole_optimizer_state(unwrapped, optimizer)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            staging.mkdir(parents=True, exist_ok=True)
            write_weights(model, unwrapped, staging, use_lora, weights)
            torch.save({**state, "epoch": epoch, "optimizer": optimizer_state}, staging / STATE_FILE)
            if old_policy is not None:
                old_policy.save(staging)
        except OSError as exc:  # a full disk or a folder made read-only: the earlier checkpoints stay as they were
            shutil.rmtree(staging, ignore_errors=True)
            raise UserError(f"cannot write checkpoint {final} ({exc.strerror or exc}): free some space, then resume "
                            f"with resume={run_dir} (the earlier checkpoints are intact)") from None
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        prune(run_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def keep_as_best(saved: Path) -> Path:
    """``checkpoints/best/``: the same files as the checkpoint ``saved`` (hard links where the filesystem has them,
    so it costs no space and outlives the pruning of ``saved``), replaced atomically."""
    best = saved.parent / BEST_DIR
    staging = saved.parent / f".{BEST_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)

    def link_or_copy(source, target):
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    shutil.copytree(saved, staging, copy_function=link_or_copy)
    old = saved.parent / f".{BEST_DIR}.old"
    if best.exists():
        best.rename(old)
    staging.rename(best)
    shutil.rmtree(old, ignore_errors=True)
    return best


def prune(run_dir: Path, keep_last: int | None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (None keeps all)."""
    if keep_last is None:
        return
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_weights(model: ModelFamily, denoiser, checkpoint: Path, use_lora: bool) -> None:
    """Load a checkpoint's weights into a denoiser that already has the matching LoRA adapter (or full weights).
    UserError if they are unreadable, do not fit this model, or hold NaN / inf."""
    if use_lora:
        model.load_lora(denoiser, checkpoint)
    else:
        model.load_full(denoiser, checkpoint)
    trainable = [p for p in denoiser.parameters() if p.requires_grad] or list(denoiser.parameters())
    if not all(bool(torch.isfinite(p).all()) for p in trainable):
        raise UserError(f"{checkpoint} holds NaN/inf weights: use an earlier checkpoint")


def resume(model: ModelFamily, denoiser, requested: Path, use_lora: bool) -> tuple[Path, dict, list[str]]:
    """Load the newest readable checkpoint of ``requested`` (a run folder; or exactly the checkpoint folder given)
    into the (not yet sharded) ``denoiser``; its optimizer state, in the returned state, goes in after ``prepare``
    (:func:`restore_optimizer`). Returns its path, its state and one line per newer checkpoint skipped as
    unreadable. UserError if none can be loaded."""
    requested = Path(requested)
    candidates = [requested] if (requested / STATE_FILE).exists() else list_checkpoints(requested)[::-1]
    skipped = []
    for path in candidates:
        try:
            state = read_state(path)
            if not isinstance(state.get("optimizer"), dict):
                raise KeyError("no optimizer state")
            load_weights(model, denoiser, path, use_lora)
        except (UserError, ValueError, KeyError, RuntimeError) as exc:
            skipped.append(f"{path.name}: {brief(exc, 240)}")
            continue
        return path, state, skipped
    raise UserError(f"cannot resume from {requested}: {skipped[0] if skipped else 'no checkpoint'}; resume with the "
                    f"model and model.lora settings of the run that wrote it")


def restore_old_policy(old_policy: OldPolicy | None, path: Path) -> None:
    """The old policy's weights of checkpoint ``path`` (for an algorithm that keeps one)."""
    if old_policy is None:
        return
    try:
        old_policy.load(path)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{path} has no old policy this run can use ({brief(exc, 200)}): resume a run of the same "
                        f"algorithm and model settings") from None


def restore_optimizer(accelerator, denoiser, optimizer, state: dict, path: Path) -> None:
    """The optimizer state of checkpoint ``path`` into this process's optimizer (and its shard of it);
    ``denoiser`` as ``accelerator.prepare`` returned it."""
    written_by_deepspeed = "deepspeed" in state["optimizer"]
    if written_by_deepspeed != uses_deepspeed(accelerator):
        how = "under DeepSpeed (conf/accelerate/deepspeed_zero*.yaml)" if written_by_deepspeed else "without DeepSpeed"
        raise UserError(f"{path} was written {how}: resume it the same way, with as many processes")
    try:
        if written_by_deepspeed:
            load_deepspeed_state(denoiser, path / DEEPSPEED_DIR)
        else:
            load_optimizer_state(accelerator.unwrap_model(denoiser), optimizer, state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"the optimizer state of {path} does not fit this run ({brief(exc, 200)}): resume with the "
                        f"model, model.lora and train settings of the run that wrote it") from None
