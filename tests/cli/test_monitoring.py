"""Monitors in `ddpo train`: values on fixed prompts and seeds every monitor.every epochs, rules that stop the run
with one line, checkpoint.best_by keeping checkpoints/best/, and one-line refusals of wrong settings."""
import json

import pytest
from safetensors.torch import load_file

from conftest import TRAIN, ddpo, read_metrics

LORA = "pytorch_lora_weights.safetensors"
FAST = [*(a for a in TRAIN if a != "monitor.every=0"), "log.tracker=none", "monitor.every=1", "monitor.prompts=2",
        "monitor.images_per_prompt=2"]


def test_a_rule_stops_the_run_cleanly_and_best_by_keeps_the_best_checkpoint(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    # a rule that holds on every check fires on the second one (checks: 2)
    result = ddpo("train", *FAST, "train.num_epochs=5", "checkpoint.every=10", "checkpoint.best_by=jpeg_kb",
                  "checkpoint.best_mode=min", "monitor.stop_when=[{metric: dark_fraction, above: -1, checks: 2}]",
                  f"hydra.run.dir={run_dir}")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "epoch 1: stopped by monitor.stop_when: dark_fraction > -1 on 2 checks in a row" in " ".join(out.split())
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [0, 1] and "monitor_stop" in rows[1]
    values = rows[0]["monitor"]
    assert {"dark_fraction", "edge_density", "colour_entropy", "jpeg_kb", "diversity_pixels", "diversity_latents",
            "kl_to_base", "reward_mean"} <= set(values)
    base = json.loads((run_dir / "monitor_base.json").read_text())
    assert set(base) == set(values) - {"kl_to_base", "reward_mean"}
    # the stop epoch is saved although checkpoint.every=10; best/ is the check with the smaller JPEG size
    best_epoch = min(rows, key=lambda r: r["monitor"]["jpeg_kb"])["epoch"]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "epoch_0001" / LORA).exists()
    best, chosen = load_file(checkpoints / "best" / LORA), load_file(checkpoints / f"epoch_{best_epoch:04d}" / LORA)
    assert best.keys() == chosen.keys() and all(best[key].equal(chosen[key]) for key in best)
    assert f"best by jpeg_kb: {checkpoints / 'best'} (epoch {best_epoch}," in " ".join(out.split())


def test_the_monitor_images_are_the_same_for_the_same_weights(tmp_path, cache_dir):
    """Fixed prompts and one generator per image: the base model measured twice gives the same values."""
    first, second = tmp_path / "a", tmp_path / "b"
    for run_dir in (first, second):
        result = ddpo("train", *FAST, "train.num_epochs=1", f"hydra.run.dir={run_dir}")
        assert result.returncode == 0, result.stderr[-2000:]
    assert (first / "monitor_base.json").read_text() == (second / "monitor_base.json").read_text()


@pytest.mark.parametrize("overrides,message", [
    (["monitor.stop_when=[{metric: brightness, above: 0.5}]"],
     "monitor.stop_when[0].metric='brightness': the monitors measure colour_entropy, dark_fraction"),
    (["checkpoint.best_by=gold_reward"], "checkpoint.best_by='gold_reward': the monitors measure"),
    (["monitor.images_per_prompt=1"], "monitor.images_per_prompt=1: monitor diversity compares the images of one "
                                      "prompt; use >= 2"),
    (["monitor=[gold]", "monitor.gold.reward=beauty"], "unknown reward 'beauty': choose one of"),
    (["monitor.every=0", "monitor.stop_when=[{metric: dark_fraction, above: 0.5}]"],
     "monitor.stop_when is set but monitor.every=0 checks nothing"),
    (["monitor.image_stats.dark_below=2"], "monitor.image_stats.dark_below=2: use a luma in (0, 1)"),
    (["+monitor.brightness=3"], "monitor.brightness=3: not a setting"),
])
def test_wrong_monitor_settings_are_one_line_before_the_run(tmp_path, overrides, message):
    result = ddpo("train", *FAST, *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_gold_reward_is_scored_on_the_monitor_images(tmp_path, cache_dir):
    run_dir = tmp_path / "gold"
    result = ddpo("train", *FAST, "train.num_epochs=1", "monitor=[gold]", "monitor.gold.reward=jpeg_incompressibility",
                  f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    values = read_metrics(run_dir)[0]["monitor"]
    assert values["gold_reward"] > 0  # +kB
    bad = ddpo("train", *FAST, "train.num_epochs=1", "monitor=[gold]", "monitor.gold.reward=jpeg_incompressibility",
               "monitor.gold.metric=exact", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "monitor.gold.metric='exact': reward jpeg_incompressibility reports reward, " \
        "jpeg_kb" in bad.stderr
