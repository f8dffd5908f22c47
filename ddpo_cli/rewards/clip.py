"""CLIP rewards on open_clip: ``ClipScore`` (image-text cosine) and ``ClipZeroShot`` (probability of the right prompt).

Also the two helpers every CLIP-based reward shares (the aesthetic predictor uses them too):

- :func:`load_open_clip` loads a model by open_clip name plus ``pretrained`` (a tag such as ``openai``, or a local
  checkpoint file), or from ``local-dir:/path`` / ``hf-hub:org/repo``; a failure becomes a one-line ``UserError``.
- :func:`clip_pixels` is the differentiable preprocessing in torch (resize, centre crop, normalise): the same steps
  as open_clip's PIL transform, without leaving torch, so gradients reach the images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..text_features import TextFeatureCache
from ..errors import UserError, loading
from ..prompts.words import NUMBER_WORDS
from .base import Reward

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_open_clip(model_name: str, pretrained: str | None, device: torch.device, dtype: torch.dtype):
    """-> ``(model, pil_preprocess, tokenizer)``; the model frozen, in eval mode, on ``device`` in ``dtype``."""
    import open_clip

    with loading(f"the open_clip model {model_name!r} with pretrained={pretrained!r}", "give a model name from "
                 "open_clip.list_models() with a pretrained tag (needs the hub once) or a local file, or "
                 "model_name=local-dir:/path/to/folder"):  # download failures, missing files, unknown names
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None)
        tokenizer = open_clip.get_tokenizer(model_name)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, preprocess, tokenizer


def open_clip_parameters(model_name: str) -> int | None:
    """Parameters of an open_clip architecture, built on the meta device (None for a name open_clip does not
    know, e.g. ``local-dir:``)."""
    import open_clip

    try:
        with torch.device("meta"):
            model = open_clip.create_model(model_name, pretrained=None, device="meta")
    except (RuntimeError, ValueError, OSError):
        return None
    return sum(p.numel() for p in model.parameters())


def preprocess_cfg(model) -> dict:
    """open_clip's preprocessing settings of ``model``: size, mean, std, interpolation, resize_mode."""
    import open_clip

    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    size = cfg.get("size", 224)
    cfg["size"] = (size, size) if isinstance(size, int) else tuple(size)
    cfg.setdefault("mean", CLIP_MEAN)
    cfg.setdefault("std", CLIP_STD)
    return cfg


