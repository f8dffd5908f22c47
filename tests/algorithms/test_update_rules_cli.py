"""The 2025-26 update rules through the command line on both tiny families: `ddpo train -m` over all of them (one
epoch each), then `ddpo sample` and `ddpo eval` of a DiffusionNFT run trained with a deterministic sampler."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ddpo, read_metrics

STEPS = ["sampler.num_steps=4", "sampler.batch_size=4", "sampler.num_batches_per_epoch=1", "train.batch_size=2",
         "train.gradient_accumulation_steps=2", "advantage.mode=batch", "log.grid_images=4", "log.tracker=none",
         "threads=2", "train.lr=1e-2", "monitor.every=0", "sampler.group_size=2"]
RULES = "algo=nft,awm,dpo,grpo_guard,dppo"
FAMILIES = {"sd": ["model=tiny"], "flow": ["model=tiny_sd3", "sampler=flow_sde"]}


def ok(result) -> None:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_new_rule_trains_from_the_command_line(family, tmp_path, cache_dir):
    ok(ddpo("train", "-m", *FAMILIES[family], *STEPS, "train.num_epochs=1", RULES, f"hydra.sweep.dir={tmp_path}"))
    jobs = sorted(tmp_path.glob("job_*"))
    assert len(jobs) == 5
    for job in jobs:
        row = read_metrics(job)[0]
        assert row["global_step"] == 1 and np.isfinite(row["loss"]) and row["grad_norm"] > 0, (job, row)
        assert (job / "checkpoints" / "epoch_0000" / "pytorch_lora_weights.safetensors").exists()


def test_nft_with_an_ode_sampler_samples_and_evaluates(tmp_path, cache_dir):
    run = tmp_path / "nft"
    ok(ddpo("train", "model=tiny_sd3", "sampler=flow_ode", *STEPS, "sampler.guidance_scale=1", "train.num_epochs=2",
            "algo=nft", "algo.old_increment=0.5", f"hydra.run.dir={run}"))
    rows = read_metrics(run)
    assert [r["old_policy_decay"] for r in rows] == [0.5, 0.5] and rows[0]["kl_to_base"] is None
    assert (run / "checkpoints" / "epoch_0001" / "old_policy.safetensors").exists()
    ok(ddpo("sample", f"run={run}", "n=2", "num_prompts=1", "threads=2", f"hydra.run.dir={run / 'sample'}"))
    assert len(list((run / "sample").rglob("*.png"))) >= 2
    ok(ddpo("eval", f"run={run}", "n=2", "num_prompts=2", "threads=2", f"hydra.run.dir={run / 'eval'}"))
    summary = json.loads((run / "eval" / "eval.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["base", "epoch_0001"]
