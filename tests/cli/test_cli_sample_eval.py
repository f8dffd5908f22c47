"""`ddpo sample` and `ddpo eval` through the real CLI on the tiny model, plus the maths they rely on.

One module fixture trains a 2-job sweep (seeds 0 and 1, 2 epochs each); job 0 is the run that is sampled and
evaluated, and the sweep itself is summarised.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import ddpo

FAST = ["model=tiny", "monitor.every=0",
        "sampler.num_steps=4", "sampler.batch_size=4", "sampler.num_batches_per_epoch=1",
        "train.batch_size=2", "train.gradient_accumulation_steps=2", "train.timesteps_per_forward=4",
        "advantage.mode=batch", "log.grid_images=4", "log.tracker=none", "threads=1", "train.lr=1e-3"]
SMALL = ["n=2", "num_prompts=2", "threads=1"]
pytestmark = pytest.mark.slow


def ok(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir) -> Path:
    """A 2-job training sweep; job folders hold '=' and ',' like Hydra's default names (``0_seed=0,lr=0.001``)."""
    folder = tmp_path_factory.mktemp("sweep")
    ok(ddpo("train", "-m", *FAST, "train.num_epochs=2", "seed=0,1", f"hydra.sweep.dir={folder}",
               "hydra.sweep.subdir='${hydra.job.num}_seed=${seed},lr=${train.lr}'"))
    return folder


@pytest.fixture(scope="module")
def run(sweep) -> Path:
    return next(p for p in sorted(sweep.iterdir()) if p.name.startswith("0_"))


def run_each(commands: dict[str, list[str]]) -> dict:
    """Run CLI commands one after the other in this process: ``name -> Result``."""
    return {name: ddpo(*args) for name, args in commands.items()}


@pytest.fixture(scope="module")
def cli(sweep, run, tmp_path_factory) -> dict:
    """A `ddpo sample -m lora_scale=0,1` (latest checkpoint), a `ddpo eval` and a `ddpo eval sweep=`, side by side."""
    folder = tmp_path_factory.mktemp("samples")
    results = run_each({
        "sample": ["sample", "-m", f"run={run}", "lora_scale=0,1", *SMALL,
                   "reward=jpeg_compressibility", f"hydra.sweep.dir={folder}", "hydra.sweep.subdir=job${hydra.job.num}"],
        "eval": ["eval", f"run={run}", "checkpoints=all", "rewards.gold=jpeg_incompressibility", *SMALL],
        "sweep": ["eval", f"sweep={sweep}"]})
    return {**results, "sample_dir": folder}


@pytest.fixture(scope="module")
def samples(cli) -> dict[str, Path]:
    """``lora_scale -> job folder`` of the sample sweep."""
    ok(cli["sample"])
    jobs = {}
    for job in cli["sample_dir"].glob("job*"):
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        jobs[overrides["lora_scale"]] = job
    return jobs


def pixels(job: Path) -> dict[str, np.ndarray]:
    return {row["file"]: np.asarray(Image.open(job / row["file"])) for row in rows_of(job)}


