"""An OpenAI-compatible ``/chat/completions`` client (vLLM, sglang, OpenAI, ...): JSON only, never pickle.

:class:`ChatClient` posts request bodies and reads the replies through :class:`~ddpo_cli.clients.http_json.JsonClient`
(bounded time, size, retries and concurrency);
the VLM rewards (:mod:`ddpo_cli.rewards.vlm`) and prompt synthesis (:mod:`ddpo_cli.prompts.synthesis`) use it through
:meth:`ChatClient.complete` / :meth:`ChatClient.complete_all` and the readers :func:`answer_text` and
:func:`first_token_logprobs`.
"""
from __future__ import annotations

import base64
import io
import json
from typing import Any, Callable

from PIL import Image

from ..errors import brief
from .http_json import BadReply, JsonClient, check_url, may_send_key

__all__ = ["BadReply", "ChatClient", "answer_text", "first_token_logprobs", "image_data_url", "may_send_key"]


def image_data_url(image: Image.Image, image_format: str = "jpeg") -> str:
    """The image as a ``data:image/...;base64,...`` URL (JPEG quality 90, or lossless PNG)."""
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return f"data:image/{image_format};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def answer_text(reply: Any) -> str:
    """The assistant's text of a chat completion (BadReply for anything else)."""
    try:
        content = reply["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise BadReply(f"no choices[0].message in {brief(json.dumps(reply), 120)}") from None
    if content is not None and not isinstance(content, str):
        raise BadReply(f"message content is {type(content).__name__}, not text")
    return (content or "").strip()


def first_token_logprobs(reply: Any) -> dict[str, float]:
    """``{token: logprob}`` of the first answer token's ``top_logprobs`` (and the token itself) in a chat completion
    with ``logprobs`` (the OpenAI / vLLM format); BadReply when they are missing."""
    try:
        first = reply["choices"][0]["logprobs"]["content"][0]
        entries = [*first["top_logprobs"], first]
        return {str(entry["token"]): float(entry["logprob"]) for entry in entries}
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise BadReply(f"no choices[0].logprobs.content[0].top_logprobs (does the server return logprobs?) in "
                       f"{brief(json.dumps(reply), 120)}") from None


class ChatClient:
    """``url`` is the API base (``http://host:port/v1``); requests go to its ``/chat/completions`` with the served
    ``model`` named. Time, size, retries, concurrency and API keys as :class:`JsonClient` bounds them; errors name
    the server (``label``, e.g. "VLM server") and the setting a user changes (``url_setting``)."""

    def __init__(self, url: str, model: str, label: str, url_setting: str, timeout: float = 120.0,
                 max_retries: int = 3, backoff: float = 1.0, concurrency: int = 8,
                 api_key_env: str = "OPENAI_API_KEY", max_reply_bytes: int = 4_000_000) -> None:
        check_url(url, "server_url")
        self.model, self.label = model, label
        self.http = JsonClient(url.rstrip("/") + "/chat/completions", label, url_setting,
                               start=f"start an OpenAI-compatible server there (e.g. `vllm serve {model} --port 8000`)",
                               rejected=f"check that the served model name is {model!r}", timeout=timeout,
                               max_retries=max_retries, backoff=backoff, concurrency=concurrency,
                               api_key_env=api_key_env, max_reply_bytes=max_reply_bytes)
        self.endpoint = self.http.endpoint

    def complete_all(self, bodies: list[dict], read: Callable[[Any], Any] = answer_text) -> list:
        """:meth:`complete` of each body, in order, ``concurrency`` at a time."""
        return self.http.post_all([{"model": self.model, **body} for body in bodies], read)

    def complete(self, body: dict, read: Callable[[Any], Any] = answer_text):
        """POST ``body`` (``model`` filled in) with retries; ``read(reply)`` extracts the answer."""
        return self.http.post({"model": self.model, **body}, read)
