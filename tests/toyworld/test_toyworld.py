"""The toy shapes world: renderer, detector, counting reward, prompt sets and the shipped tiny model."""
from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from ddpo_cli.rewards.shapes_counting import ShapesCounting
from ddpo_cli.toyworld.detect import check, classify_shape, detect, summarise
from ddpo_cli.toyworld.prompts import HELDOUT, shapes_heldout, shapes_train
from ddpo_cli.toyworld.render import all_combos, caption, metadata, render, render_dataset, shape_mask

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "ddpo_cli" / "assets" / "tiny_shapes"


def as_tensor(*images: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` images -> float ``[B, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


# ----------------------------------------------------------------------------------------------------- renderer
def test_render_is_deterministic_and_seed_dependent():
    assert np.array_equal(render(3, "blue", "square", seed=7), render(3, "blue", "square", seed=7))
    assert not np.array_equal(render(3, "blue", "square", seed=7), render(3, "blue", "square", seed=8))
    a, b = render_dataset(20, seed=1), render_dataset(20, seed=1)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert a[0].shape == (20, 32, 32, 3) and a[0].dtype == np.uint8


def test_captions_and_metadata():
    assert caption(1, "red", "circle") == "one red circle"
    assert caption(3, "blue", "square") == "three blue squares"
    assert caption(4, "yellow", "triangle") == "four yellow triangles"
    assert metadata(2, "green", "circle") == {"count": 2, "colour": "green", "shape": "circle"}
    assert len(all_combos()) == 48 and len({caption(*c) for c in all_combos()}) == 48


def test_render_draws_only_the_palette_colour():
    image = render(2, "green", "triangle", seed=3)
    colours = {tuple(p) for p in image.reshape(-1, 3)}
    assert colours == {(0, 0, 0), (0, 255, 0)}


# ----------------------------------------------------------------------------------------------------- detector
def test_detector_is_right_on_rendered_images():
    images, _, metas = render_dataset(400, seed=123)
    correct = [check(detect(image), meta)["exact"] for image, meta in zip(images, metas)]
    assert np.mean(correct) >= 0.99


def test_detector_tolerates_blur_and_stretched_shapes():
    from scipy import ndimage

    images, _, metas = render_dataset(200, seed=9)
    blurred = [ndimage.gaussian_filter(im.astype(float), sigma=(0.8, 0.8, 0)).round().astype(np.uint8) for im in images]
    assert np.mean([check(detect(im), meta)["exact"] for im, meta in zip(blurred, metas)]) >= 0.97
    rounded = shape_mask("square", 10).copy()
    rounded[[0, 0, -1, -1], [0, -1, 0, -1]] = False                     # a square with clipped corners
    assert classify_shape(rounded) == "square"
    assert classify_shape(shape_mask("circle", 9, 13)) == "circle"     # an ellipse
    assert classify_shape(shape_mask("triangle", 8, 12)) == "triangle"


def test_detector_summary_on_mixed_and_empty_images():
    assert summarise(detect(np.zeros((32, 32, 3), np.uint8))) == {"count": 0, "colour": None, "shape": None}
    image = render(1, "red", "square", seed=0).copy()
    image[render(1, "blue", "circle", seed=5).any(-1) & ~image.any(-1)] = (0, 0, 255)   # a blue circle behind it
    colours = sorted(d.colour for d in detect(image))
    assert "red" in colours and "blue" in colours


# ----------------------------------------------------------------------------------------------------- reward
def test_reward_is_max_for_the_exact_image_and_graded_by_count():
    reward = ShapesCounting()
    target = metadata(2, "red", "circle")
    images = as_tensor(*(render(n, "red", "circle", seed=n) for n in (2, 1, 3, 4)))   # exact, -1, +1, +2
    rewards, info = reward(images, ["two red circles"] * 4, [target] * 4)
    assert rewards[0].item() == pytest.approx(1.0)
    assert rewards[1] < rewards[0] and rewards[2] < rewards[0]
    assert rewards[3] < rewards[2]
    assert info["exact"] == [True, False, False, False]
    assert info["detected_count"] == [2, 1, 3, 4]
    assert info["count_correct"] == [True, False, False, False]


def test_reward_penalises_wrong_colour_and_shape():
    reward = ShapesCounting()
    target = metadata(3, "blue", "square")
    images = as_tensor(render(3, "blue", "square", 0), render(3, "red", "square", 0), render(3, "blue", "circle", 0),
                       np.zeros((32, 32, 3), np.uint8))
    rewards, info = reward(images, ["three blue squares"] * 4, [target] * 4)
    assert rewards[0] > rewards[1] and rewards[0] > rewards[2] and rewards[1] > rewards[3]
    assert info["colour_correct"] == [True, False, True, False]
    assert info["shape_correct"] == [True, True, False, False]


def test_reward_resizes_larger_images():
    image = as_tensor(render(4, "yellow", "triangle", seed=2))
    big = torch.nn.functional.interpolate(image, size=(64, 64), mode="nearest")        # [1, 3, 64, 64]
    rewards, info = ShapesCounting()(big, ["four yellow triangles"], [metadata(4, "yellow", "triangle")])
    assert rewards.shape == (1,) and rewards.item() == pytest.approx(1.0)


def test_reward_yaml_instantiates():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    reward = instantiate(OmegaConf.load(ROOT / "conf" / "reward" / "shapes_counting.yaml"))
    assert isinstance(reward, ShapesCounting)
    for name, size in (("shapes_train", 38), ("shapes_heldout", 10)):
        assert len(instantiate(OmegaConf.load(ROOT / "conf" / "prompts" / f"{name}.yaml"))) == size


# ----------------------------------------------------------------------------------------------------- prompt sets
def test_prompt_sets_split_the_combos():
    train, heldout = shapes_train(), shapes_heldout()
    assert len(train) == 38 and len(heldout) == 10 and len(HELDOUT) == 10
    assert set(train.prompts).isdisjoint(heldout.prompts)
    assert set(train.prompts) | set(heldout.prompts) == {caption(*c) for c in all_combos()}
    for attribute, values in (("count", {1, 2, 3, 4}), ("colour", {"red", "green", "blue", "yellow"}),
                              ("shape", {"circle", "square", "triangle"})):
        assert {meta[attribute] for _, meta in train.items} == values   # every attribute value still trained
    for prompt, meta in train.items + heldout.items:
        assert prompt == caption(meta["count"], meta["colour"], meta["shape"])
    assert len(shapes_train(include_heldout=True)) == 48
    assert len(shapes_train(low=1, high=2, colours=["red"])) == 4


# ----------------------------------------------------------------------------------------------------- the model
@pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="tiny_shapes model not built yet")
def test_shipped_model_draws_what_it_is_asked():
    # measured: 16 of 16 images exactly right (count, colour and shape; DDIM 20 steps, eta 1, CFG 5, seed 0). A text
    # encoder that loaded randomly initialised (transformers 4.x reading 5.x's key layout did) gets colours wrong.
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["one red circle", "one blue square", "one green triangle", "one yellow circle"] * 4
    images = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, eta=1.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    _, info = ShapesCounting()(images, prompts, [metadata(1, p.split()[1], p.split()[2]) for p in prompts])
    assert sum(info["colour_correct"]) >= 14 and sum(info["exact"]) >= 12, info


def test_shipped_model_loads_offline_and_generates():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("two red circles", num_inference_steps=4, guidance_scale=5.0, eta=1.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32)
    assert torch.isfinite(image).all() and 0 <= image.min() and image.max() <= 1
    size_mb = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file()) / 1e6
    assert size_mb < 25


FLOW_MODEL = ROOT / "ddpo_cli" / "assets" / "tiny_shapes_flow"


def test_shipped_flow_model_draws_what_it_is_asked():
    # the flow twin (SD3 architecture) through plain StableDiffusion3Pipeline: its own FlowMatchEuler ODE, CFG 4.5.
    # measured: 16 of 16 right colour, 16 right shape, 16 exactly right (one object each; seed 0)
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(FLOW_MODEL, text_encoder_3=None, tokenizer_3=None,
                                                    feature_extractor=None, image_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["one red circle", "one blue square", "one green triangle", "one yellow circle"] * 4
    images = pipe(prompts, num_inference_steps=10, guidance_scale=4.5, output_type="pt", max_sequence_length=8,
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (16, 3, 32, 32) and torch.isfinite(images).all()
    _, info = ShapesCounting()(images, prompts, [metadata(1, p.split()[1], p.split()[2]) for p in prompts])
    assert sum(info["colour_correct"]) >= 14 and sum(info["exact"]) >= 12, info
    files = [f for f in FLOW_MODEL.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) / 1e6 < 25
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth")], "weights ship as safetensors only"


def test_shipped_flow_model_loads_through_the_model_option():
    from ddpo_cli.config import compose
    from ddpo_cli.models import load_model

    cfg = compose("train", ["model=tiny_shapes_flow", "sampler=flow_sde"])
    model = load_model(cfg.model, torch.device("cpu"), torch.float32, lora_seed=0)
    assert model.family == "sd3" and model.resolution == 32 and model.latent_shape() == (4, 16, 16)
    cond = model.encode(["two red circles"])
    # the CLIP encoders' 16 positions + the zero T5 tokens StableDiffusion3Pipeline feeds without a T5: 8
    # (max_sequence_length, as trained) from diffusers 0.36; before, the CLIP length (16) whatever max_sequence_length
    import diffusers
    from packaging.version import Version

    zero_t5 = 8 if Version(diffusers.__version__).release >= (0, 36) else model.pipe.tokenizer_max_length
    assert cond.embeds.shape[1] == 16 + zero_t5


@pytest.mark.slow
def test_flow_grpo_on_the_flow_toy_world_runs_as_documented(tmp_path, cache_dir):
    # the command of issue #13 (one epoch of its 100): Flow-GRPO = ddpo_is + Flow-GRPO's SDE + group advantages
    from conftest import read_metrics, ddpo

    result = ddpo("train", "model=tiny_shapes_flow", "algo=ddpo_is", "sampler=flow_sde", "advantage.mode=group",
                     "sampler.group_size=8", "train.num_epochs=1", "log.tracker=none", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    row = read_metrics(tmp_path)[0]
    assert row["samples"] == 16 and row["nonfinite_rewards"] == 0
    assert (tmp_path / "checkpoints" / "epoch_0000" / "pytorch_lora_weights.safetensors").exists()
