"""What a run folder holds and how to find things in it. Torch-free: the CLI's checks import it before any model.

A run written by ``ddpo train``::

    .hydra/config.yaml                 the resolved training config (RUN_CONFIG)
    metrics.jsonl  reward_curve.png  images/epoch_XXXX.png
    checkpoints/epoch_XXXX/            one folder per saved epoch:
        pytorch_lora_weights.safetensors   LoRA in the family's diffusers format (LORA_FILE)
        unet/ or transformer/              full fine-tuning: the denoiser's save_pretrained folder
        training_state.pt                  optimizer, epoch, global step, stat tracker (STATE_FILE)

A multirun folder of ``ddpo train -m`` holds one run folder per job.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import UserError, brief

try:
    import fcntl
except ImportError:  # not POSIX: run folders are not locked
    fcntl = None

RUN_CONFIG = Path(".hydra") / "config.yaml"
LORA_FILE = "pytorch_lora_weights.safetensors"
STATE_FILE = "training_state.pt"
FULL_WEIGHT_DIRS = ("unet", "transformer")  # the denoiser's folder name in a full fine-tuning checkpoint
CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d{4,})$")


# ----------------------------------------------------------------------------------------------- checkpoints
def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"epoch_{epoch:04d}"


def epoch_of(path: Path) -> int | None:
    """``.../epoch_0003`` -> 3 (None for a folder not named like a checkpoint)."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (by epoch number)."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("epoch_*") if epoch_of(p) is not None and (p / STATE_FILE).exists()]
    return sorted(found, key=epoch_of)


def has_weights(checkpoint: Path) -> bool:
    return (checkpoint / LORA_FILE).exists() or any((checkpoint / d).is_dir() for d in FULL_WEIGHT_DIRS)


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


def read_state(checkpoint: Path, mmap: bool = False) -> dict:
    """The resume state of a checkpoint (tensors and plain data only: ``weights_only``; ``mmap``: tensors are mapped,
    not read, for a look at its epoch and config). UserError if it is unreadable or not a ddpo-cli checkpoint."""
    import torch  # deferred: this module stays torch-free for the CLI's checks

    path = Path(checkpoint) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated, garbage, or not a torch file at all
        raise UserError(f"{path} is unreadable ({brief(exc, 240)})") from None
    missing = {"epoch", "global_step", "optimizer", "stat_tracker"} - set(state if isinstance(state, dict) else {})
    if missing:
        raise UserError(f"{path} lacks {', '.join(sorted(missing))}: not a ddpo-cli checkpoint")
    return state


def run_dir_of(checkpoint: Path) -> Path:
    """``<run>/checkpoints/epoch_XXXX`` -> ``<run>``."""
    return Path(checkpoint).parent.parent


def resolve_checkpoint(run: Optional[str], spec: Any) -> Optional[Path]:
    """``none`` -> None (base model); ``latest`` -> the run's newest checkpoint (None without a run);
    ``3`` / ``epoch_0003`` -> that checkpoint of the run; anything else -> a checkpoint folder."""
    spec = None if spec is None else str(spec)
    if spec is None or spec.lower() in ("none", "base"):
        return None
    if spec == "latest":
        if not run:
            return None
        found = list_checkpoints(Path(run))
        if not found:
            raise UserError(f"no checkpoint under '{run}/checkpoints': train at least one epoch, name one with "
                            f"checkpoint=<epoch dir>, or use checkpoint=none for the base model")
        return found[-1]
    if spec.isdigit() or spec.startswith("epoch_"):
        if not run:
            raise UserError(f"checkpoint={spec} names an epoch: also give run=<run dir>")
        name = f"epoch_{int(spec):04d}" if spec.isdigit() else spec
        path = Path(run) / "checkpoints" / name
    else:
        path = Path(spec).expanduser()
    if not has_weights(path):
        raise UserError(f"checkpoint '{path}' not found (no {LORA_FILE} or {'/'.join(FULL_WEIGHT_DIRS)} folder in it):"
                        f" give latest, none, an epoch number or a checkpoints/epoch_XXXX folder")
    return path


def resolve_checkpoints(run: str, spec: Any) -> list[Path]:
    """``latest`` | ``all`` | a list of epoch numbers, names or folders -> checkpoint folders (oldest first)."""
    if isinstance(spec, str) and spec == "all":
        found = list_checkpoints(Path(run))
        if not found:
            raise UserError(f"no checkpoint under '{run}/checkpoints': train at least one epoch first")
        return found
    specs = list(spec) if isinstance(spec, (list, tuple, ListConfig)) else [spec]
    if not specs:
        raise UserError("checkpoints=[] is empty: give latest, all or a list such as [0,3]")
    paths = [resolve_checkpoint(run, s) for s in specs]
    if any(p is None for p in paths):
        raise UserError("checkpoints lists 'none': the base model is always evaluated, leave it out")
    return paths


# ----------------------------------------------------------------------------------------------- the run folder
LOCK_FILE = ".ddpo.lock"
_held_locks: dict[Path, Any] = {}  # run folder -> open lock file, for as long as this process writes it


