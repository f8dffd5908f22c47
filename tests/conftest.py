"""Shared fixtures: offline Hugging Face, one tiny-model cache per test session, a CLI runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


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


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run `python -m ddpo_cli ...` and return the CompletedProcess (text)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ddpo_cli", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


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


def pytest_addoption(parser):
    parser.addoption("--run-learning", action="store_true",
                     help="also run the multi-seed learning checks marked `learning` (minutes each; not in CI)")
    parser.addoption("--run-claims", action="store_true",
                     help="run the README's learning claims marked `claims`, each with its control (CI's second "
                          "step: python -m pytest -q -m claims --run-claims)")


def pytest_collection_modifyitems(config, items):
    opt_in = {"learning": ("--run-learning", "multi-seed learning check"),
              "claims": ("--run-claims", "a README learning claim with its control")}
    for marker, (option, what) in opt_in.items():
        if config.getoption(option):
            continue
        skip = pytest.mark.skip(reason=f"{what}: run with {option}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
