"""Vision-language model backends: ask one question about each image, get one answer string per image.

- :class:`TransformersVLM`: in-process ``transformers`` (any image-text-to-text model with a chat template: Qwen2-VL,
  SmolVLM, LLaVA, ...), greedy decoding, batched.
- :class:`ServerVLM`: an OpenAI-compatible chat-completions server (``vllm serve``, sglang, ...) through
  :class:`~ddpo_cli.clients.openai_compatible.ChatClient`: JSON messages with base64 data-URL images.

Both share ``load(device, dtype)`` (lazy), ``ask(images, questions) -> answers`` and
``yes_no_probabilities(images, questions, yes_tokens, no_tokens) -> [B, 2]`` (the probability mass of the yes and the
no variants as the first answer token). :func:`make_vlm` picks one.
"""
from __future__ import annotations

import inspect
import math

import torch
from PIL import Image

from ..clients.openai_compatible import ChatClient, first_token_logprobs, image_data_url
from ..errors import UserError, loading
from ..images import to_uint8_hwc
from ..runtime import transformers_dtype


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B,3,H,W]`` in [0,1] -> B RGB PIL images."""
    return [Image.fromarray(array) for array in to_uint8_hwc(images)]


class TransformersVLM:
    """A ``transformers`` VLM by hub id or local folder (``AutoProcessor`` + ``AutoModelForImageTextToText``)."""

    def __init__(self, model: str, max_new_tokens: int = 64, batch_size: int = 8) -> None:
        self.model_id, self.max_new_tokens, self.batch_size = model, max_new_tokens, batch_size

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        import transformers

        auto_model = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        with loading(f"the VLM {self.model_id!r}", "give a hub id of an image-text-to-text model (downloaded once) "
                                                   "or a local folder saved with save_pretrained"):
            self.processor = transformers.AutoProcessor.from_pretrained(self.model_id)
            self.model = auto_model.from_pretrained(self.model_id, **transformers_dtype(dtype))
        self.processor.tokenizer.padding_side = "left"  # decoder-only generation pads on the left
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def ask(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        """One greedy answer per (image, question), ``batch_size`` at a time."""
        answers = []
        for start in range(0, len(images), self.batch_size):
            answers += self._generate(images[start:start + self.batch_size], questions[start:start + self.batch_size])
        return answers

    def _generate(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        inputs = self._chat_inputs(images, questions)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)  # [B, L+new]
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]

    def _chat_inputs(self, images: list[Image.Image], questions: list[str]):
        """The chat-templated, left-padded batch (one user turn: image then question, generation prompt added)."""
        conversations = [[{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": question}]}]
                         for image, question in zip(images, questions)]
        inputs = self.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            **_padding_kwarg(self.processor)).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def token_ids(self, variants: list[str]) -> list[int]:
        """The distinct ids of the variants that are one token each (``"Yes"``, ``" yes"``, ...); others are
        skipped (their first token would stand for other words too). UserError when none is a single token."""
        encoded = [self.processor.tokenizer.encode(text, add_special_tokens=False) for text in variants]
        ids = list(dict.fromkeys(ids[0] for ids in encoded if len(ids) == 1))
        if not ids:
            raise UserError(f"none of {variants} is a single token of {self.model_id!r}: list single-token "
                            "variants in reward.yes_tokens / reward.no_tokens")
        return ids

    @torch.no_grad()
    def yes_no_probabilities(self, images: list[Image.Image], questions: list[str], yes_tokens: list[str],
                             no_tokens: list[str]) -> torch.Tensor:
        """``[B, 2]`` float32 on the CPU: P(first answer token is a yes variant), P(... a no variant), from one
        forward pass per ``batch_size`` images (the next-token softmax at the generation position; no sampling)."""
        yes_ids, no_ids = self.token_ids(yes_tokens), self.token_ids(no_tokens)
        masses = []
        for start in range(0, len(images), self.batch_size):
            inputs = self._chat_inputs(images[start:start + self.batch_size], questions[start:start + self.batch_size])
            probs = self.model(**inputs).logits[:, -1].float().softmax(-1)  # [b, V]: left padding puts it last
            masses.append(torch.stack([probs[:, yes_ids].sum(-1), probs[:, no_ids].sum(-1)], -1).cpu())
        return torch.cat(masses)


def _padding_kwarg(processor) -> dict:
    """Pad the batch: newer transformers take processor options in ``processor_kwargs``, older ones directly."""
    if "processor_kwargs" in inspect.signature(processor.apply_chat_template).parameters:
        return {"processor_kwargs": {"padding": True}}
    return {"padding": True}


class ServerVLM:
    """An OpenAI-compatible ``/chat/completions`` endpoint (vLLM, sglang, ...) asked about images: each request is one
    user turn (a base64 data-URL image, then the question), greedy. ``url`` is the API base (``http://host:port/v1``),
    ``model`` the served model name; timeouts, retries, API keys and concurrency as in
    :class:`~ddpo_cli.clients.openai_compatible.ChatClient`."""

    def __init__(self, url: str = "http://127.0.0.1:8000/v1", model: str = "Qwen/Qwen2.5-VL-7B-Instruct",
                 max_new_tokens: int = 64, timeout: float = 120.0, max_retries: int = 3, backoff: float = 1.0,
                 concurrency: int = 8, image_format: str = "jpeg", api_key_env: str = "OPENAI_API_KEY",
                 max_reply_bytes: int = 4_000_000) -> None:
        if image_format.lower() not in ("jpeg", "png"):
            raise UserError(f"image_format={image_format!r}: choose jpeg or png")
        self.client = ChatClient(url, model, "VLM server", "the reward's server_url", timeout, max_retries, backoff,
                                 concurrency, api_key_env, max_reply_bytes)
        self.max_new_tokens, self.image_format = max_new_tokens, image_format.lower()

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        """Nothing to load: the server holds the model."""

    def request(self, image: Image.Image, question: str) -> dict:
        content = [{"type": "image_url", "image_url": {"url": image_data_url(image, self.image_format)}},
                   {"type": "text", "text": question}]
        return {"messages": [{"role": "user", "content": content}], "max_tokens": self.max_new_tokens,
                "temperature": 0.0}

    def ask(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        """One answer per (image, question)."""
        return self.client.complete_all([self.request(image, question) for image, question in zip(images, questions)])

    def yes_no_probabilities(self, images: list[Image.Image], questions: list[str], yes_tokens: list[str],
                             no_tokens: list[str], top_logprobs: int = 20) -> torch.Tensor:
        """``[B, 2]`` float32: the summed probabilities of the yes and of the no variants (exact token strings)
        among the ``top_logprobs`` most likely first answer tokens (``max_tokens: 1``); a side with no variant in
        that top-K gets 0."""
        bodies = [{**self.request(image, question), "max_tokens": 1, "logprobs": True, "top_logprobs": top_logprobs}
                  for image, question in zip(images, questions)]
        masses = []
        for logprobs in self.client.complete_all(bodies, read=first_token_logprobs):
            for token, value in logprobs.items():
                if not -math.inf < value <= 1e-6:  # a little above 0 is rounding
                    raise UserError(f"{self.client.label} at {self.client.endpoint} gave the token {token!r} the "
                                    f"log-probability {value:g}, which is none (a log-probability is finite and "
                                    f"<= 0): check the server and its --max-logprobs setting")
            masses.append([sum(math.exp(logprobs[t]) for t in set(variants) if t in logprobs)
                           for variants in (yes_tokens, no_tokens)])
        return torch.tensor(masses, dtype=torch.float32).reshape(-1, 2)


def make_vlm(backend: str, model: str, server_url: str, max_new_tokens: int, batch_size: int, timeout: float,
             max_retries: int, concurrency: int):
    """``backend`` ``transformers`` (in process) or ``server`` (OpenAI-compatible HTTP) -> a VLM backend."""
    if backend == "transformers":
        return TransformersVLM(model, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if backend == "server":
        return ServerVLM(server_url, model, max_new_tokens=max_new_tokens, timeout=timeout,
                         max_retries=max_retries, concurrency=concurrency)
    raise UserError(f"reward.backend={backend!r}: choose transformers (in-process) or server (OpenAI-compatible)")
