"""Checkpoints: ``checkpoints/epoch_XXXX/`` with the LoRA in diffusers format plus the resume state.

Layout of one checkpoint::

    pytorch_lora_weights.safetensors   # plain `pipe.load_lora_weights(dir)` loads it   (LoRA runs)
    unet/                              # UNet2DConditionModel.save_pretrained            (full fine-tuning)
    training_state.pt                  # optimizer, epoch, global step, stat tracker     (torch.load weights_only)

Writes go to a hidden staging folder that is renamed into place, so a crash mid-write leaves the previous
checkpoint intact. Only the main process writes; every process calls :func:`save` (it holds the barriers).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from .errors import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"
STATE_FILE = "training_state.pt"
PATTERN = re.compile(r"^epoch_(\d{4,})$")


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"epoch_{epoch:04d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (by epoch number)."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("epoch_*") if PATTERN.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint). UserError if there is none."""
    path = Path(path).expanduser()
    if (path / STATE_FILE).exists():
        return path
    if not path.exists():
        raise UserError(f"resume path '{path}' does not exist: give a run directory or one of its checkpoints/epoch_*")
    found = list_checkpoints(path)
    if not found:
        raise UserError(f"no checkpoint under '{path}': give a run directory that holds checkpoints/epoch_*")
    return found[-1]


def run_dir_of(checkpoint: Path) -> Path:
    """``<run>/checkpoints/epoch_XXXX`` -> ``<run>``."""
    return Path(checkpoint).parent.parent


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights in diffusers' key format (``unet.``-prefixed keys are added by the saver)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def write_model(unet, folder: Path, use_lora: bool) -> None:
    from diffusers import StableDiffusionPipeline

    if use_lora:
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers={k: v.detach().float().cpu() for k, v in lora_state_dict(unet).items()},
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(), safe_serialization=True)
    else:
        unet.save_pretrained(folder / "unet", safe_serialization=True)


def save(accelerator, unet, optimizer, state: dict, run_dir: Path, epoch: int, use_lora: bool,
         keep_last: int | None) -> Path:
    """Write checkpoint ``epoch`` atomically on the main process; all processes wait for it."""
    final = checkpoint_dir(run_dir, epoch)
    optimizer_state = optimizer.state_dict()  # every rank (ZeRO-style optimizers gather here)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        staging = final.parent / f".{final.name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write_model(accelerator.unwrap_model(unet), staging, use_lora)
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


def load_model(unet, checkpoint: Path, use_lora: bool) -> None:
    """Load a checkpoint's weights into a UNet that already has the matching LoRA adapter (or full weights)."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    if use_lora:
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        if not (checkpoint / LORA_FILE).exists():
            raise UserError(f"{checkpoint} has no {LORA_FILE}: it was saved by a full fine-tuning run; "
                            f"resume with model.use_lora=false")
        weights = load_file(checkpoint / LORA_FILE)
        weights = {k.removeprefix("unet."): v for k, v in weights.items() if k.startswith("unet.")}
        result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(weights), adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise UserError(f"{checkpoint} does not match this model's LoRA ({len(unexpected)} unexpected keys): "
                            f"use the same model.lora settings as the run that wrote it")
    else:
        from diffusers import UNet2DConditionModel

        if not (checkpoint / "unet").exists():
            raise UserError(f"{checkpoint} has no unet/ folder: it was saved by a LoRA run; resume with "
                            f"model.use_lora=true")
        source = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
        unet.load_state_dict(source.state_dict())
