"""An OpenAI-compatible ``/chat/completions`` client (vLLM, sglang, OpenAI, ...): JSON only, never pickle.

:class:`ChatClient` posts request bodies and reads the replies with bounded time, size, retries and concurrency;
the VLM rewards (:mod:`ddpo_cli.rewards.vlm`) and prompt synthesis (:mod:`ddpo_cli.prompts.synthesis`) use it through
:meth:`ChatClient.complete` / :meth:`ChatClient.complete_all` and the readers :func:`answer_text` and
:func:`first_token_logprobs`.
"""
from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from PIL import Image

from ..errors import UserError, brief


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


def check_url(url: str, setting: str) -> None:
    """An http(s) address, or a UserError naming ``setting``."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise UserError(f"{setting}={url!r}: give an http:// or https:// address of an OpenAI-compatible API")


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
    """``url`` is the API base (``http://host:port/v1``). The API key, if the server wants one, is read from the
    environment variable named by ``api_key_env`` and sent only over https or to a loopback address; redirects are
    refused. A request that times out (``timeout`` bounds the whole reply, also a trickling one), cannot connect, gets
    HTTP 429/5xx, or gets a reply that is not a chat completion (or longer than ``max_reply_bytes``) is retried
    ``max_retries`` times, sleeping ``backoff * 2**attempt`` seconds. At most ``concurrency`` requests are in flight.

    Errors name the server (``label``, e.g. "VLM server") and the setting a user changes (``url_setting``)."""

    def __init__(self, url: str, model: str, label: str, url_setting: str, timeout: float = 120.0,
                 max_retries: int = 3, backoff: float = 1.0, concurrency: int = 8,
                 api_key_env: str = "OPENAI_API_KEY", max_reply_bytes: int = 4_000_000) -> None:
        check_url(url, "server_url")
        self.endpoint, self.model, self.label, self.url_setting = url.rstrip("/") + "/chat/completions", model, \
            label, url_setting
        self.timeout, self.max_retries, self.backoff, self.concurrency = timeout, max_retries, backoff, concurrency
        self.api_key_env, self.max_reply_bytes = api_key_env, max_reply_bytes

    def complete_all(self, bodies: list[dict], read: Callable[[Any], Any] = answer_text) -> list:
        """:meth:`complete` of each body, in order, ``concurrency`` at a time."""
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(lambda body: self.complete(body, read), bodies))

    def complete(self, body: dict, read: Callable[[Any], Any] = answer_text):
        """POST ``body`` (``model`` filled in) with retries; ``read(reply)`` extracts the answer."""
        data = json.dumps({"model": self.model, **body}).encode("utf-8")
        last_error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return read(self._post(data))
            except urllib.error.HTTPError as error:
                self._refuse(error)
                last_error = f"HTTP {error.code}"
            except BadReply as error:
                last_error = f"a reply that is not a chat completion: {brief(error, 120)}"
            except OSError as error:  # refused connection, timeout, reset (URLError is an OSError)
                last_error = brief(getattr(error, "reason", None) or error)
        raise UserError(f"{self.label} at {self.endpoint} did not answer after {self.max_retries + 1} attempts "
                        f"({last_error}): start an OpenAI-compatible server there (e.g. `vllm serve {self.model} "
                        f"--port 8000`), point {self.url_setting} at a running one, or raise its timeout")

    def _refuse(self, error: urllib.error.HTTPError) -> None:
        """A UserError for HTTP errors no retry can mend (redirects, missing keys, 4xx but 429)."""
        if 300 <= error.code < 400:
            raise UserError(f"{self.label} at {self.endpoint} redirects ({error.code}) to {error.filename}: give "
                            f"that address as server_url (requests and API keys are not sent on)") from None
        if error.code in (401, 403) and not may_send_key(self.endpoint):
            raise UserError(f"{self.label} at {self.endpoint} wants an API key (HTTP {error.code}), which is only "
                            f"sent over https or to this machine: use an https:// server_url") from None
        if error.code != 429 and error.code < 500:
            detail = brief(error.read().decode("utf-8", "replace"))
            raise UserError(f"{self.label} at {self.endpoint} rejected the request (HTTP {error.code}: {detail}): "
                            f"check that the served model name is {self.model!r}") from None

    def _post(self, data: bytes):
        """One request; the parsed JSON reply. The whole reply must arrive within ``timeout`` seconds (plus the last
        read's own timeout) and hold at most ``max_reply_bytes``."""
        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.api_key_env) and may_send_key(self.endpoint):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
        deadline, reply = time.monotonic() + self.timeout, bytearray()
        with _OPENER.open(request, timeout=self.timeout) as response:
            while chunk := response.read1(65536) if hasattr(response, "read1") else response.read(65536):
                reply += chunk
                if len(reply) > self.max_reply_bytes:
                    raise BadReply(f"more than {self.max_reply_bytes} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the reply took more than {self.timeout} s")
        try:
            return json.loads(reply.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadReply(f"not JSON: {brief(bytes(reply[:200]).decode('utf-8', 'replace'), 120)}") from None
