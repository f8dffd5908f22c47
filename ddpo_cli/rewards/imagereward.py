"""ImageReward v1.0 (Xu et al. 2023, THUDM/ImageReward): BLIP fine-tuned on 137k expert comparisons.

The model, as the public ``ImageReward.score``:

- image: BLIP's ViT-L/16 at 224 px (resize the shorter side, bicubic, centre crop, CLIP mean/std) -> all tokens;
- text: BLIP's BERT-base text encoder, ``[CLS] prompt [SEP]`` padded to 35 tokens (bert-base-uncased tokenizer),
  cross-attending to the image tokens; the feature is the first ([CLS]) token of the last layer;
- head: MLP 768-1024-128-64-16-1 (dropout, no activations: the aesthetic predictor's layout);
- output: ``(raw - 0.16717362830052426) / 1.0333394966054072``, z-scored over the authors' data, about -2..+2
  (ReFL's hinge stops at 2).

It runs on transformers' BLIP classes (``BlipVisionModel``, ``BlipTextModel`` with cross-attention): the original
checkpoint ``ImageReward.pt`` (keys ``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``) is renamed
by :func:`transformers_key`. The vision sizes are read from the checkpoint, the text sizes from ``med_config.json``.
The image path is torch only: differentiable (as the public ``score_gard`` used by ReFL).
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..errors import UserError, brief, loading
from .aesthetic import AestheticMLP, load_state_dict, local_or_hub_file
from .base import Reward
from .clip import CLIP_MEAN, CLIP_STD, clip_pixels

SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35  # the public code pads / truncates prompts to 35 tokens
VISION_HEAD_WIDTH = 64  # BLIP's ViTs: ViT-B 768 = 12 x 64, ViT-L 1024 = 16 x 64
VISION_LAYER_NORM_EPS = 1e-6  # BLIP's ViT uses LayerNorm(eps=1e-6)

VISION_TOP = {  # BLIP ViT name (after "blip.visual_encoder.") -> BlipVisionModel name
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
VISION_BLOCK = {  # a module of "blocks.{i}." -> the same module of "encoder.layers.{i}."
    "norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
VISION_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")
UNUSED = ("blip.vision_proj.", "blip.text_proj.")  # BLIP's contrastive projections: not part of the score


def transformers_key(key: str) -> str | None:
    """An ``ImageReward.pt`` key -> the key in :class:`ImageRewardModel` (``None``: not used by the score).

    ``blip.visual_encoder.blocks.3.attn.qkv.weight`` -> ``vision.encoder.layers.3.self_attn.qkv.weight``;
    ``blip.text_encoder.X`` -> ``text.X`` (BLIP's BERT and transformers' BlipTextModel share names);
    ``mlp.layers.X`` -> ``mlp.layers.X``.
    """
    if key.startswith(UNUSED) or key.endswith("position_ids"):  # position_ids: a buffer transformers rebuilds
        return None
    if key.startswith("blip.text_encoder."):
        return "text." + key.removeprefix("blip.text_encoder.")
    if key.startswith("mlp."):
        return key
    if key.startswith("blip.visual_encoder."):
        name = key.removeprefix("blip.visual_encoder.")
        if name in VISION_TOP:
            return "vision." + VISION_TOP[name]
        block = VISION_BLOCK_KEY.fullmatch(name)
        if block and block[2] in VISION_BLOCK:
            return f"vision.encoder.layers.{block[1]}.{VISION_BLOCK[block[2]]}.{block[3]}"
    raise KeyError(key)


def vision_config(state: dict[str, torch.Tensor]):
    """BlipVisionConfig of the checkpoint's ViT: width, depth, MLP size, patch and image size read off its shapes."""
    from transformers import BlipVisionConfig

    width, _, patch, _ = state["blip.visual_encoder.patch_embed.proj.weight"].shape  # [D,3,p,p]
    positions = state["blip.visual_encoder.pos_embed"].shape[1]  # 1 + (image_size / p)^2
    depth = len({k.split(".")[3] for k in state if k.startswith("blip.visual_encoder.blocks.")})
    return BlipVisionConfig(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=width // VISION_HEAD_WIDTH,
        intermediate_size=state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        image_size=patch * math.isqrt(positions - 1), patch_size=patch, hidden_act="gelu",
        layer_norm_eps=VISION_LAYER_NORM_EPS)


def text_config(med_config: str, vision_width: int):
    """BlipTextConfig from BLIP's ``med_config.json`` (a BERT config, read with BERT's defaults as BLIP does).

    The text cross-attends to image tokens of width ``vision_width`` (BLIP overrides the file's ``encoder_width``)."""
    from transformers import BertConfig, BlipTextConfig

    med = BertConfig.from_json_file(med_config)
    return BlipTextConfig(
        vocab_size=med.vocab_size, hidden_size=med.hidden_size, num_hidden_layers=med.num_hidden_layers,
        num_attention_heads=med.num_attention_heads, intermediate_size=med.intermediate_size,
        max_position_embeddings=med.max_position_embeddings, layer_norm_eps=med.layer_norm_eps,
        hidden_act=med.hidden_act, pad_token_id=med.pad_token_id, encoder_hidden_size=vision_width,
        is_decoder=True)  # is_decoder builds the cross-attention layers; forward runs bidirectional (is_decoder=False)