def lock_run(run_dir: Path) -> None:
    """Hold ``run_dir`` for this process until it exits: a second process that tries gets a UserError instead of
    interleaving its metrics and checkpoints with ours. Creates the folder; a no-op if this process holds it."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held_locks or fcntl is None:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_FILE, "a+")
    except OSError as exc:
        raise UserError(f"cannot write in the run folder '{run_dir}' ({exc.strerror}): choose a writable place with "
                        f"hydra.run.dir=<folder>") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        raise UserError(f"run folder '{run_dir}' is in use by another ddpo process ({owner}): wait for it to "
                        f"finish, or choose another folder with hydra.run.dir=<folder>") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _held_locks[run_dir] = handle


def holds_a_run(folder: Path) -> bool:
    """Whether ``folder`` exists and holds anything but a lock file."""
    folder = Path(folder)
    return folder.is_dir() and any(p.name != LOCK_FILE for p in folder.iterdir())


def fresh_folder(base: Path) -> Path:
    """Create and return ``base``, or ``base_2``, ``base_3``, ... if it exists (atomic: two processes started in the
    same second get two folders)."""
    base = Path(base)
    for k in range(1, 10_000):
        candidate = base if k == 1 else base.with_name(f"{base.name}_{k}")
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"cannot create the run folder '{candidate}' ({exc.strerror}): choose a writable place "
                            f"with hydra.run.dir=<folder>") from None
    raise UserError(f"could not create a fresh run folder next to '{base}': give one with hydra.run.dir=<folder>")


def supersede_after(run_dir: Path, epoch: int) -> Path | None:
    """Resuming from epoch ``epoch`` when later checkpoints exist: move them into ``superseded/<time>/`` (nothing is
    deleted) and return that folder, so that "latest" is the resumed run's own next checkpoint."""
    later = [p for p in list_checkpoints(run_dir) if epoch_of(p) > epoch]
    if not later:
        return None
    target = fresh_folder(Path(run_dir) / "superseded" / time.strftime("%Y%m%d-%H%M%S"))
    for path in later:
        path.rename(target / path.name)
    return target


# ----------------------------------------------------------------------------------------------- run config
def load_run_config(run: str | Path) -> DictConfig:
    """The resolved training config of a run directory (its ``.hydra/config.yaml``)."""
    path = Path(run).expanduser()
    if not path.is_dir():
        raise UserError(f"run directory '{run}' does not exist: give a folder written by `ddpo train`")
    if not (path / RUN_CONFIG).exists():
        raise UserError(f"'{run}' is not a run directory (no {RUN_CONFIG}): give a folder written by `ddpo train`")
    try:
        config = OmegaConf.load(path / RUN_CONFIG)
    except Exception as exc:  # YAML syntax, duplicate keys, not text
        reason = brief(exc, 160)
        raise UserError(f"{path / RUN_CONFIG} is not a readable config ({reason})") from None
    if not isinstance(config, DictConfig):
        raise UserError(f"{path / RUN_CONFIG} is not a run config (a YAML mapping)")
    return OmegaConf.create(moved_targets(OmegaConf.to_container(config, resolve=False)))


MOVED_TARGETS = {  # _target_s that runs written by earlier versions name -> where that code lives now
    "ddpo_cli.prompt_synthesis.LLMPromptSet": "ddpo_cli.prompts.synthesis.LLMPromptSet",
    "ddpo_cli.prompt_benchmarks.parti_prompts": "ddpo_cli.prompts.parti_prompts",
    "ddpo_cli.prompt_benchmarks.drawbench": "ddpo_cli.prompts.drawbench",
    "ddpo_cli.geneval_prompts.geneval": "ddpo_cli.prompts.geneval",
    "ddpo_cli.geneval_prompts.shapes_geneval": "ddpo_cli.toyworld.prompts.shapes_geneval",
    "ddpo_cli.geneval_prompts.shapes_geneval_heldout": "ddpo_cli.toyworld.prompts.shapes_geneval_heldout",
}


def moved_targets(node: Any) -> Any:
    """A config container with every moved ``_target_`` (:data:`MOVED_TARGETS`) renamed."""
    if isinstance(node, dict):
        return {key: MOVED_TARGETS.get(value, value) if key == "_target_" else moved_targets(value)
                for key, value in node.items()}
    return [moved_targets(value) for value in node] if isinstance(node, list) else node


# ----------------------------------------------------------------------------------------------- sweeps
def sweep_job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders of a multirun dir, in job-number order. UserError if there are none."""
    sweep_dir = Path(sweep_dir).expanduser()
    if not sweep_dir.is_dir():
        raise UserError(f"sweep directory '{sweep_dir}' does not exist: give the folder of a `ddpo train -m` run")
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / RUN_CONFIG).exists()]
    if not jobs:
        raise UserError(f"no job folders (with {RUN_CONFIG}) in '{sweep_dir}': give the folder of a `ddpo train -m` "
                        f"run (hydra.sweep.dir)")
    return sorted(jobs, key=_job_number)


def _job_number(path: Path) -> tuple[int, str]:
    match = re.search(r"(\d+)", path.name)
    return (int(match.group(1)) if match else 1 << 30, path.name)


def job_overrides(job: Path) -> list[str]:
    """The command-line overrides of one job (``.hydra/overrides.yaml``)."""
    path = job / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.exists() else []
