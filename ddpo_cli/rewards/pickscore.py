"""PickScore (Kirstain et al. 2023, "Pick-a-Pic"): a CLIP ViT-H/14 fine-tuned on human picks between two images.

Score = ``exp(logit_scale) * cos(image embedding, text embedding)``, the number of the public PickScore inference code
(``logit_scale.exp()`` is about 100 for PickScore_v1, so the score is about 100 x cosine: real images of their prompt
score about 18-23; Flow-GRPO divides by 26 to get about 0-1).

The model is a transformers ``CLIPModel`` (``yuvalkirstain/PickScore_v1``); the processor (tokenizer and image
settings) comes from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Either may be a local ``save_pretrained`` folder.
The image path is torch only (resize, centre crop, normalise with the processor's size/mean/std): differentiable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..text_features import TextFeatureCache
from ..errors import loading
from .base import Reward
from .clip import clip_pixels

BILINEAR = 2  # PIL's resample code; CLIP processors use 3 (bicubic)


def processor_pixels_cfg(image_processor) -> dict:
    """A transformers ``CLIPImageProcessor``'s settings as :func:`clip_pixels` reads them."""
    crop = image_processor.crop_size
    return {"size": (crop["height"], crop["width"]), "resize": image_processor.size["shortest_edge"],
            "mean": tuple(image_processor.image_mean), "std": tuple(image_processor.image_std),
            "interpolation": "bilinear" if image_processor.resample == BILINEAR else "bicubic"}


class PickScore(Reward):
    """PickScore of each image for its prompt: ``exp(logit_scale) * cosine``, about 18-23 for real images.

    ``model``: hub id or local folder of the PickScore ``CLIPModel``; ``processor``: hub id or local folder of the
    matching CLIP processor. Text embeddings are computed once per distinct prompt. Differentiable.
    """

    name = "pickscore"
    differentiable = True
    output_range = (None, None)  # bounded by +-exp(logit_scale) (<= 100), but real images stay near 18-23

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1",
                 processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K") -> None:
        super().__init__()
        self.model_id, self.processor_id = model, processor
        self.text_cache = TextFeatureCache(self.encode_texts)

    def load(self) -> None:
        from transformers import AutoProcessor, CLIPModel

        with loading(f"the PickScore processor {self.processor_id!r}", "set reward.processor to a hub id "
                     "(downloaded once) or a local folder of a CLIP processor"):
            processor = AutoProcessor.from_pretrained(self.processor_id)
        with loading(f"the PickScore model {self.model_id!r}", "set reward.model to a hub id (downloaded once) or a "
                                                                "local folder saved with save_pretrained"):
            model = CLIPModel.from_pretrained(self.model_id)
        self.tokenizer = processor.tokenizer
        self.cfg = processor_pixels_cfg(processor.image_processor)
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.text_cache.clear()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> ``[B,D]`` L2-normalised float32 embeddings (differentiable)."""
        pixels = clip_pixels(images.to(self.device, torch.float32), self.cfg).to(self.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """``N`` texts -> ``[N,D]`` L2-normalised embeddings; each distinct text is encoded once per run."""
        return torch.cat(self.text_cache(texts))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        pooled = self.model.text_model(input_ids=tokens.input_ids.to(self.device),
                                       attention_mask=tokens.attention_mask.to(self.device)).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def score(self, images, prompts, metadata):
        cosine = (self.image_features(images) * self.text_features(prompts)).sum(-1)  # [B]
        scores = self.model.logit_scale.exp().float() * cosine
        return scores.to(images.device), {"pickscore": scores.detach().tolist()}
