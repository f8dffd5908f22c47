"""Vision-language model backends: ask one question about each image, get one answer string per image.

- :class:`TransformersVLM`: in-process ``transformers`` (any image-text-to-text model with a chat template: Qwen2-VL,
  SmolVLM, LLaVA, ...), greedy decoding, batched.
- :class:`ServerVLM`: an OpenAI-compatible chat-completions server (``vllm serve``, sglang, ...): JSON messages with
  base64 data-URL images, a bounded number of concurrent requests, timeout, bounded retries with exponential backoff.

Both share ``load(device, dtype)`` (lazy), ``ask(images, questions) -> answers`` and
``yes_no_probabilities(images, questions, yes_tokens, no_tokens) -> [B, 2]`` (the probability mass of the yes and the
no variants as the first answer token). :func:`make_vlm` picks one.
"""
from __future__ import annotations

import base64
import inspect
import io
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from ..images import to_uint8_hwc
from ..errors import UserError, brief, loading


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
            self.model = auto_model.from_pretrained(self.model_id, **_dtype_kwarg(transformers, dtype))
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


def _dtype_kwarg(transformers, dtype: torch.dtype) -> dict:
    """``from_pretrained`` takes ``dtype`` since transformers 4.56 (``torch_dtype`` before)."""
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


class BadReply(Exception):
    """The server answered, but not with a chat completion (HTML, broken or unexpected JSON, too large, too slow)."""


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: urllib would repeat the request, API key included, at the new address."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(newurl, code, f"redirect to {newurl}", headers, fp)


_OPENER = urllib.request.build_opener(_RefuseRedirects)
LOOPBACK = ("localhost", "127.0.0.1", "::1")


def may_send_key(endpoint: str) -> bool:
    """An API key travels only encrypted (https) or to this machine (loopback)."""
    parts = urllib.parse.urlsplit(endpoint)
    return parts.scheme == "https" or parts.hostname in LOOPBACK


