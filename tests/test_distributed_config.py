"""What accelerate launch asks for, refused at start-up in one line when ddpo train cannot run it; the shipped launch
configs are valid accelerate configs."""
import pytest

from conftest import REPO, TRAIN, ddpo
from ddpo_cli import distributed
from ddpo_cli.errors import UserError


@pytest.mark.parametrize("env,message", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "asks for FSDP version 1: ddpo-cli shards with FSDP2"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"},
     "asks for DeepSpeed ZeRO stage 0: use 1, 2 or 3"),
])
def test_launches_that_cannot_run_are_refused(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match=message):
        distributed.refuse_unsupported_launch()


def test_fsdp2_on_an_accelerate_without_it_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setattr(distributed, "accelerate_has_fsdp2", lambda: False)
    with pytest.raises(UserError, match="FSDP2 needs a newer accelerate than .*: pip install -U accelerate"):
        distributed.refuse_unsupported_launch()


def test_deepspeed_when_it_is_not_installed_is_refused(monkeypatch):
    import importlib.util

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(UserError, match=r"asks for DeepSpeed, which is not installed: pip install 'ddpo-cli\[deepspeed\]'"):
        distributed.refuse_unsupported_launch()


def test_a_refused_launch_stops_train_with_one_line_and_exit_2(tmp_path, cache_dir):
    result = ddpo("train", *TRAIN, f"hydra.run.dir={tmp_path / 'run'}",
                  env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "asks for FSDP version 1" in result.stderr


@pytest.mark.parametrize("name", ["multi_gpu", "fsdp2", "multi_node", "deepspeed_zero2", "deepspeed_zero3"])
def test_the_shipped_launch_configs_load_in_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "conf" / "accelerate" / f"{name}.yaml"))
    assert config.num_processes >= 2 and config.mixed_precision == "bf16"
    if name == "fsdp2":
        assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    if name.startswith("deepspeed"):
        assert config.distributed_type == "DEEPSPEED" and config.deepspeed_config["zero_stage"] == int(name[-1])
