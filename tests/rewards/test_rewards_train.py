"""Every reward added in issue #16 trains for one epoch on the tiny model, in process, on tiny local weights.

The weights are built by ``tests/tiny_preference_models.py`` and ``tests/tiny_judge_models.py`` in the files and
formats users download; the overrides they return point the reward's real loader at them.
"""
from __future__ import annotations

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from conftest import read_metrics  # noqa: E402
from tiny_judge_models import build_geneval, build_vlm_judge  # noqa: E402
from tiny_preference_models import build_hpsv2, build_imagereward, build_pickscore  # noqa: E402

BUILDERS = {"pickscore": build_pickscore, "hpsv2": build_hpsv2, "imagereward": build_imagereward,
            "vlm_judge": build_vlm_judge, "geneval": build_geneval}
FAST = ["model=tiny", "monitor.every=0",
        "sampler.num_steps=3", "sampler.batch_size=4", "sampler.num_batches_per_epoch=1",
        "train.batch_size=4", "train.num_epochs=1", "advantage.mode=batch", "log.tracker=none", "log.grid_images=4",
        "threads=2", "seed=3"]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_one_training_epoch(name, tmp_path, cache_dir):
    from ddpo_cli.config import compose, plan_run
    from ddpo_cli.trainer import Trainer

    overrides = BUILDERS[name](tmp_path / "weights")
    if not any(o.startswith("reward=") for o in overrides):
        overrides = [f"reward={name}", *overrides]
    cfg = compose("train", [*FAST, *overrides])
    trainer = Trainer(cfg, tmp_path / "run", plan_run(cfg))
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    row = read_metrics(tmp_path / "run")[0]
    assert row["samples"] == 4 and row["global_step"] == 1 and math.isfinite(row["reward_mean"]), row
    assert (tmp_path / "run" / "checkpoints" / "epoch_0000").is_dir()
