"""JSON over HTTP with bounded time, size, retries and concurrency: the one client under every server ddpo-cli
talks to (OpenAI-compatible VLM and LLM servers, reward servers). JSON only, never pickle.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ..errors import UserError, brief


class BadReply(Exception):
    """The server answered, but not with what was asked (HTML, broken or unexpected JSON, too large, too slow)."""


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


def check_url(url: str, setting: str, what: str = "an OpenAI-compatible API") -> None:
    """An http(s) address, or a UserError naming ``setting``."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise UserError(f"{setting}={url!r}: give an http:// or https:// address of {what}")


class JsonClient:
    """POSTs JSON bodies to ``endpoint``. A request that times out (``timeout`` bounds the whole reply, also a
    trickling one), cannot connect, gets HTTP 429/5xx, or gets a reply ``read`` refuses with BadReply (or longer than
    ``max_reply_bytes``) is retried ``max_retries`` times, sleeping ``backoff * 2**attempt`` seconds; at most
    ``concurrency`` requests are in flight. The API key, if the server wants one, is read from the environment
    variable ``api_key_env`` and sent only over https or to a loopback address; redirects are refused.

    Errors name the server (``label``), the setting a user changes (``url_setting``), how to start one (``start``)
    and what a rejected request (HTTP 4xx) most likely means (``rejected``)."""

    def __init__(self, endpoint: str, label: str, url_setting: str, start: str, rejected: str,
                 timeout: float = 120.0, max_retries: int = 3, backoff: float = 1.0, concurrency: int = 8,
                 api_key_env: str = "OPENAI_API_KEY", max_reply_bytes: int = 4_000_000) -> None:
        self.endpoint, self.label, self.url_setting, self.start, self.rejected = endpoint, label, url_setting, \
            start, rejected
        self.timeout, self.max_retries, self.backoff, self.concurrency = timeout, max_retries, backoff, concurrency
        self.api_key_env, self.max_reply_bytes = api_key_env, max_reply_bytes
        self.max_request_bytes: int | None = None  # the server's limit, when it states one

    def post_all(self, bodies: list[dict], read: Callable[[Any], Any] | list[Callable[[Any], Any]]) -> list:
        """:meth:`post` of each body, in order, ``concurrency`` at a time (``read``: one for all, or one per body)."""
        reads = read if isinstance(read, list) else [read] * len(bodies)
        if len(bodies) <= 1:
            return [self.post(body, reader) for body, reader in zip(bodies, reads)]
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(self.post, bodies, reads))

    def post(self, body: dict, read: Callable[[Any], Any]):
        """POST ``body`` with retries; ``read(reply)`` extracts the answer (BadReply when it is not one)."""
        data = json.dumps(body).encode("utf-8")
        if self.max_request_bytes is not None and len(data) > self.max_request_bytes:
            raise UserError(f"{self.label} at {self.endpoint} takes requests of at most "
                            f"{self.max_request_bytes / 2**20:.1f} MB and this one is {len(data) / 2**20:.1f} MB: "
                            f"{self.rejected}")
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
                last_error = f"an unexpected reply: {brief(error, 120)}"
            except OSError as error:  # refused connection, timeout, reset (URLError is an OSError)
                last_error = brief(getattr(error, "reason", None) or error)
        raise UserError(f"{self.label} at {self.endpoint} did not answer after {self.max_retries + 1} attempts "
                        f"({last_error}): {self.start}, point {self.url_setting} at a running one, or raise its "
                        f"timeout / max_retries")

    def _refuse(self, error: urllib.error.HTTPError) -> None:
        """A UserError for HTTP errors no retry can mend (redirects, missing keys, 4xx but 429)."""
        if 300 <= error.code < 400:
            raise UserError(f"{self.label} at {self.endpoint} redirects ({error.code}) to {error.filename}: give "
                            f"that address as {self.url_setting} (requests and API keys are not sent on)") from None
        if error.code in (401, 403) and not may_send_key(self.endpoint):
            raise UserError(f"{self.label} at {self.endpoint} wants an API key (HTTP {error.code}), which is only "
                            f"sent over https or to this machine: use an https:// address") from None
        if error.code != 429 and error.code < 500:
            detail = brief(error.read().decode("utf-8", "replace"))
            raise UserError(f"{self.label} at {self.endpoint} rejected the request (HTTP {error.code}: {detail}): "
                            f"{self.rejected}") from None

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
