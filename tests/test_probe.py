"""The paired measure (ddpo_cli/probe.py, log.paired): fixed prompts and noise, policy against base; the reward curve's
moving average; the end-of-run summary."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpo_cli.config import compose
from ddpo_cli.probe import describe_sampler, paired_gain, plan_probe, probe_images
from ddpo_cli.prompts import from_list
from ddpo_cli.report import paired_series, run_summary, smoothed
from ddpo_cli.trainer import Trainer


def test_a_probe_covers_its_set_evenly_with_seeds_that_depend_only_on_its_name_and_index():
    probe = plan_probe("trained", from_list(["a", "b", "c"]), 7, seed=3)
    assert probe.prompts[:6] == ["a", "b", "c", "a", "b", "c"] and probe.prompts[6] in "abc"
    assert len(set(probe.seeds)) == 7
    assert plan_probe("trained", from_list(["x"]), 4, seed=3).seeds == probe.seeds[:4]
    assert plan_probe("held-out", from_list(["a"]), 4, seed=3).seeds != probe.seeds[:4]


def test_a_probe_of_a_large_set_is_a_seeded_sample_not_the_top_of_the_file():
    # issue #23: the first 64 of PartiPrompts are mostly one-word "Abstract" prompts; 45 of 64 probe prompts were
    from ddpo_cli.prompts.benchmarks import parti_prompts

    prompts = parti_prompts()
    probe = plan_probe("trained", prompts, 64, seed=42)
    assert len(set(probe.prompts)) == 64 and probe.prompts != prompts.prompts[:64]
    abstract = sum(m.get("category") == "Abstract" for m in probe.metadata)
    assert abstract < 10, abstract      # 51 of 1632 prompts are "Abstract": about 2 expected in 64
    assert plan_probe("trained", prompts, 64, seed=42).prompts == probe.prompts
    assert plan_probe("trained", prompts, 64, seed=43).prompts != probe.prompts


def test_paired_gain_by_hand():
    base = {"reward": np.array([1.0, 2.0, 3.0, 4.0]), "exact": np.array([0.0, 1.0, 0.0, 0.0])}
    policy = {"reward": np.array([2.0, 2.0, 5.0, 4.0]), "exact": np.array([1.0, 1.0, 1.0, 0.0]), "other": np.ones(4)}
    out = paired_gain(policy, base)
    assert set(out) == {"reward", "exact"}
    # reward differences 1, 0, 2, 0: mean 0.75, sample std sqrt(0.9167) = 0.9574, s.e. 0.4787
    assert out["reward"]["base"] == 2.5 and out["reward"]["policy"] == 3.25
    assert out["reward"]["gain"] == pytest.approx(0.75) and out["reward"]["gain_se"] == pytest.approx(0.47871, 1e-4)
    assert out["exact"]["gain"] == pytest.approx(0.5)


def test_moving_average_by_hand():
    np.testing.assert_allclose(smoothed([1, 2, 3, 4, 5, 6], window=3), [1, 1.5, 2, 3, 4, 5])
    np.testing.assert_allclose(smoothed([2.0], window=5), [2.0])


def test_summary_names_the_paired_gain_the_outputs_and_the_next_commands(tmp_path):
    rows = [{"epoch": 0, "reward_mean": 0.5, "reward_std": 0.1},
            {"epoch": 1, "reward_mean": 0.6, "reward_std": 0.1,
             "paired": {"trained": {"exact": {"base": 0.5, "policy": 0.7, "gain": 0.2, "gain_se": 0.05}},
                        "held-out": {"exact": {"base": 0.6, "policy": 0.61, "gain": 0.01, "gain_se": 0.02}}}}]
    (tmp_path / "metrics.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    text = run_summary(tmp_path, "exact", "shapes_heldout", describe_sampler(compose("train", [
        "model=tiny_sd3", "sampler=flow_sde", "sampler.sde_window=[0,3]", "sampler.sde_window_slide_every=2"]).sampler))
    assert "base 0.5 -> 0.7   gain +0.2 ± 0.05" in text and "base 0.6 -> 0.61" in text
    assert "sampled with:        flow_sde, 10 steps, noise_level 0.7, guidance 4.5, SDE window 0..2 (pinned there; " \
           "training slides it)" in text
    assert f"ddpo eval run={tmp_path}\n" in text and f"ddpo eval run={tmp_path} prompts=shapes_heldout" in text
    assert f"ddpo sample run={tmp_path} n=4" in text and "(LoRA: pipe.load_lora_weights(<checkpoint>))" in text
    (tmp_path / "checkpoints" / "epoch_0001" / "unet").mkdir(parents=True)     # full fine-tuning's checkpoints
    assert "(full weights: from_pretrained(<checkpoint>/unet))" in run_summary(tmp_path, "exact")
    series = paired_series(rows, "exact")
    assert list(series["trained"]["epoch"]) == [1] and list(series["held-out"]["policy"]) == [0.61]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, cache_dir):
    cfg = compose("train", ["model=tiny", "sampler.num_steps=3", "sampler.batch_size=2", "log.tracker=none",
                            "threads=2", "log.paired.every=1", "log.paired.images=3",
                            "log.paired.heldout=simple_animals", "sampler.sde_window=[0,1]",
                            "sampler.sde_window_slide_every=1"])
    trainer = Trainer(cfg, tmp_path_factory.mktemp("run"))
    trainer.setup()
    yield trainer
    trainer.cleanup()


def test_the_policy_before_any_update_scores_exactly_the_base(trainer):
    # LoRA starts at B = 0: with the adapter on, the same prompts and noise must give the base's very numbers, on
    # both prompt sets; a pairing or seeding mistake shows here as a non-zero gain
    paired = trainer.paired
    assert [p.name for p in paired.probes] == ["trained", "held-out"]
    for probe in paired.probes:
        for key, values in paired.scores(trainer.unwrapped, probe).items():
            np.testing.assert_array_equal(values, paired.base[probe.name][key])
    assert paired.row(0, trainer.unwrapped)["paired"]["trained"]["reward"]["gain"] == 0.0


def test_a_sliding_sde_window_does_not_enter_the_paired_measure(trainer):
    # issue #23: the base was drawn with the window where it starts, the policy with the slid window, and the change
    # of sampler showed as a gain with no training at all; both are now drawn with the window pinned at its start
    trainer.sampler.set_epoch(2)                     # training's window: step 2 only
    try:
        assert [i for i in range(3) if trainer.sampler.is_stochastic(i)] == [2]
        for name, keys in trainer.paired.row(2, trainer.unwrapped)["paired"].items():
            assert all(values["gain"] == 0.0 for values in keys.values()), (name, keys)
    finally:
        trainer.sampler.set_epoch(0)


def test_an_image_of_a_probe_does_not_depend_on_its_batch(trainer):
    probe, denoiser = trainer.paired.probes[0], trainer.unwrapped
    args = (trainer.model, trainer.sampler, denoiser, probe, trainer.cfg.sampler.guidance_scale)
    one, three = probe_images(*args, 1, trainer.device), probe_images(*args, 3, trainer.device)
    torch.testing.assert_close(one, three, atol=2e-6, rtol=0)


def test_a_paired_metric_the_reward_does_not_report_is_named_in_one_line(tmp_path, cache_dir):
    from conftest import ddpo

    result = ddpo("train", "model=tiny", "sampler.num_steps=2", "sampler.batch_size=2", "log.tracker=none",
                     "log.paired.every=1", "log.paired.images=2", "log.paired.metric=exact",
                     f"hydra.run.dir={tmp_path / 'run'}")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[-1].startswith("error: log.paired.metric='exact'") and "choose one of them" in lines[-1], lines[-1]
