"""PickScore, HPS v2.1 and ImageReward on tiny random models saved in the real on-disk formats (no network).

Each reward is built from its YAML plus the overrides of ``tests/tiny_preference_models.py`` (as ``ddpo train`` would
build it), scored through the reward contract, and pinned to a number computed by hand from the same weights.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from ddpo_cli.errors import UserError  # noqa: E402
from ddpo_cli.rewards.aesthetic import Aesthetic  # noqa: E402
from ddpo_cli.images import to_uint8_hwc  # noqa: E402
from ddpo_cli.rewards.clip import clip_pixels  # noqa: E402
from ddpo_cli.rewards.hpsv2 import HPSv2  # noqa: E402
from ddpo_cli.rewards.imagereward import SCORE_MEAN, SCORE_STD, ImageReward, transformers_key  # noqa: E402
from ddpo_cli.rewards.pickscore import PickScore  # noqa: E402
from reward_contract import check_contract  # noqa: E402
from tiny_preference_models import (build_hpsv2, build_imagereward, build_pickscore,  # noqa: E402
                                    imagereward_state)

CONF = Path(__file__).resolve().parents[2] / "conf" / "reward"
PROMPTS = ["a cat", "a red dog on a mat", "two birds"]


@pytest.fixture(scope="module")
def overrides(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("preference")
    return {"pickscore": build_pickscore(root), "hpsv2": build_hpsv2(root), "imagereward": build_imagereward(root)}


def reward_from(overrides: list[str]):
    """The reward ``ddpo train`` builds from ``reward=<name> reward.key=value ...`` (parsed by Hydra), set up on CPU."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    group, *options = parsed
    cfg = OmegaConf.load(CONF / f"{group.value()}.yaml")
    for option in options:
        OmegaConf.update(cfg, option.key_or_group.removeprefix("reward."), option.value())
    return instantiate(cfg, _convert_="all").setup("cpu")


def smooth_images(batch: int = 3, height: int = 96, width: int = 128, seed: int = 0) -> torch.Tensor:
    """``[B,3,H,W]`` smooth random images in [0,1], non-square to exercise the centre crop."""
    coarse = torch.rand(batch, 3, 6, 8, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False).clamp(0, 1)


def as_tensor(features) -> torch.Tensor:
    """transformers 5 returns an output object from ``get_*_features`` (the features in ``pooler_output``)."""
    return features if torch.is_tensor(features) else features.pooler_output


# ----------------------------------------------------------------------------------------------------- PickScore
def test_pickscore_is_logit_scale_times_cosine(overrides):
    reward = reward_from(overrides["pickscore"])
    assert isinstance(reward, PickScore) and reward.cfg["size"] == (32, 32)  # read from the saved processor
    images = smooth_images()
    rewards, info = check_contract(reward, images, PROMPTS, [{}] * 3)
    model, tokens = reward.model, reward.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = as_tensor(model.get_image_features(pixel_values=clip_pixels(images, reward.cfg)))
        text = as_tensor(model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask))
    expected = 100.0 * F.cosine_similarity(image, text, dim=-1)  # the tiny model's logit scale is log(100)
    torch.testing.assert_close(rewards, expected, atol=1e-4, rtol=1e-4)
    assert info["pickscore"] == pytest.approx(rewards.tolist())


def test_pickscore_torch_pixels_follow_the_processor(overrides):
    from transformers import AutoProcessor

    reward = reward_from(overrides["pickscore"])
    processor = AutoProcessor.from_pretrained(reward.processor_id)
    images = smooth_images(4, 80, 120, seed=1)
    processed = processor(images=[Image.fromarray(a) for a in to_uint8_hwc(images)], return_tensors="pt")
    with torch.no_grad():
        ours = clip_pixels(images, reward.cfg)
        by_processor = as_tensor(reward.model.get_image_features(pixel_values=processed.pixel_values))
        cosine = F.cosine_similarity(by_processor, reward.text_features(["a cat"] * 4), dim=-1)
    assert ours.shape == processed.pixel_values.shape == (4, 3, 32, 32)
    assert (ours - processed.pixel_values).abs().mean() < 0.03  # uint8 rounding and resampling details only
    rewards = reward(images, ["a cat"] * 4, [{}] * 4)[0]
    spread = (rewards.max() - rewards.min()).item()
    assert spread > 0 and (rewards - 100.0 * cosine).abs().max().item() < 0.1 * spread


# ----------------------------------------------------------------------------------------------------- HPS v2.1
def test_hpsv2_is_the_cosine_of_the_checkpoint_model(overrides):
    import open_clip

    reward = reward_from(overrides["hpsv2"])
    checkpoint_path = overrides["hpsv2"][2].split("=", 1)[1]
    state = torch.load(checkpoint_path, weights_only=True)["state_dict"]
    torch.testing.assert_close(reward.model.state_dict(), state)  # the HPS weights, not the random init
    images = smooth_images()
    rewards, info = check_contract(reward, images, PROMPTS, [{}] * 3)
    model = open_clip.create_model(overrides["hpsv2"][1].split("=", 1)[1]).eval()
    model.load_state_dict(state)
    with torch.no_grad():  # the public scorer: diag(image_features @ text_features.T), features L2-normalised
        image = F.normalize(model.encode_image(clip_pixels(images, reward.cfg)), dim=-1)
        text = F.normalize(model.encode_text(open_clip.get_tokenizer("ViT-H-14")(PROMPTS)), dim=-1)
    torch.testing.assert_close(rewards, torch.diagonal(image @ text.T), atol=1e-5, rtol=1e-5)
    assert reward.output_range == (-1.0, 1.0) and info["hps"] == pytest.approx(rewards.tolist())


