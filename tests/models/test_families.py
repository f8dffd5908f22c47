"""Model families through the real CLI, checked against diffusers' own pipelines.

- ``ddpo sample sampler.eta=0`` is deterministic DDIM: its PNGs equal ``StableDiffusionPipeline(..., eta=0)`` from the
  same initial noise;
- SDXL (``model=tiny_sdxl``): every algorithm runs one epoch in one sweep; the LoRA a run writes loads with plain
  ``StableDiffusionXLPipeline.load_lora_weights`` and diffusers' own SDXL sampling loop then draws the images that
  ``ddpo sample`` draws from that checkpoint (which also pins our SDXL conditioning: both text encoders, the pooled
  embedding, the zeroed negative prompt and the size/crop time ids).

Tolerance: one 8-bit level (1/255) per pixel of the PNGs. Measured on this machine: our deterministic images equal
diffusers' exactly (max abs difference 0.0 in float32, before the PNG), so the level only allows another CPU's float
rounding to flip a pixel sitting on a rounding boundary.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_lora_plainly, read_metrics, ddpo

pytestmark = pytest.mark.slow
STEPS = ["sampler.num_steps=4", "sampler.batch_size=4", "sampler.num_batches_per_epoch=1", "train.batch_size=2",
         "train.gradient_accumulation_steps=2", "advantage.mode=batch", "log.grid_images=4", "log.tracker=none",
         "threads=2", "train.lr=1e-2"]
ONE_LEVEL = 1 / 255 + 1e-6


def ok(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def sampled(out_dir: Path) -> list[tuple[dict, np.ndarray]]:
    """``ddpo sample``'s rows with their PNGs as float arrays ``[3, H, W]`` in [0, 1]."""
    rows = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    return [(row, np.asarray(Image.open(out_dir / row["file"]), dtype=np.float64).transpose(2, 0, 1) / 255)
            for row in rows]


def diffusers_image(pipe, prompt: str, seed: int, steps: int, guidance: float) -> np.ndarray:
    """diffusers' own deterministic loop (DDIM eta = 0 for UNet pipelines, the flow Euler ODE for SD3) from the
    initial noise that ``ddpo sample`` draws for ``seed``."""
    from diffusers import DDIMScheduler

    from ddpo_cli.models.flux import pack

    flow, flux = hasattr(pipe, "transformer"), type(pipe).__name__ == "FluxPipeline"
    denoiser = pipe.transformer if flow else pipe.unet
    if not flow:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    channels = pipe.vae.config.latent_channels
    size = 32 // pipe.vae_scale_factor if flux else denoiser.config.sample_size  # the tiny models draw 32 px
    latents = torch.randn((channels, size, size), generator=torch.Generator().manual_seed(seed))[None]
    extra = {"max_sequence_length": 16} if flow else {"eta": 0.0}  # as conf/model/tiny_sd3.yaml, tiny_flux.yaml
    if flux:  # FluxPipeline takes packed latents and the image size
        latents, extra = pack(latents), {**extra, "height": 32, "width": 32}
    with torch.no_grad():
        image = pipe(prompt, latents=latents, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                     **extra).images[0]
    return (image.float().clamp(0, 1) * 255).round().numpy() / 255


