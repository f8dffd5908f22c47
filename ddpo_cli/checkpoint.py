"""Checkpoints: ``checkpoints/epoch_XXXX/`` with the denoiser's weights in the family's diffusers format plus the
resume state (layout and lookup in :mod:`ddpo_cli.runs`).

Writes go to a hidden staging folder that is renamed into place, so a crash mid-write leaves the previous
checkpoint intact. Only the main process writes; every process calls :func:`save` (it holds the barriers).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .models import ModelFamily
from .runs import STATE_FILE, checkpoint_dir, list_checkpoints


def write_weights(model: ModelFamily, denoiser, folder: Path, use_lora: bool) -> None:
    if use_lora:
        model.save_lora(denoiser, folder)
    else:
        model.save_full(denoiser, folder)


def save(accelerator, model: ModelFamily, denoiser, optimizer, state: dict, run_dir: Path, epoch: int,
         use_lora: bool, keep_last: int | None) -> Path:
    """Write checkpoint ``epoch`` atomically on the main process; all processes wait for it."""
    final = checkpoint_dir(run_dir, epoch)
    optimizer_state = optimizer.state_dict()  # every rank (ZeRO-style optimizers gather here)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        staging = final.parent / f".{final.name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write_weights(model, accelerator.unwrap_model(denoiser), staging, use_lora)
        torch.save({**state, "epoch": epoch, "optimizer": optimizer_state}, staging / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        prune(run_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def prune(run_dir: Path, keep_last: int | None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (None keeps all)."""
    if keep_last is None:
        return
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_state(checkpoint: Path) -> dict:
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)


def load_weights(model: ModelFamily, denoiser, checkpoint: Path, use_lora: bool) -> None:
    """Load a checkpoint's weights into a denoiser that already has the matching LoRA adapter (or full weights)."""
    if use_lora:
        model.load_lora(denoiser, checkpoint)
    else:
        model.load_full(denoiser, checkpoint)