def clip_pixels(images: torch.Tensor, cfg: dict) -> torch.Tensor:
    """``[B,3,H,W]`` in [0,1] -> ``[B,3,h,w]`` CLIP input, differentiable.

    Same steps as open_clip's eval transform: resize the shorter side (``resize_mode`` ``shortest``, the default) or
    both sides (``squash``) with antialiasing, centre crop to ``cfg["size"]``, normalise with the model's mean/std.
    The shorter side goes to ``cfg["resize"]`` when given (a transformers processor's ``shortest_edge``), else to the
    crop size.
    """
    height, width = cfg["size"]
    mode = InterpolationMode.BILINEAR if cfg.get("interpolation") == "bilinear" else InterpolationMode.BICUBIC
    if cfg.get("resize_mode") == "squash":
        images = TF.resize(images, [height, width], interpolation=mode, antialias=True)
    else:
        images = TF.resize(images, cfg.get("resize", max(height, width)), interpolation=mode, antialias=True)
        images = TF.center_crop(images, [height, width])
    mean = torch.tensor(cfg["mean"], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


class _OpenClipReward(Reward):
    """Shared loading, image and (cached) text encoding for rewards built on one open_clip model."""

    def __init__(self, model_name: str, pretrained: str | None, template: str) -> None:
        super().__init__()
        self.model_name, self.pretrained, self.template = model_name, pretrained, template
        self.text_cache = TextFeatureCache(self.encode_texts)

    def load(self) -> None:
        self.model, self.pil_preprocess, self.tokenizer = load_open_clip(
            self.model_name, self.pretrained, self.device, self.dtype)
        self.cfg = preprocess_cfg(self.model)
        self.text_cache.clear()

    def model_parameters(self) -> int | None:
        return open_clip_parameters(self.model_name)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> ``[B,D]`` L2-normalised float32 embeddings (differentiable)."""
        pixels = clip_pixels(images.to(self.device, torch.float32), self.cfg)
        return F.normalize(self.model.encode_image(pixels.to(self.dtype)).float(), dim=-1)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """``N`` texts -> ``[N,D]`` L2-normalised embeddings; each distinct text is encoded once per run."""
        return torch.cat(self.text_cache(texts))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer([self.template.format(prompt=t) for t in texts]).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


class ClipScore(_OpenClipReward):
    """Reward = ``scale * cos(image embedding, text embedding)`` (raw cosine with the default ``scale=1``).

    ``template`` wraps the prompt before encoding (e.g. ``"a photo of {prompt}"``). Differentiable.
    """

    name = "clip_score"
    differentiable = True

    def __init__(self, model_name: str = "ViT-L-14-quickgelu", pretrained: str | None = "openai",
                 scale: float = 1.0, template: str = "{prompt}") -> None:
        super().__init__(model_name, pretrained, template)
        self.scale = scale
        self.output_range = (-abs(scale), abs(scale))

    def score(self, images, prompts, metadata):
        image = self.image_features(images)  # [B,D]
        text = self.text_features(prompts)  # [B,D]
        cosine = (image * text).sum(-1)  # [B]
        return self.scale * cosine.to(images.device), {"clip_cosine": cosine.tolist()}


class ClipZeroShot(_OpenClipReward):
    """Reward = CLIP's probability of the image's own prompt among contrastive prompts (a softmax classifier).

    ``contrast`` picks the alternatives, per image:

    - ``batch``: the other distinct prompts of the batch (a batch of one prompt gives probability 1);
    - ``list``: the prompts listed in ``prompts`` (the image's own prompt is always included);
    - ``counting``: the same noun with the other counts ``low..high`` (needs counting metadata number/noun/things).

    The temperature is CLIP's own logit scale. Differentiable.
    """

    name = "clip_zero_shot"
    output_range = (0.0, 1.0)  # a probability
    differentiable = True

    def __init__(self, model_name: str = "ViT-L-14-quickgelu", pretrained: str | None = "openai",
                 contrast: str = "batch", prompts: list[str] | None = None, low: int = 1, high: int = 6,
                 template: str = "{prompt}") -> None:
        super().__init__(model_name, pretrained, template)
        if contrast not in ("batch", "list", "counting"):
            raise UserError(f"reward.contrast={contrast!r}: choose batch, list or counting")
        if contrast == "list" and not prompts:
            raise UserError("reward.contrast=list needs reward.prompts=[...] (the contrastive prompts)")
        self.contrast, self.prompts, self.low, self.high = contrast, list(prompts or []), low, high

    def candidates(self, prompt: str, meta: dict, batch_prompts: list[str]) -> list[str]:
        """The texts to choose from for one image; the right one first."""
        if self.contrast == "batch":
            others = batch_prompts
        elif self.contrast == "list":
            others = self.prompts
        else:
            if not {"number", "noun", "things"} <= set(meta):
                raise UserError("reward.contrast=counting needs counting prompts (prompts=counting): the metadata "
                                f"of {prompt!r} has no number/noun/things")
            others = [f"{NUMBER_WORDS[n]} {meta['noun'] if n == 1 else meta['things']}"
                      for n in range(self.low, self.high + 1) if n != meta["number"]]
        return [prompt] + list(dict.fromkeys(p for p in others if p != prompt))

    def score(self, images, prompts, metadata):
        image = self.image_features(images)  # [B,D]
        logit_scale = self.model.logit_scale.exp().float()
        probs, predicted = [], []
        for i, (prompt, meta) in enumerate(zip(prompts, metadata)):
            options = self.candidates(prompt, meta, prompts)
            logits = logit_scale * self.text_features(options) @ image[i]  # [K]
            p = logits.softmax(-1)
            probs.append(p[0])
            predicted.append(options[int(p.argmax())])
        rewards = torch.stack(probs).to(images.device)  # [B]
        return rewards, {"predicted": predicted, "correct": [p == q for p, q in zip(predicted, prompts)]}
