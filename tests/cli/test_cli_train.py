"""End to end through the real CLI on the tiny model: outputs, golden numbers, resume, LoRA loading, bad input."""
from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TRAIN as FAST
from conftest import ddpo, load_lora_plainly, read_metrics
pytestmark = pytest.mark.slow


def lora_of(run_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "checkpoints" / f"epoch_{epoch:04d}" / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def full_run(trained_run) -> Path:
    """The shared reference run (``TRAIN``, 2 epochs): read only."""
    return trained_run


def test_outputs_of_a_run(full_run):
    rows = read_metrics(full_run)
    assert [r["epoch"] for r in rows] == [0, 1]
    for key in ("epoch", "reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "samples", "epoch_seconds",
                "sample_seconds", "train_seconds", "global_step"):
        assert key in rows[0], key
    assert rows[0]["samples"] == 4 and rows[1]["global_step"] == 2  # 4 samples / (2 x 2) = 1 update per epoch
    assert (full_run / "images" / "epoch_0000.png").exists() and (full_run / "images" / "epoch_0001.png").exists()
    assert (full_run / "reward_curve.png").exists() and (full_run / ".hydra" / "config.yaml").exists()
    for epoch in (0, 1):
        ckpt = full_run / "checkpoints" / f"epoch_{epoch:04d}"
        assert (ckpt / "pytorch_lora_weights.safetensors").exists() and (ckpt / "training_state.pt").exists()
    assert not list((full_run / "checkpoints").glob(".*tmp"))
    assert list(full_run.rglob("events.out.tfevents*")), "tensorboard events expected (default tracker)"


def test_ratio_is_exactly_one_before_the_first_update(full_run):
    # epoch 0 has a single update, so all its (sample, timestep) pairs are evaluated before any optimizer step:
    # training recomputes exactly the policy that sampled (same CFG, embeddings, dtype path), although it batches
    # pairs differently from sampling
    first = read_metrics(full_run)[0]
    assert first["approx_kl"] == 0.0 and first["ratio_mean"] == 1.0 and first["clipfrac"] == 0.0


@pytest.mark.skipif(not torch.__version__.startswith("2.14.1") or platform.machine() != "x86_64",
                    reason="golden numbers recorded with torch 2.14.1 on the x86_64 CI machine; other builds round "
                           "differently")
def test_golden_numbers(full_run):
    rows = read_metrics(full_run)
    # recorded on the reference CPU machine (torch 2.14.1, x86_64, 2 threads): catches silent changes to sampling,
    # rewards or updates there; skipped elsewhere
    # JPEG sizes are multiples of 1 byte, so a mean over 4 images moves in steps of 0.00025 kB
    assert [r["reward_mean"] for r in rows[:2]] == pytest.approx([-1.58200, -1.57900], abs=1e-4)
    assert rows[0]["grad_norm"] == pytest.approx(0.0163969, rel=1e-3)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(full_run, tmp_path):
    run_dir = tmp_path / "resumed"
    first = ddpo("train", *FAST, "train.num_epochs=1", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    second = ddpo("train", *FAST, "train.num_epochs=2", f"resume={run_dir}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr + second.stdout
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [0, 1] and rows[1]["global_step"] == 2
    resumed, uninterrupted = lora_of(run_dir, 1), lora_of(full_run, 1)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key   # bit-identical (prompts encoded one by one)
    assert rows[1]["reward_mean"] == pytest.approx(read_metrics(full_run)[1]["reward_mean"], abs=1e-6)


def test_bad_input_is_one_line_exit_2_and_loses_nothing(full_run):
    before = {p: p.read_bytes() for p in full_run.rglob("*") if p.is_file()}
    for args in (["train.lr=fast"], ["sampler.eta=0"], ["train.batch_size=3"], ["model=sd15", "model.pretrained=/no/such/model"]):
        result = ddpo("train", *FAST, "train.num_epochs=3", f"resume={full_run}", *args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error:"), (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, args
    for path, content in before.items():  # every file is still there, unchanged (logs may only grow)
        assert path.exists() and path.read_bytes()[: len(content)] == content, path
    assert len(read_metrics(full_run)) == 2


def test_saved_lora_loads_with_plain_diffusers_and_reproduces_images(full_run, tiny_model_dir):
    from diffusers import StableDiffusionPipeline
    from omegaconf import OmegaConf

    from ddpo_cli import checkpoint
    from ddpo_cli.models import load_model
    from ddpo_cli.models.sd import StableDiffusion
    from ddpo_cli.noise import generator_noise
    from ddpo_cli.rollout import run_chain
    from ddpo_cli.samplers.ddim import DDIMSampler

    ckpt = full_run / "checkpoints" / "epoch_0001"
    plain = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    load_lora_plainly(plain, ckpt)

    cfg = OmegaConf.load(full_run / ".hydra" / "config.yaml")
    ours = load_model(cfg.model, torch.device("cpu"), torch.float32)
    checkpoint.load_weights(ours, ours.denoiser, ckpt, use_lora=True)
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)

    def images(pipe):
        model = StableDiffusion(pipe, "cpu", torch.float32)  # the family wrapped around a plain pipeline
        sampler = DDIMSampler(dict(pipe.scheduler.config), 4, eta=1.0)
        noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        generator = torch.Generator().manual_seed(1)
        final, _ = run_chain(model, sampler, pipe.unet, noise, model.encode(["cat", "dog"]), 5.0,
                             generator_noise(noise.shape, generator, "cpu"))
        return final

    torch.testing.assert_close(images(plain), images(ours.pipe), rtol=1e-4, atol=1e-4)
    assert (images(plain) - images(base)).abs().max() > 1e-4, "the LoRA should change the images"


def test_full_fine_tuning_saves_the_unet_and_resumes(tmp_path):
    run_dir = tmp_path / "full_ft"
    args = [*FAST, "model.use_lora=false", "train.lr=1e-5", "log.tracker=none"]
    result = ddpo("train", *args, "train.num_epochs=1", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "epoch_0000" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert read_metrics(run_dir)[0]["kl_to_base"] is None  # no base model without a second copy
    resumed = ddpo("train", *args, "train.num_epochs=2", f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(run_dir)] == [0, 1]


def test_ls_lists_groups():
    result = ddpo("ls", "reward")
    assert result.returncode == 0 and "jpeg_compressibility" in result.stdout
    assert ddpo("ls", "nope").returncode == 2


def test_every_algorithm_runs_end_to_end_in_one_sweep(tmp_path):
    # one `ddpo train -m` process runs the jobs one after another: this also checks that accelerate's global state
    # is reset between sweep jobs
    sweep = tmp_path / "sweep"
    result = ddpo("train", "-m", *FAST, "train.num_epochs=1", "log.tracker=none",
                     "algo=ddpo_sf,rwr,rwr_sparse,dpok,baseline", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    backprop = ddpo("train", "-m", *FAST, "train.num_epochs=1", "log.tracker=none", "reward=custom",
                       "algo=alignprop,draft", f"hydra.sweep.dir={sweep / 'backprop'}")
    assert backprop.returncode == 0, backprop.stderr[-3000:]
    jobs = sorted(sweep.glob("job_*")) + sorted((sweep / "backprop").glob("job_*"))
    assert len(jobs) == 7
    for job in jobs:
        row = read_metrics(job)[0]
        no_update = "algo=baseline" in (job / ".hydra" / "overrides.yaml").read_text()
        assert row["global_step"] == (0 if no_update else 1) and row["samples"] == 4, job
        lora = lora_of(job, 0)
        # LoRA B starts at zero: a finite update moves it (a NaN loss would have stopped the run with exit 2)
        moved = any(v.abs().sum() > 0 for k, v in lora.items() if "lora.up" in k)
        assert moved != no_update and all(torch.isfinite(v).all() for v in lora.values()), job


def test_quickstart_smoke_run_and_its_eval(tmp_path):
    # the README's main job, shortened to 2 epochs of one 32-image batch (4 groups x 8) in updates of 16, then the
    # README's eval
    run_dir = tmp_path / "quickstart"
    result = ddpo("train", "experiment=quickstart", "train.num_epochs=2", "sampler.num_batches_per_epoch=1",
                     "train.gradient_accumulation_steps=1", "log.tracker=none", "threads=2",
                     f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert [r["samples"] for r in rows] == [32, 32] and rows[1]["global_step"] == 4  # 32 / 16 = 2 updates per epoch
    assert 0 <= rows[0]["reward_info/exact"] <= 1 and rows[0]["kl_to_base"] >= 0
    assert (run_dir / "checkpoints" / "epoch_0001" / "pytorch_lora_weights.safetensors").exists()
    assert (run_dir / "images" / "epoch_0001.png").exists()
    evaluated = ddpo("eval", f"run={run_dir}", "n=4", "grid_images=2", f"hydra.run.dir={run_dir / 'eval'}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = (run_dir / "eval" / "eval.md").read_text()
    assert "shapes_counting/exact" in report and "`shapes_train`" in report