class ServerVLM:
    """An OpenAI-compatible ``/chat/completions`` endpoint (vLLM, sglang, ...), JSON only.

    ``url`` is the API base (``http://host:port/v1``); ``model`` the served model name. The API key, if the server
    wants one, is read from the environment variable named by ``api_key_env`` and sent only over https or to a
    loopback address; redirects are refused. A request that times out (``timeout`` bounds the whole reply, also a
    trickling one), cannot connect, gets HTTP 429/5xx, or gets a reply that is not a chat completion (or longer than
    ``max_reply_bytes``) is retried ``max_retries`` times, sleeping ``backoff * 2**attempt`` seconds.

    Errors name the server ``label`` and the setting ``url_setting`` a user changes (a subclass for another kind of
    server sets its own).
    """

    label = "VLM server"
    url_setting = "the reward's server_url"

    def __init__(self, url: str = "http://127.0.0.1:8000/v1", model: str = "Qwen/Qwen2.5-VL-7B-Instruct",
                 max_new_tokens: int = 64, timeout: float = 120.0, max_retries: int = 3, backoff: float = 1.0,
                 concurrency: int = 8, image_format: str = "jpeg", api_key_env: str = "OPENAI_API_KEY",
                 max_reply_bytes: int = 4_000_000) -> None:
        if image_format.lower() not in ("jpeg", "png"):
            raise UserError(f"image_format={image_format!r}: choose jpeg or png")
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise UserError(f"server_url={url!r}: give an http:// or https:// address of an OpenAI-compatible API")
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model, self.max_new_tokens, self.timeout = model, max_new_tokens, timeout
        self.max_retries, self.backoff, self.concurrency = max_retries, backoff, concurrency
        self.image_format, self.api_key_env, self.max_reply_bytes = image_format.lower(), api_key_env, max_reply_bytes

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        """Nothing to load: the server holds the model."""

    def ask(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        """One answer per (image, question); at most ``concurrency`` requests in flight."""
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(self._ask_one, images, questions))

    def data_url(self, image: Image.Image) -> str:
        """The image as a ``data:image/...;base64,...`` URL (JPEG quality 90, or lossless PNG)."""
        buffer = io.BytesIO()
        if self.image_format == "png":
            image.save(buffer, format="PNG")
        else:
            image.convert("RGB").save(buffer, format="JPEG", quality=90)
        return f"data:image/{self.image_format};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"

    def payload(self, image: Image.Image, question: str) -> dict:
        content = [{"type": "image_url", "image_url": {"url": self.data_url(image)}},
                   {"type": "text", "text": question}]
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_new_tokens, "temperature": 0.0}

    def _ask_one(self, image: Image.Image, question: str) -> str:
        return self._answer_with_retries(json.dumps(self.payload(image, question)).encode("utf-8"))

    def yes_no_probabilities(self, images: list[Image.Image], questions: list[str], yes_tokens: list[str],
                             no_tokens: list[str], top_logprobs: int = 20) -> torch.Tensor:
        """``[B, 2]`` float32: the summed probabilities of the yes and of the no variants (exact token strings)
        among the ``top_logprobs`` most likely first answer tokens (``max_tokens: 1``); a side with no variant in
        that top-K gets 0."""
        def ask(image: Image.Image, question: str) -> list[float]:
            body = {**self.payload(image, question), "max_tokens": 1, "logprobs": True, "top_logprobs": top_logprobs}
            logprobs = self._answer_with_retries(json.dumps(body).encode("utf-8"), read=self._first_token_logprobs)
            for token, value in logprobs.items():
                if not -math.inf < value <= 1e-6:  # a little above 0 is rounding
                    raise UserError(f"{self.label} at {self.endpoint} gave the token {token!r} the log-probability "
                                    f"{value:g}, which is none (a log-probability is finite and <= 0): check the "
                                    f"server and its --max-logprobs setting")
            return [sum(math.exp(logprobs[t]) for t in set(variants) if t in logprobs)
                    for variants in (yes_tokens, no_tokens)]

        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return torch.tensor(list(pool.map(ask, images, questions)), dtype=torch.float32).reshape(-1, 2)

    @staticmethod
    def _first_token_logprobs(reply) -> dict[str, float]:
        """``{token: logprob}`` of the first answer token's ``top_logprobs`` (and the token itself) in a chat
        completion with ``logprobs`` (the OpenAI / vLLM format); BadReply when they are missing."""
        try:
            first = reply["choices"][0]["logprobs"]["content"][0]
            entries = [*first["top_logprobs"], first]
            return {str(entry["token"]): float(entry["logprob"]) for entry in entries}
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise BadReply(f"no choices[0].logprobs.content[0].top_logprobs (does the server return logprobs?) in "
                           f"{brief(json.dumps(reply), 120)}") from None

    def _answer_with_retries(self, body: bytes, read=None):
        """POST ``body`` with retries; ``read(reply)`` (default: the assistant's text) extracts the answer."""
        read = read or self._answer
        last_error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return read(self._post(body))
            except urllib.error.HTTPError as error:
                if 300 <= error.code < 400:
                    raise UserError(f"{self.label} at {self.endpoint} redirects ({error.code}) to {error.filename}: "
                                    f"give that address as server_url (requests and API keys are not sent on)"
                                    ) from None
                if error.code in (401, 403) and not may_send_key(self.endpoint):
                    raise UserError(f"{self.label} at {self.endpoint} wants an API key (HTTP {error.code}), which is "
                                    f"only sent over https or to this machine: use an https:// server_url") from None
                if error.code != 429 and error.code < 500:
                    detail = brief(error.read().decode("utf-8", "replace"))
                    raise UserError(f"{self.label} at {self.endpoint} rejected the request (HTTP {error.code}: "
                                    f"{detail}): check that the served model name is {self.model!r}") from None
                last_error = f"HTTP {error.code}"
            except BadReply as error:
                last_error = f"a reply that is not a chat completion: {brief(error, 120)}"
            except OSError as error:  # refused connection, timeout, reset (URLError is an OSError)
                last_error = brief(getattr(error, "reason", None) or error)
        raise UserError(f"{self.label} at {self.endpoint} did not answer after {self.max_retries + 1} attempts "
                        f"({last_error}): start an OpenAI-compatible server there (e.g. `vllm serve {self.model} "
                        f"--port 8000`), point {self.url_setting} at a running one, or raise its timeout")

    @staticmethod
    def _answer(reply) -> str:
        """The assistant's text of a chat completion (BadReply for anything else)."""
        try:
            content = reply["choices"][0]["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise BadReply(f"no choices[0].message in {brief(json.dumps(reply), 120)}") from None
        if content is not None and not isinstance(content, str):
            raise BadReply(f"message content is {type(content).__name__}, not text")
        return (content or "").strip()

    def _post(self, body: bytes):
        """One request; the parsed JSON reply. The whole reply must arrive within ``timeout`` seconds (plus the
        last read's own timeout) and hold at most ``max_reply_bytes``."""
        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.api_key_env) and may_send_key(self.endpoint):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        deadline, data = time.monotonic() + self.timeout, bytearray()
        with _OPENER.open(request, timeout=self.timeout) as response:
            while chunk := response.read1(65536) if hasattr(response, "read1") else response.read(65536):
                data += chunk
                if len(data) > self.max_reply_bytes:
                    raise BadReply(f"more than {self.max_reply_bytes} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the reply took more than {self.timeout} s")
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadReply(f"not JSON: {brief(bytes(data[:200]).decode('utf-8', 'replace'), 120)}") from None


def make_vlm(backend: str, model: str, server_url: str, max_new_tokens: int, batch_size: int, timeout: float,
             max_retries: int, concurrency: int):
    """``backend`` ``transformers`` (in process) or ``server`` (OpenAI-compatible HTTP) -> a VLM backend."""
    if backend == "transformers":
        return TransformersVLM(model, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if backend == "server":
        return ServerVLM(server_url, model, max_new_tokens=max_new_tokens, timeout=timeout,
                         max_retries=max_retries, concurrency=concurrency)
    raise UserError(f"reward.backend={backend!r}: choose transformers (in-process) or server (OpenAI-compatible)")
