"""Prompt alignment (DDPO paper): a VLM describes the image, BERTScore compares it with the prompt.

reward = BERTScore recall of the description against the reference ``"The image contains {prompt}"``: how much of
the reference the description covers. The paper used LLaVA-13B and ``microsoft/deberta-xlarge-mnli`` (layer 40).
"""
from __future__ import annotations

import torch

from ..errors import UserError
from ._errors import brief
from .base import Reward
from .vlm import make_vlm, to_pil


class PromptAlignment(Reward):
    """VLM caption + BERTScore recall. ``backend``: ``server`` (OpenAI-compatible) or ``transformers``.

    ``vlm_model`` is the served model name (server) or a hub id / local folder (transformers). ``bertscore_model``
    is a hub id or local folder; ``bertscore_num_layers`` picks its layer (bert-score's tuned default when null,
    required for a local folder).
    """

    name = "prompt_alignment"
    output_range = (-1.0, 1.0)  # BERTScore recall: cosines, ~0.3-0.8 in practice

    def __init__(self, backend: str = "server", vlm_model: str = "Qwen/Qwen2.5-VL-7B-Instruct",
                 server_url: str = "http://127.0.0.1:8000/v1", question: str = "what is going on in this image?",
                 reference_template: str = "The image contains {prompt}", max_new_tokens: int = 64,
                 batch_size: int = 8, timeout: float = 120.0, max_retries: int = 3, concurrency: int = 8,
                 bertscore_model: str = "microsoft/deberta-xlarge-mnli", bertscore_num_layers: int | None = None,
                 bertscore_batch_size: int = 64) -> None:
        super().__init__()
        self.vlm = make_vlm(backend, vlm_model, server_url, max_new_tokens, batch_size, timeout, max_retries,
                            concurrency)
        self.question, self.reference_template = question, reference_template
        self.bertscore_model, self.bertscore_num_layers = bertscore_model, bertscore_num_layers
        self.bertscore_batch_size = bertscore_batch_size

    def load(self) -> None:
        self.vlm.load(self.device, self.dtype)
        self.scorer = load_bertscore(self.bertscore_model, self.bertscore_num_layers, self.device,
                                     self.bertscore_batch_size)

    def score(self, images, prompts, metadata):
        descriptions = self.vlm.ask(to_pil(images), [self.question.format(prompt=p) for p in prompts])
        references = [self.reference_template.format(prompt=p) for p in prompts]
        precision, recall, f1 = self.scorer.score(descriptions, references)  # each [B]
        return recall.to(images.device, torch.float32), {
            "descriptions": descriptions, "precision": precision.tolist(), "f1": f1.tolist()}


def load_bertscore(model: str, num_layers: int | None, device: torch.device, batch_size: int = 64):
    """A ``bert_score.BERTScorer`` (no idf, no baseline rescaling, as in the paper)."""
    from bert_score import BERTScorer
    from bert_score.utils import model2layers

    if num_layers is None and model not in model2layers:
        raise UserError(f"reward.bertscore_num_layers is needed for {model!r} (bert-score only knows layers of hub "
                        "models it was tuned on): give the layer to use, e.g. the model's number of layers")
    try:
        return BERTScorer(model_type=model, num_layers=num_layers, batch_size=batch_size, device=str(device),
                          use_fast_tokenizer=True)
    except Exception as error:
        raise UserError(f"could not load the BERTScore model {model!r} ({brief(error)}): give a hub id (downloaded "
                        "once) or a local folder via reward.bertscore_model") from error
