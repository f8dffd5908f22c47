"""Shared fixtures and helpers: offline Hugging Face, one tiny-model cache per test session, the CLI in process and in
a fresh process, one trained 2-epoch run, trainers built from overrides."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
HELPERS = Path(__file__).resolve().parent / "helpers"
sys.path.insert(0, str(HELPERS))  # tiny model builders and the reward contract, importable from every test folder
# The reference run of the end-to-end tests: 2 DDIM steps x 4 samples per epoch on the tiny random model
TRAIN = ["model=tiny", "monitor.every=0",
         "sampler.num_steps=4", "sampler.batch_size=4", "sampler.num_batches_per_epoch=1",
         "train.batch_size=2", "train.gradient_accumulation_steps=2", "train.timesteps_per_forward=4",
         "advantage.mode=batch", "log.grid_images=4", "threads=2", "seed=7", "train.lr=1e-3"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """DDPO_CACHE for the whole session: the tiny model is materialised once."""
    path = tmp_path_factory.mktemp("ddpo_cache")
    os.environ["DDPO_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir) -> Path:
    from omegaconf import OmegaConf

    from ddpo_cli.config import TinyModelConfig
    from ddpo_cli.models.tiny import materialise_tiny

    return materialise_tiny(OmegaConf.structured(TinyModelConfig), str(cache_dir))


@dataclass
class Result:
    """What a `ddpo` command left: exit code and output (as subprocess.CompletedProcess names them)."""

    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    """A TCP port nobody listens on now (for a server or rendezvous a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """`python -m ddpo_cli ...` in a fresh process, for what needs one: the exit code the shell sees, signals, locks
    held by another process."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ddpo_cli", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def ddpo(*args: str, cwd: Path | None = None, env: dict | None = None) -> Result:
    """`ddpo ...` in this process, through the same Typer and Hydra path as the command line. An exception that
    escapes shows as a traceback in ``stderr`` with exit code 1, as it would in a terminal. Global state a run
    changes (torch threads, environment, working folder, import path, Hydra) is restored."""
    import torch
    from hydra.core.global_hydra import GlobalHydra
    from typer.testing import CliRunner

    from ddpo_cli.cli import app

    saved = (dict(os.environ), os.getcwd(), list(sys.path), torch.get_num_threads(), list(sys.argv))
    os.environ.update(env or {})
    sys.path[:0] = [p for p in (env or {}).get("PYTHONPATH", "").split(os.pathsep) if p]
    os.chdir(cwd or REPO)
    GlobalHydra.instance().clear()
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        GlobalHydra.instance().clear()
        os.environ.clear()
        os.environ.update(saved[0])
        os.chdir(saved[1])
        sys.path[:] = saved[2]
        torch.set_num_threads(saved[3])
        sys.argv[:] = saved[4]
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return Result(result.exit_code, result.stdout, stderr)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, cache_dir) -> Path:
    """The reference run (``TRAIN``), 2 epochs, a checkpoint after each; shared by every test that only reads it
    (copy it before writing into it)."""
    run_dir = tmp_path_factory.mktemp("runs") / "trained"
    result = ddpo("train", *TRAIN, "train.num_epochs=2", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def make_trainer(tmp_path_factory, cache_dir):
    """``make_trainer(*overrides)``: a set-up Trainer on the tiny model (3 steps, 2 samples), cleaned up after the
    module."""
    from ddpo_cli.config import compose
    from ddpo_cli.trainer import Trainer

    made = []

    def build(*overrides):
        cfg = compose("train", ["model=tiny", "sampler.num_steps=3", "sampler.batch_size=2",
                                "sampler.num_batches_per_epoch=1", "train.batch_size=2", "advantage.mode=batch",
                                "log.tracker=none", "threads=2", *overrides])
        trainer = Trainer(cfg, tmp_path_factory.mktemp("run"))
        trainer.setup()
        made.append(trainer)
        return trainer

    yield build
    for trainer in made:
        trainer.cleanup()


def lora_and_frozen_grads(trainer) -> tuple[list, list]:
    """The gradients of a trainer's LoRA parameters and of every frozen one (denoiser, VAE, text encoder)."""
    unet = trainer.accelerator.unwrap_model(trainer.denoiser)
    lora = [p.grad for n, p in unet.named_parameters() if "lora" in n]
    frozen = [p.grad for n, p in unet.named_parameters() if "lora" not in n]
    frozen += [p.grad for p in trainer.model.vae.parameters()]
    frozen += [p.grad for p in trainer.model.pipe.text_encoder.parameters()]
    return lora, frozen


def perturb_lora(trainer, scale: float = 0.05) -> None:
    """Move the LoRA's B matrices off zero: a policy that is not the base model."""
    import torch

    unet = trainer.accelerator.unwrap_model(trainer.denoiser)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.add_(scale * torch.randn_like(param))


def load_lora_plainly(pipe, folder: Path) -> None:
    """``pipe.load_lora_weights(folder)``, as a user would; diffusers before 0.42 wants the file name when offline
    (``HF_HUB_OFFLINE=1``, as in these tests)."""
    try:
        pipe.load_lora_weights(folder)
    except ValueError as exc:
        if "weight_name" not in str(exc):
            raise
        pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# Steps of CI kept out of the README's test command, each switched on by its own option
OPT_IN = {"claims": ("--run-claims", "a learning claim with its control",
                     "python -m pytest -q -m claims --run-claims -n 2"),
          "distributed": ("--run-distributed", "several processes (accelerate launch, a reward server, submitit)",
                          "python -m pytest -q -m distributed --run-distributed"),
          "matrix": ("--run-matrix", "ddpo doctor on every tiny family x algorithm",
                     "python -m pytest -q -m matrix --run-matrix -n 2")}


def pytest_addoption(parser):
    for marker, (option, what, command) in OPT_IN.items():
        parser.addoption(option, action="store_true", help=f"run the tests marked `{marker}`: {what} (CI: {command})")


def pytest_collection_modifyitems(config, items):
    for marker, (option, what, _) in OPT_IN.items():
        if config.getoption(option):
            continue
        skip = pytest.mark.skip(reason=f"{what}: run with {option}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
