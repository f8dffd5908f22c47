"""Learning tests: on the shipped tiny_shapes model a reward must actually go up, by a stated margin, measured on
fixed prompts and noise before and after training (paired, not on the noisy per-epoch batches).

Policy-gradient and reward-weighted tests use the unconditional model (the empty prompt; it was trained with 10%
empty captions): its samples vary in shape count, size and colour, so JPEG size varies (base 1.09 +- 0.13 kB over
64 samples) and a few hundred samples are enough to move it. Compressibility has an easy optimum (a black image,
~0.88 kB), so ddpo_sf is also trained on incompressibility, the opposite direction, and RWR only there: plain
self-training on its own samples drifts to black whatever the reward (measured below).

The claims (``-m claims --run-claims``) run with one thread each, two at a time (``-n 2``: CI's claims step); each
prints what it measured. Runs that a claim and its control share are made in one test (a cache across tests would run
once per worker: pytest-xdist's groups do not hold on pytest 9.2). On this machine one and two threads give the same
numbers (measured 2026-12-06: every JPEG gain and control below, and the quickstart's, to the last digit); on another
CPU the float reductions, hence the trajectories, may differ. The DRaFT tests (in the main suite) run with threads=2."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from omegaconf import OmegaConf

from ddpo_cli.config import compose
from ddpo_cli.probe import PairedMeasure, plan_probe
from ddpo_cli.prompts import from_list
from ddpo_cli.report import read_metrics
from ddpo_cli.rollout import trained_steps
from ddpo_cli.runtime import derive_seed
from ddpo_cli.trainer import Trainer

pytestmark = pytest.mark.slow
PROMPTS = ["one red circle", "two green squares", "three blue triangles", "four yellow circles"]
MARGIN_KB = 0.05


# ------------------------------------------------------------------------------------------------ the quickstart
# The quickstart's claim (issue #15), on its first 10 of 60 epochs (the whole run would take the claims step's budget
# twice over; nothing in the run depends on its length): the README's first command (seed 42) gains more than +15
# points of exact accuracy on its training prompts without losing more than 2 on the held-out combinations, and its
# matched control (the same run with shuffled advantages) does not reach +15. One thread (the README's 2 give the same
# trajectory on this machine). Measured 2026-12-07: +26.6 / +10.2 points (training prompts / held-out; paired s.e.
# ~5), control +0.8 / -11.7; the whole run's numbers: docs/results.md. The two are first in this file, so that
# `-n 2` starts them side by side.
QUICKSTART_MARGIN = 0.15
QUICKSTART_HELDOUT_FLOOR = -0.02
QUICKSTART_EPOCHS = 10


def quickstart_paired_gain(seed: int, *overrides: str) -> dict:
    """Run the first ``QUICKSTART_EPOCHS`` epochs of `experiment=quickstart` and return its own paired measure at the
    last epoch (log.paired: the policy against the base model on the run's 128 + 128 fixed (prompt, noise) pairs of
    the trained prompts and of the held-out combinations): ``{"trained": gain, "held-out": gain}`` in exact-count
    accuracy."""
    cfg = compose("train", ["experiment=quickstart", f"seed={seed}", "threads=1", "log.tracker=none",
                            "monitor.every=0", "log.image_every=1000", "checkpoint.every=1000",
                            "log.paired.every=1000", f"train.num_epochs={QUICKSTART_EPOCHS}", *overrides])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir))
        trainer.setup()
        try:
            trainer.train()
        finally:
            trainer.cleanup()
        paired = read_metrics(Path(run_dir))[-1]["paired"]
    gains = {name: entry["exact"]["gain"] for name, entry in paired.items()}
    print(f"quickstart seed {seed} {' '.join(overrides)}: {gains}")
    return gains


@pytest.mark.claims
def test_the_quickstart_learns_to_count():
    gains = quickstart_paired_gain(42)
    assert gains["trained"] > QUICKSTART_MARGIN and gains["held-out"] > QUICKSTART_HELDOUT_FLOOR, gains


@pytest.mark.claims
def test_the_quickstart_with_shuffled_advantages_does_not():
    gains = quickstart_paired_gain(42, "advantage.shuffle=true")
    assert gains["trained"] < QUICKSTART_MARGIN, gains


# ------------------------------------------------------------------------------------------------ JPEG size in seconds
def fixed_eval(trainer: Trainer, prompts: list[str], n_per_prompt: int) -> torch.Tensor:
    """Per-image rewards of the current policy on fixed prompts and fixed noise (the same for every call)."""
    prompts = [p for p in prompts for _ in range(n_per_prompt)]
    generator = torch.Generator().manual_seed(derive_seed("fixed-eval"))
    with torch.no_grad():
        _, images = trainer.sample_batch(prompts, generator, trained_steps(trainer.sampler, trainer.counts.window))
        rewards, _ = trainer.reward_fn(images, prompts, [{}] * len(prompts))
    return rewards.float()


def probe_eval(trainer: Trainer, prompts: list[str], n_per_prompt: int) -> torch.Tensor:
    """Per-image rewards of the current policy on fixed prompts and one fixed noise per image (ddpo_cli/probe.py:
    images independent of their batch and of the run's group size)."""
    probe = plan_probe("fixed-eval", from_list(prompts), n_per_prompt * len(prompts), seed=0)
    sampling = trainer.cfg.sampler
    scorer = PairedMeasure([probe], trainer.model, trainer.sampler, trainer.reward_fn, sampling.guidance_scale,
                           sampling.batch_size, trainer.device, trainer.accelerator.autocast, 1, 1)
    return torch.from_numpy(scorer.scores(trainer.unwrapped, probe)["reward"]).float()


# The scores before training, per evaluation setting: every policy starts as the base model (LoRA B = 0), so the runs
# of a worker that evaluate alike score the same images before training.
BASE_SCORES: dict[str, torch.Tensor] = {}


def train_and_measure(prompts: list[str], *overrides: str, n_per_prompt: int = 4, model: str = "tiny_shapes",
                      evaluate=fixed_eval) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image rewards on fixed noise before and after training ``model`` on ``prompts``."""
    quoted = ",".join(f'"{p}"' for p in prompts)
    cfg = compose("train", [f"model={model}", "prompts=from_list", f"prompts.prompts=[{quoted}]",
                            "log.tracker=none", "threads=1", "log.image_every=1000", "checkpoint.every=1000",
                            "monitor.every=0", *overrides])
    evaluation = json.dumps([model, evaluate.__name__, prompts, n_per_prompt, OmegaConf.to_container(cfg.reward),
                             OmegaConf.to_container(cfg.sampler), list(cfg.train.timestep_window)])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir))
        trainer.setup()
        try:
            if evaluation not in BASE_SCORES:
                BASE_SCORES[evaluation] = evaluate(trainer, prompts, n_per_prompt)
            trainer.train()
            return BASE_SCORES[evaluation], evaluate(trainer, prompts, n_per_prompt)
        finally:
            trainer.cleanup()


def unconditional_run(reward: str, seed: int, *overrides: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image rewards (kB) on 64 fixed unconditional samples before and after `experiment=tiny_compressibility`
    (8 epochs x 32 samples, DDPO-IS, lr 3e-3, first half of the steps trained; ~20 s) with ``reward`` and
    ``overrides``."""
    return train_and_measure([""], "experiment=tiny_compressibility", f"reward={reward}", f"seed={seed}", *overrides,
                             n_per_prompt=64)


def unconditional_jpeg_gain(reward: str, seed: int, *overrides: str) -> float:
    """Change in mean reward (kB) of ``unconditional_run``."""
    before, after = unconditional_run(reward, seed, *overrides)
    print(f"{reward} seed {seed} {' '.join(overrides)}: {float((after - before).mean()):+.3f} kB")
    return float((after - before).mean())


# Every gain below has a matched control: the same run (seed 0) with advantage.shuffle=true, i.e. the same update
# sizes with the advantages permuted across the batch, so nothing links an update to a sample's reward. The control
# must fail the margin that the claim passes. Measured controls (kB): ddpo_sf +0.007, dpok +0.023, ddpo_is at
# clip 1e-2 +0.005. Two settings fail that test, so they are not used as evidence:
# - ddpo_is at the paper's clip range 1e-4 (the experiment's default) gains +0.126 but its control +0.071, and at
#   clip 1e-3 +0.228 against a control of +0.136: with two updates per epoch a tight clip makes the second update
#   drift, whatever the advantages. ddpo_is is tested at clip 1e-2 (+0.229, control +0.005);
# - incompressibility: ddpo_sf gains +0.322 but its control +0.264 (noisy updates make images noisier, i.e. larger
#   JPEGs), so only compressibility counts as a direction that drift cannot fake.
IS_CLIP = "algo.clip_range=1.0e-2"


@pytest.mark.claims
def test_ddpo_is_raises_jpeg_compressibility():
    # measured at clip 1e-2: +0.229 kB for seed 0 (paired standard error ~0.03; seeds 1 and 2: docs/results.md).
    # Training only the first half of the steps matters: with every step trained the gains were +0.07 to +0.11 at 3x
    # the learning rate (clip 1e-4).
    gain = unconditional_jpeg_gain("jpeg_compressibility", 0, IS_CLIP)
    assert gain > MARGIN_KB, gain


@pytest.mark.claims
@pytest.mark.parametrize("algo", ["ddpo_sf", "dpok"])
def test_policy_gradients_raise_jpeg_compressibility(algo):
    # seed 0, measured: ddpo_sf +0.188 kB, dpok +0.187 kB. Random-walk damage from noisy updates makes images
    # noisier (less compressible), so compressibility rising is the direction a broken gradient cannot fake.
    gain = unconditional_jpeg_gain("jpeg_compressibility", 0, f"algo={algo}")
    assert gain > MARGIN_KB, gain


@pytest.mark.claims
@pytest.mark.parametrize("overrides", [("algo=ddpo_is", IS_CLIP), ("algo=ddpo_sf",), ("algo=dpok",)],
                         ids=["ddpo_is", "ddpo_sf", "dpok"])
def test_the_same_run_with_shuffled_advantages_does_not_learn(overrides):
    # the matched control of the three tests above: measured +0.005 (ddpo_is, clip 1e-2), +0.007 (ddpo_sf),
    # +0.023 kB (dpok), each against a gain of about +0.19-0.23 kB with the advantages in place
    gain = unconditional_jpeg_gain("jpeg_compressibility", 0, *overrides, "advantage.shuffle=true")
    assert gain < MARGIN_KB, gain


# DiffusionNFT on the chain (algo=nft_chain, the experiment's lr 3e-3 and window): the advantage-weighted denoising
# loss, with the sampling policy's own prediction as the anchor, so that zero advantages give no gradient. Unlike the
# policy gradients above it moves the JPEG size both ways against its controls, incompressibility included, where
# ddpo_sf's control drifts by +0.264 kB. Measured (kB, seed 0, threads=1): compressibility +0.175 (control +0.021),
# incompressibility +0.197 (control -0.012).
@pytest.mark.claims
@pytest.mark.parametrize("reward", ["jpeg_compressibility", "jpeg_incompressibility"])
def test_nft_moves_jpeg_size_both_ways(reward):
    gain = unconditional_jpeg_gain(reward, 0, "algo=nft_chain")
    assert gain > MARGIN_KB, gain


@pytest.mark.claims
@pytest.mark.parametrize("reward", ["jpeg_compressibility", "jpeg_incompressibility"])
def test_nft_with_shuffled_advantages_does_not(reward):
    gain = unconditional_jpeg_gain(reward, 0, "algo=nft_chain", "advantage.shuffle=true")
    assert gain < MARGIN_KB, gain


def rwr_incompressibility_after(seed: int, *overrides: str) -> float:
    """Mean JPEG size (kB) of 64 fixed unconditional samples after an RWR run rewarded for incompressibility
    (10 denoising draws per sample; with 5, i.e. the experiment's window, rwr_sparse ended at 0.95 kB, seed 0)."""
    _, after = unconditional_run("jpeg_incompressibility", seed, "train.lr=1e-2", "train.timestep_window=[0.0,1.0]",
                                 *overrides)
    return float(after.mean())


@pytest.mark.claims
def test_reward_weighting_beats_plain_self_training():
    # Uniform weights (beta=0: fine-tuning on its own samples) drift to black whatever the reward: 1.09 -> 0.91 kB
    # for seeds 0, 1, 2. Weighted by incompressibility the same runs end at 1.20 / 1.14 / 1.13 kB (rwr, beta 20)
    # and 1.14 / 1.10 / 1.25 kB (rwr_sparse, top 10%). This test, seed 0: 0.90 vs 1.19 (rwr) and 1.13 (rwr_sparse).
    uniform = rwr_incompressibility_after(0, "algo=rwr", "algo.beta=0")
    weighted = {"rwr": rwr_incompressibility_after(0, "algo=rwr", "algo.beta=20"),
                "rwr_sparse": rwr_incompressibility_after(0, "algo=rwr_sparse")}
    print(f"incompressibility after {weighted} kB, uniform weights {uniform:.3f} kB")
    assert min(weighted.values()) > uniform + 2 * MARGIN_KB, (weighted, uniform)


def draft_reward(seed: int, *overrides: str) -> tuple[float, float]:
    """Mean reward on fixed prompts and noise before and after DRaFT (reward backprop through the last 2 of 6 DDIM
    steps) on ``reward=custom`` (brightness: the mean pixel, in [0, 1]) with ``overrides``."""
    before, after = train_and_measure(PROMPTS, "sampler.num_steps=6", "algo=draft", "algo.k=2", "reward=custom",
                                      "train.lr=3e-3", "sampler.batch_size=8", "sampler.num_batches_per_epoch=1",
                                      "train.batch_size=4", "train.gradient_accumulation_steps=1",
                                      "train.num_epochs=4", f"seed={seed}", "threads=2", *overrides)
    return float(before.mean()), float(after.mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_alignprop_raises_a_differentiable_reward(seed):
    before, after = draft_reward(seed)
    assert after > before + 0.02, (before, after)


def test_alignprop_with_the_opposite_reward_does_not_raise_brightness():
    # the control: the same run (seed 0) trained on darkness = 1 - brightness must fail the brightness margin
    dark_before, dark_after = draft_reward(0, "reward.fn.path=ddpo_cli.rewards.examples.darkness",
                                           "reward.name=darkness")
    brightness_change = dark_before - dark_after
    assert brightness_change < 0.02, brightness_change


# ------------------------------------------------------------------------------------------------ the flow family
# experiment=tiny_compressibility_flow: Flow-GRPO (ddpo_is with group advantages over groups of 8 images from one
# initial noise, on Flow-GRPO's SDE, noise level 0.7, 10 steps, the first 5 trained, lr 1e-3, clip 1e-2) on the
# unconditional samples of the shipped tiny_shapes_flow (SD3 architecture). Measured on 64 fixed seeds (one noise per
# image, ddpo_cli/probe.py) before and after; base 1.179 kB. Both directions must rise, each against its matched
# control (the same run with shuffled advantages). The claims train 8 epochs of 32 samples (two updates each), half
# the experiment's 64, with a margin of 0.1 kB instead of 0.2: measured 2026-12-07 (kB, seed 0), compressibility
# +0.175 (control +0.068), incompressibility +0.307 (control +0.010); with the experiment's 64 samples +0.289 / +0.447
# (seed 1: +0.353 / +0.474), controls +0.049 / +0.056. With batch advantages instead of groups the controls moved the
# JPEG size by -0.26 to +0.41 kB by themselves (docs/notes/).
FLOW_MARGIN_KB = 0.1


def flow_jpeg_gain(reward: str, seed: int, *overrides: str, images_per_epoch: int = 32) -> float:
    """Change in mean reward (kB) on 64 fixed seeds after `experiment=tiny_compressibility_flow` with
    ``images_per_epoch`` samples (batches of 32) per epoch and ``overrides``."""
    before, after = train_and_measure([""], "experiment=tiny_compressibility_flow", f"reward={reward}",
                                      f"seed={seed}", f"sampler.num_batches_per_epoch={images_per_epoch // 32}",
                                      *overrides, n_per_prompt=64, model="tiny_shapes_flow", evaluate=probe_eval)
    gain = float((after - before).mean())
    print(f"flow {reward} seed {seed} {images_per_epoch} images/epoch {' '.join(overrides)}: {gain:+.3f} kB")
    return gain


@pytest.mark.claims
@pytest.mark.parametrize("reward", ["jpeg_compressibility", "jpeg_incompressibility"])
def test_flow_grpo_moves_jpeg_size_both_ways(reward):
    gain = flow_jpeg_gain(reward, 0)
    assert gain > FLOW_MARGIN_KB, gain


@pytest.mark.claims
@pytest.mark.parametrize("reward", ["jpeg_compressibility", "jpeg_incompressibility"])
def test_flow_grpo_with_shuffled_advantages_does_not(reward):
    gain = flow_jpeg_gain(reward, 0, "advantage.shuffle=true")
    assert gain < FLOW_MARGIN_KB, gain


# ------------------------------------------------------------------------------------------------ reward hacking
# Issue #26: `experiment=hacking_demo` over-optimises JPEG compressibility on the captioned toy world (images go
# black, the shape counter's gold reward falls); its monitor rule stops the run by itself and checkpoints/best/ holds
# the check the gold reward preferred. Measured 2026-12-06 (seed 0): gold 0.794 -> 0.402 by epoch 7, where the rule
# fired; the same run without the rule went on to 0.231 at epoch 19 (scripts/hacking_demo.py, docs/monitoring.md).
@pytest.mark.claims
def test_a_monitor_stops_a_hacking_run_and_keeps_the_checkpoint_the_gold_reward_prefers():
    cfg = compose("train", ["experiment=hacking_demo", "seed=0", "threads=1", "log.tracker=none",
                            "log.image_every=1000"])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir))
        trainer.setup()
        try:
            trainer.train()
        finally:
            trainer.cleanup()
        rows = read_metrics(Path(run_dir))
        checks = {r["epoch"]: r["monitor"]["gold_reward"] for r in rows if "monitor" in r}
        best = [r["epoch"] for r in rows if r.get("monitor_best")][-1]
        best_state = torch.load(Path(run_dir) / "checkpoints" / "best" / "training_state.pt", weights_only=False)
    print(f"hacking demo: gold by check {checks}; stopped at {rows[-1]['epoch']}, best {best}")
    assert "monitor_stop" in rows[-1] and rows[-1]["epoch"] < cfg.train.num_epochs - 1   # stopped by itself
    assert checks[best] == max(checks.values()) and best_state["epoch"] == best
    assert checks[best] - checks[rows[-1]["epoch"]] > 0.1                                # what it was stopped for
