"""Prompt alignment (DDPO paper): a VLM describes the image, BERTScore compares it with the prompt.

reward = BERTScore recall of the description against the reference ``"The image contains {prompt}"``: how much of
the reference the description covers. The paper used LLaVA-13B and ``microsoft/deberta-xlarge-mnli`` (layer 40).

BERTScore matches words by their contextual embeddings, so a description that contradicts the prompt in one word
("two red squares" for "three red squares") still covers almost all of it. ``inconsistency`` adds the contradiction
to the score: the description is also compared with minimal edits of the prompt (``prompt_edits.py``: the wrong
count, another colour, another object, a negation), each edit through the same reference template:

- ``none``: the paper's recall;
- ``margin``: recall(prompt) - max over edits of recall(edit), in [-1, 1]: negative when an edit fits better;
- ``softmax``: exp(recall(prompt) / T) / sum over prompt and edits of exp(recall / T), a probability (like the
  contrastive ``clip_zero_shot``), T = ``temperature``.
"""
from __future__ import annotations

import torch

from ..errors import UserError, loading
from ..toyworld.describe import ShapesCaptioner
from .base import Reward
from .prompt_edits import EDIT_KINDS, minimal_edits, object_of
from .vlm import make_vlm, to_pil

INCONSISTENCY_MODES = ("none", "margin", "softmax")


class PromptAlignment(Reward):
    """VLM caption + BERTScore recall. ``backend``: ``server`` (OpenAI-compatible), ``transformers``, or ``shapes``
    (the toy world's exact captioner, ``toyworld/describe.py``: known captions for tests and measurements).

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
                 bertscore_batch_size: int = 64, inconsistency: str = "none",
                 edits: list[str] | None = None, edit_objects: list[str] | None = None,
                 edit_colours: list[str] | None = None, count_span: int = 2, temperature: float = 0.05) -> None:
        super().__init__()
        if inconsistency not in INCONSISTENCY_MODES:
            raise UserError(f"reward.inconsistency={inconsistency!r}: choose one of {', '.join(INCONSISTENCY_MODES)}")
        edits = list(EDIT_KINDS if edits is None else edits)
        if set(edits) - set(EDIT_KINDS) or (inconsistency != "none" and not edits):
            raise UserError(f"reward.edits={edits}: choose one or more of {', '.join(EDIT_KINDS)}")
        if temperature <= 0:
            raise UserError(f"reward.temperature={temperature}: use a positive number (e.g. 0.05)")
        self.vlm = ShapesCaptioner() if backend == "shapes" else make_vlm(
            backend, vlm_model, server_url, max_new_tokens, batch_size, timeout, max_retries, concurrency)
        self.inconsistency, self.edits, self.temperature = inconsistency, edits, temperature
        self.edit_objects, self.edit_colours, self.count_span = edit_objects, edit_colours, count_span
        self.output_range = {"none": (-1.0, 1.0), "margin": (-2.0, 2.0), "softmax": (0.0, 1.0)}[inconsistency]
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
        info = {"descriptions": descriptions, "precision": precision.tolist(), "f1": f1.tolist()}
        if self.inconsistency == "none":
            return recall.to(images.device, torch.float32), info
        edits = self.edits_of(prompts, metadata)
        edit_recall = self.edit_recalls(descriptions, edits)  # B lists, one recall per edit
        rewards = [inconsistency_score(r, e, self.inconsistency, self.temperature)
                   for r, e in zip(recall.tolist(), edit_recall)]
        closest = [edit[max(range(len(e)), key=e.__getitem__)] if e else "" for edit, e in zip(edits, edit_recall)]
        info.update({"recall": recall.tolist(), "closest_edit": closest,
                     "closest_edit_recall": [max(e, default=float("nan")) for e in edit_recall]})
        return torch.tensor(rewards, dtype=torch.float32, device=images.device), info

    def edits_of(self, prompts: list[str], metadata: list[dict]) -> list[list[str]]:
        """The minimal edits of each prompt; objects to swap in default to the other objects of the batch."""
        batch_objects = list(dict.fromkeys(o for o in map(object_of, metadata) if o))
        objects = self.edit_objects if self.edit_objects is not None else batch_objects
        return [minimal_edits(p, m, self.edits, objects, self.edit_colours, self.count_span)
                for p, m in zip(prompts, metadata)]

    def edit_recalls(self, descriptions: list[str], edits: list[list[str]]) -> list[list[float]]:
        """BERTScore recall of each description against each of its prompt's edits (one batched call)."""
        candidates = [d for d, e in zip(descriptions, edits) for _ in e]
        references = [self.reference_template.format(prompt=edit) for e in edits for edit in e]
        flat = self.scorer.score(candidates, references)[1].tolist() if candidates else []
        out, start = [], 0
        for e in edits:
            out.append(flat[start:start + len(e)])
            start += len(e)
        return out


def inconsistency_score(recall: float, edit_recalls: list[float], mode: str, temperature: float) -> float:
    """The prompt's recall against its edits' recalls: ``margin`` (recall - best edit) or ``softmax`` (probability of
    the prompt among prompt + edits at ``temperature``). No edits: margin = recall, softmax = 1."""
    if mode == "margin":
        return recall - max(edit_recalls, default=0.0)
    logits = torch.tensor([recall, *edit_recalls], dtype=torch.float64) / temperature
    return float(logits.softmax(0)[0])


def load_bertscore(model: str, num_layers: int | None, device: torch.device, batch_size: int = 64):
    """A ``bert_score.BERTScorer`` (no idf, no baseline rescaling, as in the paper)."""
    from bert_score import BERTScorer
    from bert_score.utils import model2layers

    if num_layers is None and model not in model2layers:
        raise UserError(f"reward.bertscore_num_layers is needed for {model!r} (bert-score only knows layers of hub "
                        "models it was tuned on): give the layer to use, e.g. the model's number of layers")
    with loading(f"the BERTScore model {model!r}", "give a hub id (downloaded once) or a local folder via "
                                                   "reward.bertscore_model"):
        return BERTScorer(model_type=model, num_layers=num_layers, batch_size=batch_size, device=str(device),
                          use_fast_tokenizer=True)
