"""CLIP, aesthetic, mix and custom rewards on tiny randomly initialised models saved locally (no network)."""
from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ddpo_cli.errors import UserError  # noqa: E402
from ddpo_cli.rewards.aesthetic import Aesthetic, AestheticMLP  # noqa: E402
from ddpo_cli.rewards.base import FunctionReward, Reward  # noqa: E402
from ddpo_cli.rewards.clip import ClipScore, ClipZeroShot  # noqa: E402
from ddpo_cli.rewards.mix import Mix  # noqa: E402

CONF = Path(__file__).resolve().parents[2] / "conf" / "reward"
TINY_CLIP = {"embed_dim": 768,  # the aesthetic MLP reads 768-dim embeddings, as ViT-L/14's
             "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> dict:
    """A tiny random open_clip CLIP saved two ways: a ``local-dir:`` folder, and a registered name + weights file."""
    import open_clip
    from open_clip.model import CLIP

    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    state = CLIP(**TINY_CLIP).state_dict()
    (root / "folder").mkdir()
    (root / "folder" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    torch.save(state, root / "folder" / "open_clip_pytorch_model.bin")
    (root / "configs").mkdir()
    (root / "configs" / "tiny-clip-test.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(root / "configs")  # a custom architecture name, as a user would register one
    torch.save(state, root / "weights.pt")
    return {"local_dir": f"local-dir:{root / 'folder'}", "name": "tiny-clip-test", "weights": str(root / "weights.pt")}


@pytest.fixture(scope="module")
def aesthetic_weights(tmp_path_factory) -> dict:
    """Random aesthetic-MLP weights as .pth and .safetensors (same state-dict layout as the LAION file)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(1)
    state = AestheticMLP().state_dict()
    torch.save(state, root / "mlp.pth")
    save_file(state, str(root / "mlp.safetensors"))
    return {"pth": str(root / "mlp.pth"), "safetensors": str(root / "mlp.safetensors")}


def smooth_images(batch: int = 3, height: int = 256, width: int = 320, seed: int = 0) -> torch.Tensor:
    """``[B,3,H,W]`` smooth random images in [0,1] (upsampled noise), non-square to exercise the centre crop."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 8, 10, generator=generator)
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False).clamp(0, 1)


def assert_gradient_reaches_images(reward: Reward, prompts: list[str], metadata: list[dict]) -> None:
    images = smooth_images(len(prompts), 64, 64).requires_grad_(True)
    rewards, _ = reward(images, prompts, metadata)
    rewards.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------- CLIP
def test_clip_score_loads_local_dir_and_matches_manual_cosine(tiny_clip):
    reward = ClipScore(model_name=tiny_clip["local_dir"], pretrained=None, scale=2.0).setup("cpu")
    images, prompts = smooth_images(2), ["a cat", "a dog"]
    rewards, info = reward(images, prompts, [{}, {}])
    assert rewards.shape == (2,) and len(info["clip_cosine"]) == 2
    with torch.no_grad():  # manual: open_clip's own PIL preprocessing would differ slightly; reuse the torch pixels
        from ddpo_cli.rewards.clip import clip_pixels

        image = F.normalize(reward.model.encode_image(clip_pixels(images, reward.cfg)), dim=-1)
        text = F.normalize(reward.model.encode_text(reward.tokenizer(prompts)), dim=-1)
    torch.testing.assert_close(rewards, 2.0 * (image * text).sum(-1), atol=1e-5, rtol=1e-5)


def test_clip_score_loads_named_model_with_local_weights_file(tiny_clip):
    by_file = ClipScore(model_name=tiny_clip["name"], pretrained=tiny_clip["weights"]).setup("cpu")
    by_dir = ClipScore(model_name=tiny_clip["local_dir"], pretrained=None).setup("cpu")
    images = smooth_images(2)
    torch.testing.assert_close(by_file(images, ["a", "b"], [{}, {}])[0], by_dir(images, ["a", "b"], [{}, {}])[0])


def test_clip_missing_weights_is_a_one_line_user_error():
    with pytest.raises(UserError, match="could not load the open_clip model") as error:
        ClipScore(model_name="ViT-B-32", pretrained="/nonexistent/weights.pt").setup("cpu")
    assert "\n" not in str(error.value)


def test_clip_rewards_are_differentiable(tiny_clip):
    assert_gradient_reaches_images(ClipScore(model_name=tiny_clip["local_dir"], pretrained=None), ["a", "b"], [{}, {}])
    zero_shot = ClipZeroShot(model_name=tiny_clip["local_dir"], pretrained=None, contrast="batch")
    assert_gradient_reaches_images(zero_shot, ["a cat", "a dog"], [{}, {}])


def test_zero_shot_candidates():
    reward = ClipZeroShot(contrast="counting", low=1, high=4)
    meta = {"number": 2, "noun": "cat", "things": "cats"}
    assert reward.candidates("two cats", meta, []) == ["two cats", "one cat", "three cats", "four cats"]
    reward = ClipZeroShot(contrast="list", prompts=["a dog", "a cat", "a bird"])
    assert reward.candidates("a cat", {}, ["x"]) == ["a cat", "a dog", "a bird"]
    reward = ClipZeroShot(contrast="batch")
    assert reward.candidates("a", {}, ["a", "b", "b", "c"]) == ["a", "b", "c"]
    with pytest.raises(UserError):
        ClipZeroShot(contrast="list")
    with pytest.raises(UserError, match="counting"):
        ClipZeroShot(contrast="counting").candidates("a cat", {}, [])


def test_zero_shot_probability_matches_manual_softmax(tiny_clip):
    reward = ClipZeroShot(model_name=tiny_clip["local_dir"], pretrained=None, contrast="counting", low=1, high=3)
    prompts = ["two cats", "one dog"]
    metadata = [{"number": 2, "noun": "cat", "things": "cats"}, {"number": 1, "noun": "dog", "things": "dogs"}]
    images = smooth_images(2)
    rewards, info = reward(images, prompts, metadata)
    assert ((rewards > 0) & (rewards < 1)).all() and len(info["predicted"]) == 2
    with torch.no_grad():
        image = reward.image_features(images[:1])[0]
        text = reward.text_features(["two cats", "one cat", "three cats"])
        expected = (reward.model.logit_scale.exp() * text @ image).softmax(-1)[0]
    torch.testing.assert_close(rewards[0], expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------- aesthetic
def test_aesthetic_torch_path_agrees_with_pil_path(tiny_clip, aesthetic_weights):
    common = dict(model_name=tiny_clip["local_dir"], pretrained=None, weights_path=aesthetic_weights["pth"])
    torch_path = Aesthetic(**common, preprocess="torch").setup("cpu")
    pil_path = Aesthetic(**common, preprocess="pil").setup("cpu")
    assert torch_path.differentiable and not pil_path.differentiable
    images = smooth_images(4)
    a, b = torch_path(images, [""] * 4, [{}] * 4)[0], pil_path(images, [""] * 4, [{}] * 4)[0]
    with torch.no_grad():
        pixels_torch, pixels_pil = torch_path.pixels(images), pil_path.pixels(images)
    assert pixels_torch.shape == pixels_pil.shape == (4, 3, 224, 224)
    assert (pixels_torch - pixels_pil).abs().mean() < 0.02  # uint8 rounding and resampling details only
    spread = (a.max() - a.min()).item()
    assert spread > 0 and (a - b).abs().max().item() < 0.05 * spread


def test_aesthetic_is_differentiable_and_loads_safetensors_and_hub_file(tiny_clip, aesthetic_weights, monkeypatch):
    by_pth = Aesthetic(model_name=tiny_clip["local_dir"], pretrained=None, weights_path=aesthetic_weights["pth"])
    assert_gradient_reaches_images(by_pth, ["", ""], [{}, {}])
    by_safetensors = Aesthetic(model_name=tiny_clip["local_dir"], pretrained=None,
                               weights_path=aesthetic_weights["safetensors"])
    asked = []

    def fake_download(repo, filename):  # the hub branch, without the network
        asked.append((repo, filename))
        return aesthetic_weights["pth"]

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    by_hub = Aesthetic(model_name=tiny_clip["local_dir"], pretrained=None, weights_repo="org/repo",
                       weights_file="m.pth")
    images = smooth_images(2)
    expected = by_pth(images, ["", ""], [{}, {}])[0].detach()
    torch.testing.assert_close(by_safetensors(images, ["", ""], [{}, {}])[0], expected)
    torch.testing.assert_close(by_hub(images, ["", ""], [{}, {}])[0], expected)
    assert asked == [("org/repo", "m.pth")]


def test_aesthetic_mlp_is_affine_in_eval_mode():
    mlp = AestheticMLP().eval()
    x, y = torch.randn(2, 768), torch.randn(2, 768)
    with torch.no_grad():  # no activations: f(x + y) = f(x) + f(y) - f(0)
        torch.testing.assert_close(mlp(x + y), mlp(x) + mlp(y) - mlp(torch.zeros(2, 768)), atol=1e-4, rtol=1e-4)


def test_aesthetic_missing_weights_is_a_user_error(tiny_clip):
    with pytest.raises(UserError, match="weights_path"):
        Aesthetic(model_name=tiny_clip["local_dir"], pretrained=None, weights_path="/nope.pth").setup("cpu")


# ----------------------------------------------------------------------------------------------------- mix
def constant(values: list[float], differentiable: bool = False, name: str = "c") -> FunctionReward:
    """A reward returning ``values`` (+ 0 * image mean, so that it has a gradient path when differentiable)."""
    def fn(images, prompts, metadata):
        return torch.tensor(values) + 0 * images.mean(dim=(1, 2, 3)), {"extra": [1] * len(values)}
    return FunctionReward(fn, differentiable=differentiable, name=name)


def test_mix_weights_and_normalisations():
    images, prompts, metadata = torch.rand(4, 3, 8, 8), ["p"] * 4, [{}] * 4
    mix = Mix(components={
        "a": {"weight": 2.0, "reward": constant([1.0, 2.0, 3.0, 4.0])},                      # zscore (default)
        "b": {"weight": 0.5, "normalize": "affine", "scale": 10.0, "shift": -1.0, "reward": constant([0, 1, 0, 1])},
        "c": {"weight": -1.0, "normalize": "none", "reward": constant([5.0, 5.0, 5.0, 5.0])},
    }, normalize="zscore")
    rewards, info = mix(images, prompts, metadata)
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([0.0, 1.0, 0.0, 1.0])
    expected = 2.0 * (a - a.mean()) / (a.std(unbiased=False) + 1e-6) + 0.5 * (10.0 * b - 1.0) - 1.0 * 5.0
    torch.testing.assert_close(rewards, expected)
    assert info["a"] == [1.0, 2.0, 3.0, 4.0] and info["c"] == [5.0] * 4 and info["b/extra"] == [1] * 4


def test_mix_differentiable_iff_all_components_are():
    differentiable = Mix(components={"x": {"reward": constant([1.0, 2.0], True)},
                                     "y": {"reward": constant([3.0, 1.0], True)}}, normalize="zscore")
    assert differentiable.differentiable
    assert_gradient_reaches_images(
        Mix(components={"b": {"reward": FunctionReward(lambda i, p, m: i.mean(dim=(1, 2, 3)), differentiable=True)}}),
        ["", ""], [{}, {}])
    assert not Mix(components={"x": {"reward": constant([1.0], True)}, "y": {"reward": constant([1.0])}}).differentiable


def test_mix_rejects_bad_configs():
    with pytest.raises(UserError):
        Mix(components={})
    with pytest.raises(UserError, match="normalize"):
        Mix(components={"a": {"reward": constant([1.0]), "normalize": "minmax"}})
    with pytest.raises(UserError, match="keys"):
        Mix(components={"a": {"reward": constant([1.0]), "wieght": 2}})


@pytest.mark.parametrize("options", [{"_convert_": "all"}, {}, {"_recursive_": False}],
                         ids=["trainer", "hydra", "flat"])
def test_mix_yaml_instantiates_components(options):
    cfg = OmegaConf.load(CONF / "mix.yaml")
    mix = instantiate(cfg, **options)  # the trainer uses _convert_="all"; components may arrive built or as configs
    assert [c.name for c in mix.components] == ["compressibility", "aesthetic"]
    assert not mix.differentiable  # JPEG size has no gradient
    assert mix.components[0].normalize == "zscore" and mix.components[1].normalize == "affine"


# ----------------------------------------------------------------------------------------------------- custom + YAML
def test_custom_yaml_wraps_an_importable_function():
    reward = instantiate(OmegaConf.load(CONF / "custom.yaml"), _convert_="all")
    assert isinstance(reward, FunctionReward) and reward.differentiable and reward.name == "brightness"
    images = torch.rand(3, 3, 16, 16)
    rewards, info = reward(images, ["a"] * 3, [{}] * 3)
    torch.testing.assert_close(rewards, images.mean(dim=(1, 2, 3)))
    assert len(info["brightness"]) == 3
    assert_gradient_reaches_images(reward, ["a", "b"], [{}, {}])


def test_custom_yaml_points_at_any_function_by_override():
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "custom.yaml"),
                          OmegaConf.from_dotlist(["fn.path=torch.std_mean", "differentiable=false", "name=stdmean"]))
    reward = instantiate(cfg)
    assert reward.fn is torch.std_mean and not reward.differentiable and reward.name == "stdmean"


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_reward_yaml_checks_and_builds_without_loading(path):
    from ddpo_cli.config import check_target

    cfg = OmegaConf.load(path)
    check_target(cfg, "reward")  # every key is a typed parameter of the target
    reward = instantiate(cfg, _convert_="all")  # as the trainer does; __init__ loads and downloads nothing
    assert isinstance(reward, Reward) and not reward._ready


def test_mix_range_maps_the_declared_output_range_to_unit():
    from ddpo_cli.rewards.clip import ClipScore

    bounded = constant([0.0, 0.5, 1.0])
    bounded.output_range = (0.0, 2.0)
    rewards, _ = Mix(components={"a": {"reward": bounded, "normalize": "range"}})(torch.rand(3, 3, 8, 8), [""] * 3,
                                                                                  [{}] * 3)
    torch.testing.assert_close(rewards, torch.tensor([0.0, 0.25, 0.5]))
    with pytest.raises(UserError, match="bounded output range"):
        Mix(components={"a": {"reward": constant([1.0]), "normalize": "range"}})  # declares (None, None)
    assert ClipScore(scale=2.5).output_range == (-2.5, 2.5)


def test_every_builtin_reward_keeps_the_contract(tiny_clip, aesthetic_weights):
    from reward_contract import check_contract

    from ddpo_cli.rewards.examples import brightness
    from ddpo_cli.rewards.jpeg import JpegCompressibility, JpegIncompressibility
    from ddpo_cli.rewards.shapes_counting import ShapesCounting
    from ddpo_cli.rewards.shapes_valid import ShapesValid

    images, prompts = smooth_images(2, 64, 64), ["two red squares", "one blue circle"]
    metadata = [{"count": 2, "colour": "red", "shape": "square"}, {"count": 1, "colour": "blue", "shape": "circle"}]
    rewards = [JpegCompressibility(), JpegIncompressibility(), ShapesCounting(), ShapesValid(),
               FunctionReward(brightness, differentiable=True),
               ClipScore(model_name=tiny_clip["local_dir"], pretrained=None),
               ClipZeroShot(model_name=tiny_clip["local_dir"], pretrained=None),
               Aesthetic(model_name=tiny_clip["local_dir"], pretrained=None, weights_path=aesthetic_weights["pth"])]
    for reward in rewards:
        check_contract(reward.setup("cpu"), images, prompts, metadata)


def test_shapes_valid_scores_what_the_toy_world_draws():
    import numpy as np

    from ddpo_cli.rewards.shapes_valid import ShapesValid
    from ddpo_cli.toyworld.render import render

    def image(array):
        return torch.from_numpy(array).permute(2, 0, 1).float()[None] / 255

    drawn = image(render(3, "blue", "square", seed=1))
    mixed = image(np.maximum(render(1, "red", "circle", seed=2), render(1, "green", "circle", seed=3)))
    black = torch.zeros(1, 3, 32, 32)
    rewards, info = ShapesValid().setup("cpu")(torch.cat([drawn, mixed, black]), ["", "", ""], [{}] * 3)
    assert rewards.tolist() == [1.0, 0.0, 0.0] and info["objects"][0] == 3 and info["objects"][2] == 0
