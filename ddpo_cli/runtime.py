"""Device, precision, seeds and library quieting: what ``ddpo train``, ``ddpo sample`` and ``ddpo eval`` share.

Precision names follow accelerate (``no`` = fp32, ``fp16``, ``bf16``). The frozen weights (VAE, text encoders,
denoiser base weights) are stored in the compute dtype; LoRA parameters and the sampler maths stay fp32.
"""
from __future__ import annotations

import hashlib
import random
from contextlib import nullcontext
from pathlib import Path

import torch

from .errors import UserError

PRECISIONS = ("auto", "no", "fp16", "bf16")
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda")


def derive_seed(*keys) -> int:
    """A stable 63-bit seed from any keys (same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


def epoch_randomness(seed: int, epoch: int, rank: int, device) -> tuple[random.Random, torch.Generator]:
    """A process's prompt RNG and noise generator for ``epoch``: a function of (seed, epoch, rank) only, so a resumed
    run draws what the uninterrupted run drew."""
    rng = random.Random(derive_seed(seed, epoch, rank, "prompts"))
    generator = torch.Generator(device).manual_seed(derive_seed(seed, epoch, rank, "noise"))
    return rng, generator


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu. UserError for an unknown name or a missing GPU."""
    if name not in DEVICES:
        raise UserError(f"device={name!r}: choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but torch sees no CUDA GPU: use device=auto or device=cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_tf32(device: torch.device, allowed: bool) -> None:
    """TF32 matmuls and convolutions on CUDA (Ampere and newer: ~2x faster fp32 with 10-bit mantissas)."""
    if device.type == "cuda" and allowed:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX-512 BF16 or AMX), where bf16 autocast is fast."""
    flags = Path("/proc/cpuinfo")
    if flags.exists():
        text = flags.read_text(errors="ignore")
        return " avx512_bf16" in text or " amx_bf16" in text
    return False


def resolve_precision(name: str, device: torch.device, key: str = "precision") -> str:
    """``auto`` -> bf16 on CUDA with bf16 support, fp16 on other CUDA, ``no`` (fp32) on CPU. An explicit choice
    the device cannot run is a UserError (fp16 on a CPU; bf16 on a CPU without bf16 units)."""
    if name not in PRECISIONS:
        raise UserError(f"{key}={name!r}: choose auto, no, fp16 or bf16")
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if device.type == "cpu" and name == "fp16":
        raise UserError(f"{key}=fp16 needs a CUDA GPU: on a CPU use {key}=no"
                        f"{' or bf16 (this CPU has bf16 units)' if cpu_has_bf16() else ''}")
    if device.type == "cpu" and name == "bf16" and not cpu_has_bf16():
        raise UserError(f"{key}=bf16: this CPU has no bf16 units (AVX-512 BF16 / AMX), so bf16 would be slower than "
                        f"fp32: use {key}=no")
    return name


def precision_rows(precision: str, device: torch.device) -> list[tuple[str, str]]:
    """Start-up table rows that say what runs in which precision."""
    if precision == "no":
        return [("device / precision", f"{device} / fp32")]
    return [("device / precision", f"{device} / {precision} autocast, frozen weights {precision}; LoRA, optimizer "
                                   f"and sampler maths fp32")]


def set_threads(threads: int | None) -> None:
    """Torch CPU threads (None keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def quiet_libraries() -> None:
    """No progress bars or info logs from diffusers / transformers (ours are rich)."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.disable_progress_bar()
        library.utils.logging.set_verbosity_error()


def transformers_dtype(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s precision argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers  # deferred: only models loaded through transformers need it

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def autocast(device: torch.device, dtype: torch.dtype):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
