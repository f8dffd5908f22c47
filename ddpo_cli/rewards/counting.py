"""Object counting for ``"{number} {things}"`` prompts (metadata ``number``, ``noun``, ``things``; prompts=counting).

Two counters: ``backend=server|transformers`` asks a VLM "How many {things} are in this image?" and parses the
number from its answer; ``backend=detector`` counts OWLv2 / OWL-ViT zero-shot detections of "a photo of a {noun}".

reward = ``1 - min(|predicted - n| / n, 1)`` (1 when exact, 0 when off by n or more, or when no number is found);
``info["exact"]`` says whether the count was right.
"""
from __future__ import annotations

import re

import torch

from ..errors import UserError, loading
from ..prompts.words import NUMBER_WORDS
from .base import Reward
from .vlm import make_vlm, to_pil

WORD_VALUES = {word: value for value, word in enumerate(NUMBER_WORDS)} | {
    "none": 0, "single": 1, "once": 1, "pair": 2, "couple": 2, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20}


def parse_count(answer: str) -> int | None:
    """The first number in ``answer``, as digits or an English word ("3", "three", "There are 3 cats."); else None."""
    for token in re.findall(r"\d+|[a-z]+", answer.lower()):
        if token.isdigit():
            return int(token)
        if token in WORD_VALUES:
            return WORD_VALUES[token]
    return None


def count_reward(predicted: int | None, target: int) -> float:
    """Graded reward in [0, 1]: ``1 - min(|predicted - target| / target, 1)``; 0 when nothing was parsed."""
    if predicted is None:
        return 0.0
    return 1.0 - min(abs(predicted - target) / max(target, 1), 1.0)


class OwlCounter:
    """Counts zero-shot detections (OWLv2 / OWL-ViT, by hub id or local folder) above ``threshold``, after NMS."""

    def __init__(self, model: str, threshold: float = 0.3, nms_iou: float = 0.3, batch_size: int = 8) -> None:
        self.model_id, self.threshold, self.nms_iou, self.batch_size = model, threshold, nms_iou, batch_size

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        with loading(f"the detector {self.model_id!r}", "give an OWLv2/OWL-ViT hub id (downloaded once) or a local "
                                                        "folder saved with save_pretrained"):
            self.processor = AutoProcessor.from_pretrained(self.model_id)
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(self.model_id)
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.device = device

    def count(self, images, queries: list[str]) -> list[int]:
        """One query per image -> number of distinct boxes scoring above the threshold, ``batch_size`` at a time."""
        counts = []
        for start in range(0, len(images), self.batch_size):
            counts += self._count(images[start:start + self.batch_size], queries[start:start + self.batch_size])
        return counts

    @torch.no_grad()
    def _count(self, images, queries: list[str]) -> list[int]:
        inputs = self.processor(text=[[query] for query in queries], images=images, return_tensors="pt")
        outputs = self.model(**inputs.to(self.device))
        scores = outputs.logits[..., 0].sigmoid()  # [B, P]: one query per image
        return [count_boxes(s, b, self.threshold, self.nms_iou) for s, b in zip(scores, outputs.pred_boxes)]


def boxes_kept(scores: torch.Tensor, boxes: torch.Tensor, threshold: float,
               nms_iou: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores [P]``, ``boxes [P,4]`` (cx, cy, w, h) -> the scores ``[K]`` and corners ``[K,4]`` (x1, y1, x2, y2) of
    the boxes above ``threshold`` left after NMS at ``nms_iou``, most confident first."""
    from torchvision.ops import box_convert, nms

    keep = scores > threshold
    scores, corners = scores[keep].float(), box_convert(boxes[keep].float(), "cxcywh", "xyxy")
    order = nms(corners, scores, nms_iou)  # sorted by score, best first
    return scores[order], corners[order]


def count_boxes(scores: torch.Tensor, boxes: torch.Tensor, threshold: float, nms_iou: float) -> int:
    """``scores [P]``, ``boxes [P,4]`` (cx, cy, w, h) -> boxes above ``threshold`` left after NMS at ``nms_iou``."""
    return len(boxes_kept(scores, boxes, threshold, nms_iou)[0])


class ObjectCounting(Reward):
    """Graded counting reward for counting prompts; the counter is a VLM (``server``/``transformers``) or OWL.

    ``model`` is the served VLM name (server), a VLM hub id / folder (transformers), or an OWL detector hub id /
    folder (detector). ``question`` and ``query`` are formatted with the metadata (``{things}``, ``{noun}``,
    ``{number}``) and ``{prompt}``.
    """

    name = "counting"
    output_range = (0.0, 1.0)

    def __init__(self, backend: str = "detector", model: str = "google/owlv2-base-patch16-ensemble",
                 server_url: str = "http://127.0.0.1:8000/v1",
                 question: str = "How many {things} are in this image? Answer with a number.",
                 query: str = "a photo of a {noun}", threshold: float = 0.3, nms_iou: float = 0.3,
                 max_new_tokens: int = 16, batch_size: int = 8, timeout: float = 120.0, max_retries: int = 3,
                 concurrency: int = 8) -> None:
        super().__init__()
        if backend not in ("detector", "server", "transformers"):
            raise UserError(f"reward.backend={backend!r}: choose detector (OWL), server or transformers (VLM)")
        self.backend, self.question, self.query = backend, question, query
        if backend == "detector":
            self.counter = OwlCounter(model, threshold=threshold, nms_iou=nms_iou, batch_size=batch_size)
        else:
            self.counter = make_vlm(backend, model, server_url, max_new_tokens, batch_size, timeout, max_retries,
                                    concurrency)

    def load(self) -> None:
        self.counter.load(self.device, self.dtype)

    def predict(self, images, prompts: list[str], metadata: list[dict]) -> tuple[list[int | None], list[str]]:
        """Predicted counts (None when a VLM answer has no number) and the raw answers."""
        pil_images = to_pil(images)
        if self.backend == "detector":
            queries = [self.query.format(prompt=p, **m) for p, m in zip(prompts, metadata)]
            counts = self.counter.count(pil_images, queries)
            return counts, [str(c) for c in counts]
        questions = [self.question.format(prompt=p, **m) for p, m in zip(prompts, metadata)]
        answers = self.counter.ask(pil_images, questions)
        return [parse_count(answer) for answer in answers], answers

    def score(self, images, prompts, metadata):
        for prompt, meta in zip(prompts, metadata):
            if not {"number", "noun", "things"} <= set(meta):
                raise UserError(f"the counting reward needs counting prompts (prompts=counting): {prompt!r} has no "
                                "number/noun/things metadata")
        predicted, answers = self.predict(images, prompts, metadata)
        targets = [meta["number"] for meta in metadata]
        rewards = torch.tensor([count_reward(p, n) for p, n in zip(predicted, targets)], device=images.device)
        return rewards, {"predicted_count": [-1 if p is None else p for p in predicted],
                         "exact": [p == n for p, n in zip(predicted, targets)], "answers": answers}
