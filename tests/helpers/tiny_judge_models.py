"""Tiny random models for the vlm_judge and geneval rewards, built in code and saved locally (no network).

- :func:`build_tiny_llava`: LLaVA (CLIP vision 32 px + a 1-layer Llama) with a chat template;
- :func:`build_tiny_owl`: OWLv2 (32 px, patch 8: 16 candidate boxes);
- :func:`build_tiny_open_clip`: an open_clip CLIP (32 px) as a ``local-dir:`` folder;
- :func:`build_vlm_judge` / :func:`build_geneval`: the Hydra overrides that make ``ddpo train reward=vlm_judge`` /
  ``reward=geneval`` run on them (geneval: the toy world's shapes detector and its GenEval-format prompts).

The text models share a real CLIP BPE tokenizer rebuilt from open_clip's bundled vocabulary.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                             "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def clip_tokenizer():
    """A CLIP BPE tokenizer (transformers) from open_clip's bundled vocabulary: no download."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    return CLIPTokenizer(vocab=dict(SimpleTokenizer().encoder), merges=[tuple(line.split()) for line in lines])


def build_tiny_llava(folder: Path) -> str:
    """Save a tiny random LLaVA with its processor and chat template in ``folder``; returns the folder."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = clip_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=16, vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1)  # the CLS token, dropped by the "default" strategy
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=16),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def build_tiny_owl(folder: Path) -> str:
    """Save a tiny random OWLv2 detector with its processor in ``folder``; returns the folder."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tokenizer = clip_tokenizer()
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}),
                               tokenizer=tokenizer)
    config = Owlv2Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    Owlv2ForObjectDetection(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def build_tiny_open_clip(folder: Path) -> str:
    """Save a tiny random open_clip CLIP in ``folder``; returns its ``local-dir:`` model name."""
    from open_clip.model import CLIP

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    torch.save(CLIP(**TINY_CLIP).state_dict(), folder / "open_clip_pytorch_model.bin")
    return f"local-dir:{folder}"


def build_vlm_judge(root: Path) -> list[str]:
    """Overrides for ``ddpo train reward=vlm_judge``: the in-process backend on a tiny LLaVA saved under ``root``."""
    folder = build_tiny_llava(Path(root) / "vlm_judge_llava")
    return ["reward.backend=transformers", f"reward.model={folder}", "reward.batch_size=4"]


def build_geneval(root: Path) -> list[str]:
    """Overrides for ``ddpo train reward=geneval``: the toy world's exact shapes detector, and prompts carrying
    GenEval metadata (an ordinary prompt set has none, which the reward rejects). Nothing to build: ``root`` unused."""
    return ["reward.detector=shapes", "prompts=shapes_geneval"]
