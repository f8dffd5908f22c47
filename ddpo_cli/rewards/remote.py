"""A reward scored by a reward server (``ddpo serve-reward reward=<option>``): the reward model runs in its own
process, environment, GPUs or machine; this side sends 8-bit images and reads the rewards back
(:mod:`ddpo_cli.rewards.wire`, JSON only).

Each call is split into requests of ``images_per_request`` images, ``concurrency`` in flight. Time-outs, refused
connections and HTTP 429/5xx (a busy or restarting server) are retried with exponential backoff; when the server
stays away, one line says so and the run stops with its checkpoints intact. Not differentiable.
"""
from __future__ import annotations

import json
import time
import urllib.request

import torch

from ..clients.http_json import BadReply, JsonClient, check_url
from ..errors import UserError, brief
from .base import Reward
from .wire import IMAGE_FORMATS, WireError, decode_reply, encode_request


def reply_reader(n: int):
    """Reads a reply for ``n`` images; a malformed one is a BadReply (retried, then one line)."""
    def read(reply):
        try:
            return decode_reply(reply, n)
        except WireError as error:
            raise BadReply(str(error)) from None

    return read


class RemoteReward(Reward):
    name = "remote"

    def __init__(self, url: str = "http://127.0.0.1:8100", image_format: str = "png", images_per_request: int = 16,
                 timeout: float = 120.0, max_retries: int = 6, backoff: float = 1.0, concurrency: int = 4) -> None:
        super().__init__()
        check_url(url, "reward.url", "a reward server (`ddpo serve-reward`)")
        if image_format not in IMAGE_FORMATS:
            raise UserError(f"reward.image_format={image_format!r}: choose {' or '.join(IMAGE_FORMATS)}")
        if images_per_request < 1 or concurrency < 1 or max_retries < 0 or timeout <= 0 or backoff < 0:
            raise UserError("reward.images_per_request and reward.concurrency must be >= 1, reward.max_retries >= 0, "
                            "reward.timeout > 0 and reward.backoff >= 0")
        self.url, self.image_format, self.images_per_request = url.rstrip("/"), image_format, images_per_request
        self.client = JsonClient(
            self.url + "/predict", "reward server", "reward.url",
            start="start one there with `ddpo serve-reward reward=<option> --port <port>`",
            rejected="lower reward.images_per_request, or raise the server's max_request_mb / max_images_per_request",
            timeout=timeout, max_retries=max_retries, backoff=backoff, concurrency=concurrency,
            max_reply_bytes=64_000_000)

    def load(self) -> None:
        """Ask the server what it serves (its ``/info``): the reward's name and output range, and its request-size
        limit. Retried like a request (a server started beside the trainer may still be loading); one line if no
        server answers there."""
        info = self.server_info()
        served, limits = info.get("model") or {}, info.get("server") or {}
        self.client.max_request_bytes = limits.get("max_payload_size")
        self.name = f"remote:{served.get('reward', '?')}"
        low, high = served.get("output_range", [None, None])
        self.output_range = (low, high)

    def model_parameters(self) -> int:
        return 0  # the model is on the server

    def server_info(self) -> dict:
        error = None
        for attempt in range(self.client.max_retries + 1):
            if attempt:
                time.sleep(self.client.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(self.url + "/info", timeout=self.client.timeout) as response:
                    info = json.loads(response.read(1_000_000))
                if isinstance(info, dict):
                    return info
                error = "its /info is not a JSON object"
            except (OSError, ValueError) as exc:
                error = brief(getattr(exc, "reason", None) or exc, 120)
        raise UserError(f"no reward server answers at {self.url} ({error}): start one with `ddpo serve-reward "
                        f"reward=<option> --port <port>`, or point reward.url at a running one")

    def score(self, images, prompts, metadata):
        n, step = images.shape[0], self.images_per_request
        starts = range(0, n, step)
        bodies = [encode_request(images[i:i + step], prompts[i:i + step], metadata[i:i + step], self.image_format)
                  for i in starts]
        replies = self.client.post_all(bodies, [reply_reader(min(step, n - i)) for i in starts])
        info: dict[str, list] = {}
        for values, extra in replies:
            for key, column in extra.items():
                if isinstance(column, list) and len(column) == len(values):
                    info.setdefault(key, []).extend(column)
        rewards = [r for values, _ in replies for r in values]
        return torch.tensor(rewards, dtype=torch.float32, device=images.device), \
            {key: column for key, column in info.items() if len(column) == n}