class ImageRewardModel(nn.Module):
    """BLIP image encoder + BLIP text encoder (cross-attention) + MLP head -> the raw (not z-scored) score."""

    def __init__(self, vision_cfg, text_cfg) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(vision_cfg)
        self.text = BlipTextModel(text_cfg, add_pooling_layer=False)
        self.mlp = AestheticMLP(input_dim=text_cfg.hidden_size)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``pixels [B,3,224,224]`` (normalised), ``input_ids``/``attention_mask [B,35]`` -> raw scores ``[B]``."""
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state  # [B, 1 + patches, 1024]
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                           is_decoder=False).last_hidden_state  # [B, 35, 768]
        return self.mlp(hidden[:, 0].float()).squeeze(-1)  # head in float32, as the public code


class ImageReward(Reward):
    """ImageReward v1.0 of each image for its prompt, z-scored: about -2..+2 (0 = the authors' average). Differentiable.

    ``weights_path`` (a local ``ImageReward.pt``) wins over ``weights_repo``/``weights_file`` (downloaded once);
    ``med_config``: a local BLIP ``med_config.json`` (null = the one in ``weights_repo``); ``tokenizer``: hub id or
    local folder of the BERT tokenizer (``bert-base-uncased``).
    """

    name = "imagereward"
    differentiable = True
    output_range = (None, None)  # z-scored: about -2..+2

    def __init__(self, weights_path: str | None = None, weights_repo: str = "THUDM/ImageReward",
                 weights_file: str = "ImageReward.pt", med_config: str | None = None,
                 tokenizer: str = "bert-base-uncased") -> None:
        super().__init__()
        self.weights_path, self.weights_repo, self.weights_file = weights_path, weights_repo, weights_file
        self.med_config, self.tokenizer_id = med_config, tokenizer

    def load(self) -> None:
        from transformers import AutoTokenizer

        state = load_state_dict(local_or_hub_file(self.weights_path, self.weights_repo, self.weights_file,
                                                  "weights_path", "the ImageReward checkpoint (ImageReward.pt)"))
        med_config = local_or_hub_file(self.med_config, self.weights_repo, "med_config.json", "med_config",
                                       "BLIP's med_config.json (the text encoder's BERT config)")
        with loading(f"the tokenizer {self.tokenizer_id!r}", "set reward.tokenizer to bert-base-uncased (downloaded "
                                                             "once) or a local folder of it"):
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_id)
        renamed = self.renamed(state)
        try:
            vision_cfg = vision_config(state)
        except (KeyError, AttributeError, ValueError, IndexError) as error:
            raise UserError(f"reward.weights_path: {self.weights_path or self.weights_file} is not the ImageReward "
                            f"checkpoint ({brief(error, 120)}): give THUDM/ImageReward's ImageReward.pt") from None
        try:
            text_cfg = text_config(med_config, vision_cfg.hidden_size)
        except (OSError, ValueError, TypeError) as error:  # not JSON, or not a BERT config
            raise UserError(f"reward.med_config: {med_config} is not BLIP's med_config.json ({brief(error, 120)}): "
                            f"give the one of THUDM/ImageReward") from None
        model = ImageRewardModel(vision_cfg, text_cfg)
        try:
            model.load_state_dict(renamed)
        except RuntimeError as error:
            raise UserError(f"the ImageReward checkpoint does not fit its med_config.json ({brief(error)}): give the "
                            "THUDM/ImageReward files (reward.weights_path, reward.med_config)") from error
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.model.mlp.float()  # the head runs in float32, as the public code
        self.cfg = {"size": (vision_cfg.image_size,) * 2, "mean": CLIP_MEAN, "std": CLIP_STD,
                    "interpolation": "bicubic"}

    def renamed(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint under :class:`ImageRewardModel`'s names; an unknown key is a UserError."""
        try:
            names = {key: transformers_key(key) for key in state}
        except (KeyError, AttributeError) as error:  # a name of another model, or not a name at all
            raise UserError(f"reward.weights_path: {self.weights_path or self.weights_file} has the key "
                            f"{error.args[0]!r}, which is not "
                            "in ImageReward v1.0: give the THUDM/ImageReward checkpoint") from None
        return {names[key]: value for key, value in state.items() if names[key] is not None}

    def score(self, images, prompts, metadata):
        pixels = clip_pixels(images.to(self.device, torch.float32), self.cfg).to(self.dtype)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                return_tensors="pt").to(self.device)
        raw = self.model(pixels, tokens.input_ids, tokens.attention_mask)  # [B]
        rewards = (raw - SCORE_MEAN) / SCORE_STD
        return rewards.to(images.device), {"imagereward": rewards.detach().tolist()}