def test_deterministic_sample_equals_diffusers_ddim(tmp_path, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "sample"
    ok(ddpo("sample", "model=tiny", "sampler.eta=0", "sampler.num_steps=5", "sampler.guidance_scale=4.0",
               "sampler.batch_size=3", "n=2", "num_prompts=2", "threads=2", f"hydra.run.dir={out}"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    images = sampled(out)
    assert len(images) == 4
    for row, ours in images:
        expected = diffusers_image(pipe, row["prompt"], row["seed"], 5, 4.0)
        assert np.abs(ours - expected).max() <= ONE_LEVEL, row
    # deterministic: a second draw of the same seeds gives the same PNGs byte for byte
    again = tmp_path / "again"
    ok(ddpo("sample", "model=tiny", "sampler.eta=0", "sampler.num_steps=5", "sampler.guidance_scale=4.0",
               "sampler.batch_size=1", "n=2", "num_prompts=2", "threads=2", f"hydra.run.dir={again}"))
    for (_, first), (_, second) in zip(images, sampled(again)):
        assert np.array_equal(first, second)


@pytest.fixture(scope="module")
def sdxl_sweep(tmp_path_factory, cache_dir) -> Path:
    """Every algorithm, one epoch each, on the tiny SDXL model, in one `ddpo train -m` process (brightness reward:
    differentiable, so the backprop algorithms run too)."""
    sweep = tmp_path_factory.mktemp("sdxl")
    ok(ddpo("train", "-m", "model=tiny_sdxl", *STEPS, "train.num_epochs=1", "reward=custom",
               "algo=ddpo_is,ddpo_sf,dpok,rwr,rwr_sparse,nft_chain,baseline,alignprop,draft", f"hydra.sweep.dir={sweep}"))
    return sweep


def test_every_algorithm_runs_on_sdxl(sdxl_sweep):
    jobs = sorted(sdxl_sweep.glob("job_*"))
    assert len(jobs) == 9
    for job in jobs:
        algo = next(o.split("=")[1] for o in (job / ".hydra" / "overrides.yaml").read_text().split()
                    if o.startswith("algo="))
        row = read_metrics(job)[0]
        assert row["global_step"] == (0 if algo == "baseline" else 1) and row["samples"] == 4, job
        assert np.isfinite(row["reward_mean"]) and (algo == "baseline" or np.isfinite(row["loss"])), row
        assert (job / "checkpoints" / "epoch_0000" / "pytorch_lora_weights.safetensors").exists()


def test_sdxl_lora_loads_in_plain_diffusers_and_reproduces_ddpo_sample(sdxl_sweep, tmp_path, cache_dir):
    from diffusers import StableDiffusionXLPipeline
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from ddpo_cli.models.tiny import materialise_tiny

    run = next(job for job in sorted(sdxl_sweep.glob("job_*"))
               if "algo=ddpo_sf" in (job / ".hydra" / "overrides.yaml").read_text())
    checkpoint = run / "checkpoints" / "epoch_0000"
    assert any(k.startswith("unet.") and v.abs().sum() > 0
               for k, v in load_file(checkpoint / "pytorch_lora_weights.safetensors").items() if "lora.up" in k)
    out = tmp_path / "sample"
    ok(ddpo("sample", f"run={run}", "sampler.eta=0", "n=2", "num_prompts=2", "threads=2",
               f"hydra.run.dir={out}"))
    model_cfg = OmegaConf.load(run / ".hydra" / "config.yaml").model
    folder = materialise_tiny(model_cfg.tiny, str(cache_dir), "sdxl")
    plain = StableDiffusionXLPipeline.from_pretrained(folder)
    plain.set_progress_bar_config(disable=True)
    base = [diffusers_image(plain, row["prompt"], row["seed"], 4, 5.0) for row, _ in sampled(out)]
    load_lora_plainly(plain, checkpoint)
    for (row, ours), before in zip(sampled(out), base):
        expected = diffusers_image(plain, row["prompt"], row["seed"], 4, 5.0)
        assert np.abs(ours - expected).max() <= ONE_LEVEL, row
        assert row["checkpoint"].endswith("epoch_0000")
    assert any(np.abs(ours - before).max() > ONE_LEVEL for (_, ours), before in zip(sampled(out), base)), \
        "the LoRA should change the images"


def test_a_deterministic_draft_run_is_evaluated_with_its_own_sampler(tmp_path):
    # DRaFT / AlignProp may train with eta = 0; ddpo eval (and sample) then draw with that same deterministic sampler
    run = tmp_path / "draft"
    ok(ddpo("train", "model=tiny", *STEPS, "train.num_epochs=1", "algo=draft", "reward=custom", "sampler.eta=0",
               f"hydra.run.dir={run}"))
    ok(ddpo("eval", f"run={run}", "n=2", "num_prompts=2", "threads=2", f"hydra.run.dir={run / 'eval'}"))
    summary = json.loads((run / "eval" / "eval.json").read_text())
    assert summary["sampler"]["eta"] == 0.0 and [m["name"] for m in summary["models"]] == ["base", "epoch_0000"]


@pytest.fixture(scope="module")
def sd3_sweep(tmp_path_factory, cache_dir) -> Path:
    """Every algorithm, one epoch each, on the tiny SD3 (flow) model with Flow-GRPO's SDE, in one process."""
    sweep = tmp_path_factory.mktemp("sd3")
    ok(ddpo("train", "-m", "model=tiny_sd3", "sampler=flow_sde", *STEPS, "train.num_epochs=1", "reward=custom",
               "algo=ddpo_is,ddpo_sf,dpok,rwr,rwr_sparse,nft_chain,baseline,alignprop,draft", f"hydra.sweep.dir={sweep}"))
    return sweep


def test_every_algorithm_runs_on_sd3(sd3_sweep):
    jobs = sorted(sd3_sweep.glob("job_*"))
    assert len(jobs) == 9
    for job in jobs:
        algo = next(o.split("=")[1] for o in (job / ".hydra" / "overrides.yaml").read_text().split()
                    if o.startswith("algo="))
        row = read_metrics(job)[0]
        assert row["global_step"] == (0 if algo == "baseline" else 1) and row["samples"] == 4, job
        assert np.isfinite(row["reward_mean"]) and (algo == "baseline" or np.isfinite(row["loss"])), row
        if algo in ("ddpo_is", "ddpo_sf", "dpok"):  # the first update recomputes the sampler's own policy
            assert row["approx_kl"] == 0.0 and row["ratio_mean"] == 1.0, (algo, row)
        if algo in ("ddpo_is", "ddpo_sf", "dpok", "baseline"):
            assert row["kl_to_base"] >= 0


def test_sd3_lora_loads_in_plain_diffusers_and_reproduces_the_ode(sd3_sweep, tmp_path, cache_dir):
    from diffusers import StableDiffusion3Pipeline
    from omegaconf import OmegaConf

    from ddpo_cli.models import absent_components
    from ddpo_cli.models.tiny import materialise_tiny

    run = next(job for job in sorted(sd3_sweep.glob("job_*"))
               if "algo=ddpo_sf" in (job / ".hydra" / "overrides.yaml").read_text())
    out = tmp_path / "sample"
    ok(ddpo("sample", f"run={run}", "sampler.name=flow_ode", "n=2", "num_prompts=2", "threads=2",
               f"hydra.run.dir={out}"))
    folder = materialise_tiny(OmegaConf.load(run / ".hydra" / "config.yaml").model.tiny, str(cache_dir), "sd3")
    plain = StableDiffusion3Pipeline.from_pretrained(folder, **absent_components(folder))
    plain.set_progress_bar_config(disable=True)
    guidance = OmegaConf.load(run / ".hydra" / "config.yaml").sampler.guidance_scale
    base = [diffusers_image(plain, row["prompt"], row["seed"], 4, guidance) for row, _ in sampled(out)]
    load_lora_plainly(plain, run / "checkpoints" / "epoch_0000")
    for (row, ours), before in zip(sampled(out), base):
        assert np.abs(ours - diffusers_image(plain, row["prompt"], row["seed"], 4, guidance)).max() <= ONE_LEVEL, row
    assert any(np.abs(ours - before).max() > ONE_LEVEL for (_, ours), before in zip(sampled(out), base)), \
        "the LoRA should change the images"


@pytest.fixture(scope="module")
def flux_sweep(tmp_path_factory, cache_dir) -> Path:
    """Every algorithm, one epoch each, on the tiny FLUX model (guidance input 3.5) with Flow-GRPO's SDE."""
    sweep = tmp_path_factory.mktemp("flux")
    ok(ddpo("train", "-m", "model=tiny_flux", "sampler=flow_sde", "sampler.guidance_scale=3.5", *STEPS,
               "train.num_epochs=1", "reward=custom",
               "algo=ddpo_is,ddpo_sf,dpok,rwr,rwr_sparse,nft_chain,baseline,alignprop,draft", f"hydra.sweep.dir={sweep}"))
    return sweep


def test_every_algorithm_runs_on_flux_and_its_lora_loads_in_plain_diffusers(flux_sweep, tmp_path, cache_dir):
    from diffusers import FluxPipeline
    from omegaconf import OmegaConf

    from ddpo_cli.models import absent_components
    from ddpo_cli.models.tiny import materialise_tiny

    jobs = sorted(flux_sweep.glob("job_*"))
    assert len(jobs) == 9
    for job in jobs:
        row = read_metrics(job)[0]
        baseline = "algo=baseline" in (job / ".hydra" / "overrides.yaml").read_text()
        assert row["global_step"] == (0 if baseline else 1) and np.isfinite(row["reward_mean"]), job
    run = next(job for job in jobs if "algo=ddpo_sf" in (job / ".hydra" / "overrides.yaml").read_text())
    assert read_metrics(run)[0]["approx_kl"] == 0.0
    out = tmp_path / "sample"
    ok(ddpo("sample", f"run={run}", "sampler.name=flow_ode", "n=2", "num_prompts=2", "threads=2",
               f"hydra.run.dir={out}"))
    folder = materialise_tiny(OmegaConf.load(run / ".hydra" / "config.yaml").model.tiny, str(cache_dir), "flux")
    plain = FluxPipeline.from_pretrained(folder, **absent_components(folder))
    plain.set_progress_bar_config(disable=True)
    load_lora_plainly(plain, run / "checkpoints" / "epoch_0000")
    for row, ours in sampled(out):
        assert np.abs(ours - diffusers_image(plain, row["prompt"], row["seed"], 4, 3.5)).max() <= ONE_LEVEL, row


def test_a_flow_run_is_evaluated_with_the_ode(sd3_sweep, tmp_path):
    run = next(job for job in sorted(sd3_sweep.glob("job_*"))
               if "algo=ddpo_is" in (job / ".hydra" / "overrides.yaml").read_text())
    ok(ddpo("eval", f"run={run}", "n=2", "num_prompts=1", "threads=2", f"hydra.run.dir={tmp_path / 'eval'}"))
    summary = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert summary["sampler"]["name"] == "flow_ode" and [m["name"] for m in summary["models"]] == ["base", "epoch_0000"]