# ----------------------------------------------------------------------------------------------------- ImageReward
def layer_norm(x: torch.Tensor, state: dict, name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)


def linear(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask=None) -> torch.Tensor:
    """Multi-head softmax attention; ``q [B,L,D]``, ``k, v [B,S,D]``, ``mask [B,S]`` (True = attend)."""
    def split(x: torch.Tensor) -> torch.Tensor:  # [B,L,D] -> [B,heads,L,D/heads]
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v),
                                         attn_mask=None if mask is None else mask[:, None, None, :])
    return out.transpose(1, 2).flatten(2)


def reference_vision(state: dict, pixels: torch.Tensor) -> torch.Tensor:
    """BLIP's ViT (pre-norm, fused qkv, LayerNorm eps 1e-6) from the original keys: pixels -> tokens ``[B,1+N,D]``."""
    s = {k.removeprefix("blip.visual_encoder."): v for k, v in state.items()}
    patch = s["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(pixels, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=patch)
    x = torch.cat([s["cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + s["pos_embed"]
    heads = x.shape[-1] // 64
    h = layer_norm(x, s, "blocks.0.norm1", 1e-6)
    q, k, v = linear(h, s, "blocks.0.attn.qkv").chunk(3, dim=-1)
    x = x + linear(attention(q, k, v, heads), s, "blocks.0.attn.proj")
    hidden = F.gelu(linear(layer_norm(x, s, "blocks.0.norm2", 1e-6), s, "blocks.0.mlp.fc1"))
    x = x + linear(hidden, s, "blocks.0.mlp.fc2")
    return layer_norm(x, s, "norm", 1e-6)


def reference_text_cls(state: dict, input_ids, mask, image_tokens, heads: int) -> torch.Tensor:
    """BLIP's BERT (post-norm, self- then cross-attention) from the original keys -> the [CLS] feature ``[B,D]``."""
    s = {k.removeprefix("blip.text_encoder."): v for k, v in state.items()}
    eps, layer = 1e-12, "encoder.layer.0"
    positions = s["embeddings.position_embeddings.weight"][:input_ids.shape[1]]
    x = layer_norm(s["embeddings.word_embeddings.weight"][input_ids] + positions, s, "embeddings.LayerNorm", eps)
    for block, keys, keys_mask in (("attention", x, mask.bool()), ("crossattention", image_tokens, None)):
        q = linear(x, s, f"{layer}.{block}.self.query")
        k, v = linear(keys, s, f"{layer}.{block}.self.key"), linear(keys, s, f"{layer}.{block}.self.value")
        x = layer_norm(x + linear(attention(q, k, v, heads, keys_mask), s, f"{layer}.{block}.output.dense"),
                       s, f"{layer}.{block}.output.LayerNorm", eps)
        keys = x
    x = layer_norm(x + linear(F.gelu(linear(x, s, f"{layer}.intermediate.dense")), s, f"{layer}.output.dense"),
                   s, f"{layer}.output.LayerNorm", eps)
    return x[:, 0]


def reference_imagereward(state: dict, pixels, input_ids, mask) -> torch.Tensor:
    """The public ``ImageReward.score`` computed by hand from the original checkpoint: z-scored ``[B]``."""
    tokens = reference_vision(state, pixels)
    feature = reference_text_cls(state, input_ids, mask, tokens, heads=2)
    for i in (0, 2, 4, 6, 7):  # dropout is off in eval; no activations
        feature = linear(feature, state, f"mlp.layers.{i}")
    return (feature.squeeze(-1) - SCORE_MEAN) / SCORE_STD


def test_imagereward_matches_a_forward_by_hand_on_the_original_keys(overrides):
    reward = reward_from(overrides["imagereward"])
    assert isinstance(reward, ImageReward) and reward.cfg["size"] == (224, 224)  # read off pos_embed and patch
    images = smooth_images()
    rewards, info = check_contract(reward, images, PROMPTS, [{}] * 3)
    tokens = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert (tokens.input_ids[:, 0] == reward.tokenizer.cls_token_id).all()  # [CLS] first, as the public score
    with torch.no_grad():
        expected = reference_imagereward(imagereward_state(), clip_pixels(images, reward.cfg), tokens.input_ids,
                                         tokens.attention_mask)
    torch.testing.assert_close(rewards, expected, atol=1e-4, rtol=1e-4)
    assert rewards.std() > 0.05 and info["imagereward"] == pytest.approx(rewards.tolist())


def test_imagereward_key_map():
    assert transformers_key("blip.visual_encoder.blocks.23.attn.qkv.weight") == \
        "vision.encoder.layers.23.self_attn.qkv.weight"
    assert transformers_key("blip.visual_encoder.blocks.0.attn.proj.bias") == \
        "vision.encoder.layers.0.self_attn.projection.bias"
    assert transformers_key("blip.visual_encoder.blocks.7.norm2.weight") == "vision.encoder.layers.7.layer_norm2.weight"
    assert transformers_key("blip.visual_encoder.blocks.7.mlp.fc1.bias") == "vision.encoder.layers.7.mlp.fc1.bias"
    assert transformers_key("blip.visual_encoder.cls_token") == "vision.embeddings.class_embedding"
    assert transformers_key("blip.visual_encoder.pos_embed") == "vision.embeddings.position_embedding"
    assert transformers_key("blip.visual_encoder.patch_embed.proj.weight") == "vision.embeddings.patch_embedding.weight"
    assert transformers_key("blip.visual_encoder.norm.bias") == "vision.post_layernorm.bias"
    assert transformers_key("blip.text_encoder.encoder.layer.11.crossattention.self.key.weight") == \
        "text.encoder.layer.11.crossattention.self.key.weight"
    assert transformers_key("mlp.layers.7.bias") == "mlp.layers.7.bias"
    for unused in ("blip.vision_proj.weight", "blip.text_proj.bias", "blip.text_encoder.embeddings.position_ids"):
        assert transformers_key(unused) is None
    for unknown in ("blip.visual_encoder.blocks.0.attn.q.weight", "blip.itm_head.weight", "visual.proj"):
        with pytest.raises(KeyError):
            transformers_key(unknown)


def test_imagereward_unknown_checkpoint_key_is_a_user_error(tmp_path, overrides):
    state = imagereward_state()
    state["blip.itm_head.weight"] = torch.zeros(2, 32)
    torch.save(state, tmp_path / "other.pt")
    options = dict(item.removeprefix("reward.").split("=", 1) for item in overrides["imagereward"][1:])
    with pytest.raises(UserError, match="blip.itm_head.weight") as error:
        ImageReward(**{**options, "weights_path": str(tmp_path / "other.pt")}).setup("cpu")
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("make, option", [
    (lambda: PickScore(model="/nonexistent/pickscore", processor="/nonexistent/processor"), "reward.processor"),
    (lambda: HPSv2(weights_path="/nonexistent/HPS_v2.1_compressed.pt"), "reward.weights_path"),
    (lambda: ImageReward(weights_path="/nonexistent/ImageReward.pt"), "reward.weights_path"),
], ids=["pickscore", "hpsv2", "imagereward"])
def test_missing_weights_are_one_line_user_errors(make, option):
    with pytest.raises(UserError, match=option) as error:
        make().setup("cpu")
    assert "\n" not in str(error.value)


class RunsCode:
    """A pickle that would run a shell command when loaded without ``weights_only``."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/ddpo_pickle_ran",))


DAMAGED = {"garbage.pth": lambda path: path.write_bytes(os.urandom(256)),
           "empty.pth": lambda path: path.write_bytes(b""),
           "list.pth": lambda path: torch.save([torch.zeros(2)], path),
           "code.pth": lambda path: torch.save({"x": RunsCode()}, path),
           "garbage.safetensors": lambda path: path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"),
           "foreign.pth": lambda path: torch.save({"some.other.weight": torch.zeros(2, 2)}, path)}


@pytest.mark.parametrize("name", sorted(DAMAGED))
@pytest.mark.parametrize("reward", [Aesthetic, HPSv2, ImageReward], ids=["aesthetic", "hpsv2", "imagereward"])
def test_a_damaged_or_foreign_weights_file_is_one_line_naming_the_setting(tmp_path, reward, name, overrides):
    # issue #23's probe: each was a traceback (the pickle refused by weights_only, but as a traceback)
    path = tmp_path / name
    DAMAGED[name](path)
    tiny = {Aesthetic: [], HPSv2: overrides["hpsv2"][1:], ImageReward: overrides["imagereward"][1:]}[reward]
    extra = {k: v for k, v in (o.removeprefix("reward.").split("=", 1) for o in tiny) if k != "weights_path"}
    with pytest.raises(UserError, match="reward.weights_path") as error:
        reward(weights_path=str(path), **extra).setup("cpu")
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert not Path("/tmp/ddpo_pickle_ran").exists()


def test_pickscore_missing_model_names_the_model_option(overrides):
    folder = overrides["pickscore"][2].split("=", 1)[1]
    with pytest.raises(UserError, match="reward.model ") as error:
        PickScore(model="/nonexistent/pickscore", processor=folder).setup("cpu")
    assert "\n" not in str(error.value)


def test_hub_failure_is_a_one_line_user_error(monkeypatch):
    def offline(repo, filename):
        raise OSError(f"cannot reach the hub for {repo}/{filename}\n(offline)")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    for reward, repo in ((HPSv2(), "xswu/HPSv2"), (ImageReward(), "THUDM/ImageReward")):
        with pytest.raises(UserError, match=f"hub repo '{repo}'.*reward.weights_path") as error:
            reward.setup("cpu")
        assert "\n" not in str(error.value)
