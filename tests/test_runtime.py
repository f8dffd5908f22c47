"""Device, precision and the start of a run: what is refused, what a user sees, and how fast."""
from __future__ import annotations

import time

import pytest
import torch

from conftest import ddpo, run_cli
from ddpo_cli.errors import UserError
from ddpo_cli.runtime import cpu_has_bf16, pick_device, precision_rows, resolve_precision

CPU = torch.device("cpu")


def test_precision_on_a_cpu():
    assert resolve_precision("auto", CPU) == "no" and resolve_precision("no", CPU) == "no"
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)
    if cpu_has_bf16():
        assert resolve_precision("bf16", CPU) == "bf16"
    else:
        with pytest.raises(UserError, match="no bf16 units"):
            resolve_precision("bf16", CPU)
    with pytest.raises(UserError, match="choose auto, no, fp16 or bf16"):
        resolve_precision("fp8", CPU)
    assert "fp32" in precision_rows("no", CPU)[0][1] and "bf16 autocast" in precision_rows("bf16", CPU)[0][1]


def test_device_choices():
    assert pick_device("cpu") == CPU
    with pytest.raises(UserError, match="choose auto, cpu or cuda"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        assert pick_device("auto") == CPU
        with pytest.raises(UserError, match="no CUDA GPU"):
            pick_device("cuda")


@pytest.mark.slow
@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "unreachable"])
def test_the_default_model_without_network_fails_fast_with_the_way_out(env, tmp_path):
    # `ddpo train reward=... algo=...` trains SD v1.5 by default; without the hub it must say what to do instead
    start = time.perf_counter()
    result = run_cli("train", "reward=jpeg_compressibility", "algo=ddpo_is", f"hydra.run.dir={tmp_path / 'run'}",
                     env={**env, "HF_HOME": str(tmp_path / "hf")}, cwd=tmp_path)  # an empty hub cache
    seconds = time.perf_counter() - start
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "stable-diffusion-v1-5" in lines[0] and "model.pretrained=" in lines[0] and "experiment=quickstart" in lines[0]
    assert not (tmp_path / "run").exists(), "nothing is written before the error"
    assert seconds < 30, seconds  # generous: imports take ~5 s; the hub retries this replaces took 60 s


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 units")
def test_bf16_on_a_cpu_keeps_the_ratio_at_one(tmp_path, cache_dir):
    from conftest import read_metrics

    run = tmp_path / "bf16"
    result = ddpo("train", "model=tiny", "precision=bf16", "sampler.num_steps=4", "sampler.batch_size=4",
                     "sampler.num_batches_per_epoch=1", "train.batch_size=4", "train.timesteps_per_forward=1",
                     "advantage.mode=batch", "log.tracker=none", "train.num_epochs=1", "threads=2",
                     f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bf16 autocast" in result.stderr
    row = read_metrics(run)[0]
    # sampling (4 images per call) and training (1 pair per call) batch differently, yet compute the same policy
    assert row["approx_kl"] == 0.0 and row["ratio_mean"] == 1.0


COUNTED = """
import os
from ddpo_cli.algorithms.ddpo import DDPO
from ddpo_cli.rewards.jpeg import JpegCompressibility


def built(what):
    with open(os.environ["COUNT_FILE"], "a") as handle:
        handle.write(what + "\\n")


class CountedReward(JpegCompressibility):
    def __init__(self, **kwargs):
        built("reward")
        super().__init__(**kwargs)


class CountedAlgorithm(DDPO):
    def __init__(self, **kwargs):
        built("algorithm")
        super().__init__(**kwargs)
"""


@pytest.mark.slow
def test_a_run_reads_its_config_once(tmp_path, cache_dir):
    # the checks before Hydra starts build the algorithm and the reward; the run reuses them (it used to build the
    # algorithm three times and validate twice)
    (tmp_path / "counted.py").write_text(COUNTED)
    count_file = tmp_path / "built.txt"
    result = ddpo("train", "model=tiny", "sampler.num_steps=2", "sampler.batch_size=2",
                     "sampler.num_batches_per_epoch=1", "train.batch_size=2", "advantage.mode=batch",
                     "log.tracker=none", "train.num_epochs=1", "threads=2", "reward._target_=counted.CountedReward",
                     "algo._target_=counted.CountedAlgorithm", f"hydra.run.dir={tmp_path / 'run'}",
                     env={"PYTHONPATH": str(tmp_path), "COUNT_FILE": str(count_file)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(count_file.read_text().split()) == ["algorithm", "reward"]


def test_learning_rate_schedules_by_hand():
    from ddpo_cli.schedules import learning_rate

    assert learning_rate(1e-3, "constant", 57, 100) == 1e-3
    assert learning_rate(1e-3, "cosine", 0, 100) == 1e-3
    assert learning_rate(1e-3, "cosine", 50, 100) == pytest.approx(5e-4)
    assert learning_rate(1e-3, "cosine", 25, 100) == pytest.approx(1e-3 * (1 + 2 ** -0.5) / 2)
    assert learning_rate(1e-3, "cosine", 99, 100) > 0 and learning_rate(1e-3, "cosine", 100, 100) == 0
    with pytest.raises(ValueError):
        learning_rate(1e-3, "linear", 0, 10)