def rows_of(job: Path) -> list[dict]:
    return [json.loads(line) for line in (job / "samples.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- ddpo sample
def test_sample_writes_images_grid_and_jsonl(samples, run):
    job = samples["1"]
    rows = rows_of(job)
    assert len(rows) == 4 and {r["image_index"] for r in rows} == {0, 1}
    for row in rows:
        assert {"prompt", "metadata", "seed", "file", "reward", "checkpoint"} <= row.keys()
        assert (job / row["file"]).exists() and row["reward_name"] == "jpeg_compressibility"
        assert row["reward"] == pytest.approx(-row["reward_info"]["jpeg_kb"])
    assert rows[0]["checkpoint"].endswith("epoch_0001") and (job / "grid.png").exists()
    resolved = OmegaConf.load(job / "resolved_config.yaml")
    assert resolved.sampler.num_steps == 4  # the run's sampler, not sample.yaml's default (50)


def test_base_model_images_are_reproduced_with_the_same_seeds(samples, run, tmp_path):
    """lora_scale=0, checkpoint=none and no run at all draw the same base-model images; the LoRA changes them."""
    from ddpo_cli.config import compose
    from ddpo_cli.sample import sample_images
    from ddpo_cli.config.run_defaults import apply_run_defaults

    overrides = [f"run='{run}'", "checkpoint=none", *SMALL]
    sample_images(apply_run_defaults(compose("sample", overrides), overrides, ("model", "sampler", "prompts")),
                  tmp_path / "none")
    sample_images(compose("sample", ["model=tiny", "sampler.num_steps=4", "sampler.batch_size=4", *SMALL]),
                  tmp_path / "no_run")
    base = pixels(samples["0"])
    seeds = [r["seed"] for r in rows_of(samples["0"])]
    for job in (samples["1"], tmp_path / "none", tmp_path / "no_run"):
        assert [r["seed"] for r in rows_of(job)] == seeds
    for job in (tmp_path / "none", tmp_path / "no_run"):
        assert all(np.array_equal(base[f], image) for f, image in pixels(job).items()), job
    tuned = pixels(samples["1"])
    assert any(not np.array_equal(base[f], image) for f, image in tuned.items()), "the LoRA should change images"


def test_lora_scale_interpolates_the_weight_change_linearly(run):
    from safetensors.torch import load_file

    from ddpo_cli.config import compose
    from ddpo_cli.sample import ImageSampler
    from ddpo_cli.config.run_defaults import apply_run_defaults

    overrides = [f"run='{run}'", "threads=1"]
    cfg = apply_run_defaults(compose("sample", overrides), overrides, ("model", "sampler", "prompts"))
    sampler = ImageSampler(cfg)
    ckpt = run / "checkpoints" / "epoch_0001"
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = sampler.denoiser.get_submodule(name)
    eye = torch.eye(layer.in_features)

    def delta(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weight change peft merges into W0, the change the layer applies: W_eff - W0), both [out, in]."""
        sampler.use(ckpt, scale)
        with torch.no_grad():
            return layer.get_delta_weight("default"), (layer(eye) - layer.base_layer(eye)).T

    (full, full_applied), (half, half_applied), (zero, zero_applied) = delta(1.0), delta(0.5), delta(0.0)
    weights = load_file(ckpt / "pytorch_lora_weights.safetensors")
    b, a = weights[f"unet.{name}.lora.up.weight"], weights[f"unet.{name}.lora.down.weight"]
    alpha_over_r = cfg.model.lora.alpha / cfg.model.lora.rank
    torch.testing.assert_close(full, alpha_over_r * b @ a, rtol=1e-6, atol=0)
    assert full.abs().max() > 1e-6
    assert torch.equal(half, 0.5 * full) and torch.equal(zero, torch.zeros_like(zero))   # exactly linear
    # what the forward pass applies agrees (up to float32 rounding of W0 x + dW x - W0 x)
    torch.testing.assert_close(full_applied, full, rtol=0, atol=1e-7)
    torch.testing.assert_close(half_applied, half, rtol=0, atol=1e-7)
    assert torch.equal(zero_applied, torch.zeros_like(zero))


def test_batched_sampling_equals_the_training_sampler_image_by_image(run):
    from ddpo_cli.config import compose
    from ddpo_cli.noise import generator_noise
    from ddpo_cli.rollout import run_chain
    from ddpo_cli.sample import ImageSampler

    cfg = compose("sample", ["model=tiny", "sampler.num_steps=3", "sampler.batch_size=2", "threads=1"])
    sampler = ImageSampler(cfg)
    prompts, seeds = ["cat", "dog"], [11, 12]
    batched = sampler.generate(prompts, seeds)                     # [2, 3, H, W]
    for k, (prompt, seed) in enumerate(zip(prompts, seeds)):
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((1, *sampler.model.latent_shape()), generator=generator)
        final, _ = run_chain(sampler.model, sampler.sampler, sampler.denoiser, noise, sampler.model.encode([prompt]),
                             cfg.sampler.guidance_scale, generator_noise(noise.shape, generator, "cpu"))
        torch.testing.assert_close(sampler.model.decode(final)[0], batched[k], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- ddpo eval
def test_eval_report(cli, run):
    ok(cli["eval"])
    out = max((run / "eval").iterdir())
    summary = json.loads((out / "eval.json").read_text())
    for key in ("models", "train_reward", "gold_reward", "best", "overoptimization", "training", "prompts", "sampler"):
        assert key in summary, key
    assert [m["name"] for m in summary["models"]] == ["base", "epoch_0000", "epoch_0001"]
    assert summary["train_reward"] == "jpeg_compressibility" and summary["gold_reward"] == "gold"
    base, tuned = summary["models"][0], summary["models"][2]
    assert base["rewards"]["gold"]["mean"] == pytest.approx(-base["rewards"]["jpeg_compressibility"]["mean"])
    assert base["rewards"]["gold"]["n"] == 4 and base["diversity"]["n"] == 2 and base["diversity"]["mean"] > 0
    # numeric reward info becomes a column of its own (JPEG size in kB = -compressibility), paired like a reward
    assert base["rewards"]["jpeg_compressibility/jpeg_kb"]["mean"] == pytest.approx(
        -base["rewards"]["jpeg_compressibility"]["mean"])
    assert tuned["change_vs_base"]["jpeg_compressibility"]["mean"] == pytest.approx(
        tuned["rewards"]["jpeg_compressibility"]["mean"] - base["rewards"]["jpeg_compressibility"]["mean"], abs=1e-9)
    # gold = -train here, so a flag appears exactly where the training reward rose by more than one standard error
    rose = {m["name"] for m in summary["models"][1:] if m["change_vs_base"]["jpeg_compressibility"]["mean"] >
            max(m["change_vs_base"]["jpeg_compressibility"]["se"], 0)}
    assert {f["to"] for f in summary["overoptimization"] if f["from"] == "base"} == rose
    assert summary["best"]["by"] == "gold"
    report = (out / "eval.md").read_text()
    for text in ("| base |", "| epoch_0000 |", "| epoch_0001 |", "gold (gold)", "comparison.png", "reward_curve.png"):
        assert text in report, text
    assert (out / "comparison.png").exists() and (out / "reward_curve.png").exists()
    assert len((out / "eval_samples.jsonl").read_text().splitlines()) == 3 * 4
    # 2 prompts x 3 models rows, each prompt's 2 images as columns (160 px cells, 24 px captions)
    assert Image.open(out / "comparison.png").size == (2 * 160, 6 * (160 + 24))


def test_comparison_grid_shows_the_first_images_of_the_first_prompts():
    from ddpo_cli.evaluate import grid_specs
    from ddpo_cli.sample import ImageSpec

    specs = [ImageSpec(p, i, f"prompt {p}", {}, 100 * p + i) for p in (5, 2, 7) for i in range(3)]
    assert grid_specs(specs, prompts=2, images=2) == [0, 1, 3, 4]
    assert grid_specs(specs, prompts=4, images=1) == [0, 3, 6]


def test_sweep_summary(cli, sweep):
    ok(cli["sweep"])
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [j["label"] for j in summary["jobs"]] == ["seed=0", "seed=1"]
    assert all(j["epochs"] == 2 and j["final_reward"] is not None for j in summary["jobs"])
    table = (sweep / "sweep_summary.md").read_text()
    assert "| seed=0 | 2 |" in table and "| seed=1 | 2 |" in table and "sweep_rewards.png" in table
    assert (sweep / "sweep_rewards.png").exists() and (sweep / "sweep_rewards_vs_reward_queries.png").exists()
    assert (sweep / "sweep_rewards_vs_wall_seconds.png").exists()
    # the two jobs differ only in the seed: one pooled configuration, mean +- s.e. over the two seeds
    (pooled,) = summary["configs"]
    finals = [j["final_reward"] for j in summary["jobs"]]
    assert pooled["seeds"] == 2 and pooled["final_reward"] == pytest.approx(sum(finals) / 2)
    assert pooled["final_reward_se"] == pytest.approx(abs(finals[0] - finals[1]) / 2)
    assert "seeds pooled" in table


def test_seed_pooling_by_hand():
    from ddpo_cli.sweep import gain, pool_seeds

    def job(label, rewards):
        n = len(rewards)
        return {"label": label, "epochs": n, "final_reward": rewards[-1],
                "curve": {"epochs": list(range(n)), "reward_mean": rewards, "reward_queries": [8 * (i + 1) for i in
                          range(n)], "wall_seconds": [1.0 * (i + 1) for i in range(n)]}}

    assert gain([0, 1, 2, 3, 4, 5, 6]) == pytest.approx(5 - 1)      # last 3 (4, 5, 6) minus first 3 (0, 1, 2)
    assert gain([1.0, 3.0]) == pytest.approx(2.0)                    # k shrinks to 1 for a 2-epoch run
    jobs = [job("algo=a seed=0", [0.0, 1.0]), job("algo=a seed=1", [0.0, 3.0, 9.0]), job("algo=b seed=0", [5.0, 5.0])]
    a, b = pool_seeds(jobs)
    assert (a["config"], a["seeds"], b["config"], b["seeds"]) == ("algo=a", 2, "algo=b", 1)
    assert a["final_reward"] == pytest.approx(5.0) and a["final_reward_se"] == pytest.approx(4.0)
    assert a["gain"] == pytest.approx((1.0 + 9.0) / 2) and a["gain_se"] == pytest.approx(4.0)
    assert a["curve"]["reward_mean"] == [0.0, 2.0]                   # mean over seeds, epochs both reached
    assert b["gain"] == 0.0 and b["gain_se"] == 0.0 and "vs_baseline" not in a
    control = [job("algo=baseline seed=0", [1.0, 2.0]), job("algo=baseline seed=1", [1.0, 1.0, 1.0])]
    a, b, base = pool_seeds(jobs + control)
    assert a["vs_baseline"] == pytest.approx(((1.0 - 2.0) + (9.0 - 1.0)) / 2)   # last epoch vs control, per seed
    assert b["vs_baseline"] == pytest.approx(5.0 - 2.0) and base["vs_baseline"] == 0.0


def test_bad_input_is_one_line_exit_2(run, tmp_path):
    no_checkpoints = tmp_path / "fresh_run"
    shutil.copytree(run / ".hydra", no_checkpoints / ".hydra")
    cases = [("sample", "run=/no/such/run", "does not exist"),
             ("sample", f"run={no_checkpoints}", "no checkpoint"),
             ("eval", f"run={run}", "rewards.gold=no_such_reward", "unknown reward"),
             ("eval", "n=2", "needs run="),
             ("eval", "sweep=/no/such/sweep", "does not exist")]
    results = run_each({str(i): case[:-1] for i, case in enumerate(cases)})
    for i, (command, *args, message) in enumerate(cases):
        result = results[str(i)]
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert lines[-1].startswith("error:") and message in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, args
    assert not (no_checkpoints / "sample").exists(), "nothing is written for a bad command"


# ----------------------------------------------------------------------------------------------- statistics
def test_statistics_and_overoptimization_flags():
    from ddpo_cli.evaluate import ModelEval, best_model, overoptimization, pairwise_diversity
    from ddpo_cli.stats import mean_se

    assert mean_se([1.0, 3.0]) == pytest.approx({"mean": 2.0, "se": 1.0, "n": 2})  # std(ddof=1) = sqrt(2), / sqrt(2)
    images = torch.zeros(4, 3, 8, 8)
    images[1] = 1.0                                                    # prompt 0: black vs white -> distance 1
    assert pairwise_diversity(images, [0, 0, 1, 1], size=4).tolist() == [1.0, 0.0]

    def model(name, train, gold):
        return ModelEval(name, None, None, {"t": np.array(train), "g": np.array(gold)}, np.zeros(1), torch.zeros(0))

    base = model("base", [0.0, 0.0, 0.0], [5.0, 5.0, 5.0])
    good = model("e1", [1.0, 1.1, 0.9], [5.2, 5.1, 5.3])              # both rewards up: fine
    hacked = model("e2", [2.0, 2.1, 1.9], [4.0, 4.2, 4.1])            # train up, gold down: flagged twice
    flags = overoptimization([base, good, hacked], "t", "g", threshold=1.0)
    assert [(f["from"], f["to"]) for f in flags] == [("base", "e2"), ("e1", "e2")]
    assert best_model([base, good, hacked], "g")["model"] == "e1"
    assert overoptimization([base, hacked], "t", None, 1.0) == []


def test_eval_finds_a_reward_option_in_the_users_config_folder(run, tmp_path):
    # `ddpo eval -cd DIR rewards.gold=<option>` looks the option up like `reward=<option>`: DIR/reward/ counts too
    conf = tmp_path / "my_conf" / "reward"
    conf.mkdir(parents=True)
    (conf / "my_size.yaml").write_text("# JPEG size at quality 90\n_target_: ddpo_cli.rewards.jpeg.JpegIncompressibility"
                                       "\nquality: 90\n")
    out = tmp_path / "eval"
    ok(ddpo("eval", "-cd", str(tmp_path / "my_conf"), f"run={run}", "rewards.gold=my_size", *SMALL,
               f"hydra.run.dir={out}"))
    summary = json.loads((out / "eval.json").read_text())
    assert summary["gold_reward"] == "gold" and summary["models"][0]["rewards"]["gold"]["mean"] > 0
    without = ddpo("eval", f"run={run}", "rewards.gold=my_size", *SMALL, f"hydra.run.dir={tmp_path / 'no'}")
    assert without.returncode == 2 and "unknown reward 'my_size'" in without.stderr


def test_curve_labels_drop_what_every_plotted_configuration_shares():
    from ddpo_cli.sweep import curve_labels

    pooled = [{"config": "algo=a advantage.shuffle=false", "seeds": 3},
              {"config": "algo=b advantage.shuffle=false", "seeds": 3},
              {"config": "algo=b advantage.shuffle=false sampler=flow_ode", "seeds": 2}]
    assert curve_labels(pooled) == ["algo=a (3 seeds)", "algo=b (3 seeds)", "algo=b sampler=flow_ode (2 seeds)"]
    assert curve_labels(pooled[:1]) == ["algo=a advantage.shuffle=false (3 seeds)"]     # one line: all of it


def test_each_configuration_against_its_control_and_the_budget_leaders_by_hand():
    from ddpo_cli.sweep import budget_leaders, command_line_spelling, pool_seeds, seed_groups

    assert command_line_spelling("advantage.shuffle=True") == "advantage.shuffle=true"   # as Hydra's sweeper saves it
    assert command_line_spelling("prompts.prompts=[True]") == "prompts.prompts=[True]"

    def job(label, rewards, gold=None):
        n = len(rewards)
        return {"label": label, "epochs": n, "final_reward": rewards[-1], "gold_reward": gold,
                "diversity_pixels": None,
                "curve": {"epochs": list(range(n)), "reward_mean": rewards, "reward_queries": [8 * (i + 1) for i in
                          range(n)], "wall_seconds": [1.0 * (i + 1) for i in range(n)]}}

    jobs = [job("algo=a advantage.shuffle=false seed=0", [0.0, 1.0, 2.0, 3.0], gold=0.5),
            job("algo=a advantage.shuffle=false seed=1", [0.0, 2.0, 4.0, 6.0], gold=0.7),
            job("algo=a advantage.shuffle=true seed=0", [0.0, 0.0, 0.0, 1.0], gold=0.9),
            job("algo=a advantage.shuffle=true seed=1", [0.0, 1.0, 1.0, 1.0], gold=0.9),
            job("algo=b advantage.shuffle=false seed=0", [0.0, 3.0, 3.0, 3.0]),
            job("algo=b advantage.shuffle=false seed=1", [0.0, 3.0, 3.0, 3.0])]
    pooled = {p["config"]: p for p in pool_seeds(jobs)}
    a = pooled["algo=a advantage.shuffle=false"]
    # last 2 epochs of 4 (k shrinks): seed 0 2.5 vs control 0.5, seed 1 5.0 vs 1.0 -> differences 2 and 4
    assert a["vs_control"] == pytest.approx(3.0) and a["vs_control_se"] == pytest.approx(1.0)
    assert a["gold_reward"] == pytest.approx(0.6) and "diversity_pixels" not in a
    assert "vs_control" not in pooled["algo=b advantage.shuffle=false"]      # b has no control in the sweep
    budgets = budget_leaders(list(pooled.values()), seed_groups(jobs))
    # at 25% of 32 queries (8: epoch 0) every gain is 0; at 50% (16: epochs 0-1 averaged) a: 0.5/1.0, b: 1.5 each
    assert [b["fraction"] for b in budgets] == [0.25, 0.5, 1.0]
    assert budgets[1]["leader"] == "algo=b advantage.shuffle=false" and budgets[1]["within_noise"] == []
    # at the whole budget (epochs 2-3 averaged) a: 2.5 and 5.0 (3.75 +- 1.25), b: 3.0 +- 0: within noise
    assert budgets[2]["leader"] == "algo=a advantage.shuffle=false"
    assert budgets[2]["within_noise"] == ["algo=b advantage.shuffle=false"]
