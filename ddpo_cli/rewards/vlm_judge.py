"""VLM-as-judge: a yes/no question about each image; the reward is the VLM's probability of answering yes.

The question (default "Does this image show {prompt}? Answer yes or no.", formatted with ``{prompt}`` and the
prompt's metadata) goes to a VLM (``backend=transformers`` in process, or ``server``: an OpenAI-compatible API such
as ``vllm serve``). Nothing is sampled: the reward reads the distribution of the first answer token.

    yes = sum of P(token) over ``yes_tokens`` ("Yes", " yes", ...),  no = the same over ``no_tokens``
    reward = yes / (yes + no)

i.e. P(yes) renormalised over the yes and no variants, so that probability spent on other first tokens ("The",
"Sure", ...) does not lower the reward. ``info["p_yes_raw"]`` / ``info["p_no_raw"]`` log the unnormalised masses
(a small total means the model mostly answers something else: check the question).

Backends: ``transformers`` takes the softmax of the next-token logits at the generation position (one forward pass;
variants that are not a single token of the model's tokenizer are skipped). ``server`` asks for ``max_tokens: 1,
logprobs: true, top_logprobs: K`` and reads ``choices[0].logprobs.content[0].top_logprobs``; a side none of whose
variants is among the top K gets 0. When neither side is there, the image gets 0.5 (no information either way;
``info["yes_no_found"]`` is False); when that happens for every image of a batch, it is a UserError (the question
or the token lists do not fit the model), not a silent run of 0.5s.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .base import Reward
from .vlm import make_vlm, to_pil

YES_TOKENS = ["Yes", "yes", "YES", " Yes", " yes", " YES"]
NO_TOKENS = ["No", "no", "NO", " No", " no", " NO"]


def yes_share(masses: torch.Tensor) -> torch.Tensor:
    """``[B, 2]`` (yes, no) probability masses -> ``[B]`` yes / (yes + no); 0.5 where both are 0."""
    total = masses.sum(-1)
    return torch.where(total > 0, masses[:, 0] / total.clamp_min(1e-30), torch.full_like(total, 0.5))


class VLMJudge(Reward):
    """Reward = P(yes | image, question) renormalised over yes/no (see the module docstring). Not differentiable.

    ``model`` is a VLM hub id / local folder (transformers) or the served model name (server); ``top_logprobs`` is
    K for the server (vLLM allows up to its ``--max-logprobs``, 20 by default).
    """

    name = "vlm_judge"
    output_range = (0.0, 1.0)

    def __init__(self, backend: str = "server", model: str = "Qwen/Qwen2.5-VL-7B-Instruct",
                 server_url: str = "http://127.0.0.1:8000/v1",
                 question: str = "Does this image show {prompt}? Answer yes or no.",
                 yes_tokens: list[str] | None = None, no_tokens: list[str] | None = None, top_logprobs: int = 20,
                 batch_size: int = 8, timeout: float = 120.0, max_retries: int = 3, concurrency: int = 8) -> None:
        super().__init__()
        if top_logprobs < 1:
            raise UserError(f"reward.top_logprobs={top_logprobs}: use >= 1 (vLLM allows up to 20 by default)")
        self.question, self.top_logprobs, self.backend = question, top_logprobs, backend
        self.yes_tokens, self.no_tokens = list(yes_tokens or YES_TOKENS), list(no_tokens or NO_TOKENS)
        shared = sorted(set(self.yes_tokens) & set(self.no_tokens))
        if shared:
            raise UserError(f"reward.yes_tokens and reward.no_tokens share {shared}: a token is yes or no, not both")
        self.vlm = make_vlm(backend, model, server_url, 1, batch_size, timeout, max_retries, concurrency)

    def load(self) -> None:
        self.vlm.load(self.device, self.dtype)

    def ask(self, prompt: str, meta: dict) -> str:
        """The question about one image: ``question`` formatted with ``{prompt}`` and the prompt's metadata."""
        try:
            return self.question.format_map({**meta, "prompt": prompt})
        except KeyError as missing:
            raise UserError(f"reward.question {self.question!r} names {missing}, which the metadata of {prompt!r} "
                            "does not have: use {prompt} or a key of the prompt set's metadata") from None

    def masses(self, images: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """``[B, 2]``: the probability masses of the yes and the no variants as the first answer token."""
        extra = {"top_logprobs": self.top_logprobs} if self.backend == "server" else {}
        return self.vlm.yes_no_probabilities(to_pil(images), questions, self.yes_tokens, self.no_tokens, **extra)

    def score(self, images, prompts, metadata):
        questions = [self.ask(prompt, meta) for prompt, meta in zip(prompts, metadata)]
        masses = self.masses(images, questions)
        found = masses.sum(-1) > 0
        if not found.any():
            raise UserError(f"the VLM's first answer token was none of {self.yes_tokens + self.no_tokens} for all "
                            f"{len(prompts)} images (question {questions[0]!r}): ask a yes/no question, list the "
                            "model's yes/no tokens in reward.yes_tokens / reward.no_tokens, or raise "
                            "reward.top_logprobs")
        rewards = yes_share(masses).to(images.device)
        return rewards, {"p_yes_raw": masses[:, 0].tolist(), "p_no_raw": masses[:, 1].tolist(),
                         "yes_no_found": found.tolist()}
