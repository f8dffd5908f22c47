"""``ddpo serve-reward``: any configured reward behind an HTTP endpoint, served by LitServe.

LitServe (Lightning AI, Apache-2.0) was chosen over Ray Serve because it is what this needs and no more: one Python
package on FastAPI/uvicorn, dynamic batching of concurrent requests (``max_batch_size`` / ``batch_timeout``), one
worker process per device with its own model (``devices`` x ``workers_per_device``), a ``/health`` endpoint that
answers 200 only once every worker has loaded, a request-size limit and a request timeout. Ray Serve brings a
cluster runtime (GCS, raylets, an object store) for a job that is one model per GPU.

What ddpo-cli adds: the wire format (:mod:`ddpo_cli.rewards.wire`: JSON with PNG or raw uint8 images, never pickle;
a malformed request is answered 400 with the reason), the bound on requests in flight (503 beyond it, which clients
retry), and ``/info`` naming the reward, its output range and whether it is differentiable.
"""
# no `from __future__ import annotations`: LitServe reads decode_request's annotation as a class
import json
import os
import signal
import socket
from functools import partial

import litserve as ls
import torch
from fastapi import HTTPException
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel

from .config import build
from .errors import UserError
from .rewards.base import score_in_batches
from .rewards.wire import WireError, decode_request, encode_reply
from .runtime import quiet_libraries, set_threads


class PendingLimit:
    """ASGI middleware: at most ``limit`` requests to ``path`` in flight; more get HTTP 503 at once (a bounded queue:
    a client that retries with backoff comes back when the server has room)."""

    def __init__(self, app, limit: int, path: str = "/predict") -> None:
        self.app, self.limit, self.path, self.pending = app, limit, path, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        if self.pending >= self.limit:
            body = json.dumps({"detail": f"{self.pending} requests in flight, the server's max_pending: retry "
                                         f"later"}).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": body})
            return
        self.pending += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.pending -= 1


def score_requests(reward_fn, requests: list[tuple], batch_size: int) -> list[tuple[list[float], dict]]:
    """Score several decoded requests together (images of one size in one pass) and split the results back:
    ``[(rewards, info)]`` per request."""
    results: list = [None] * len(requests)
    by_size: dict[tuple, list[int]] = {}
    for index, (images, _, _) in enumerate(requests):
        by_size.setdefault(tuple(images.shape[1:]), []).append(index)
    for indices in by_size.values():
        images = torch.cat([requests[i][0] for i in indices])
        prompts = [p for i in indices for p in requests[i][1]]
        metadata = [m for i in indices for m in requests[i][2]]
        values, info = score_in_batches(reward_fn, images, prompts, metadata, batch_size)
        start = 0
        for i in indices:
            end = start + len(requests[i][1])
            results[i] = (values[start:end], {key: column[start:end] for key, column in info.items()
                                              if len(column) == len(values)})
            start = end
    return results


class ScoreRequest(BaseModel):
    """The request's outline, checked by FastAPI before it is queued (a body that is not JSON, or lacks these
    lists, is answered 422); :func:`~ddpo_cli.rewards.wire.decode_request` checks the rest (400)."""

    images: list[dict]
    prompts: list[str]
    metadata: list[dict]


class RewardAPI(ls.LitAPI):
    """Scores with the reward ``reward_node``, built in each worker process on its device (``setup``)."""

    def __init__(self, reward_node: dict, server: dict, threads: int | None) -> None:
        super().__init__(max_batch_size=server["max_batch_requests"], batch_timeout=server["batch_timeout"])
        self.reward_node, self.server, self.threads = reward_node, server, threads

    def setup(self, device) -> None:
        set_threads(self.threads)
        quiet_libraries()
        self.reward = build(OmegaConf.create(self.reward_node), "reward")
        self.reward.setup(torch.device(device), torch.float32)

    def decode_request(self, request: ScoreRequest):
        try:
            return decode_request(request.model_dump(), self.server["max_images_per_request"])
        except WireError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None

    def batch(self, inputs):
        return list(inputs)

    def predict(self, requests):
        if isinstance(requests, list):  # merged requests (max_batch_requests > 1)
            return score_requests(self.reward, requests, self.server["batch_size"])
        return score_requests(self.reward, [requests], self.server["batch_size"])[0]

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        values, info = output
        return encode_reply(torch.tensor(values, dtype=torch.float32), info)


def interrupt(main_pid: int, signum, frame) -> None:
    """SIGTERM as Ctrl-C in the server's main process; in an API process forked from it (which inherits this
    handler, and whose uvicorn re-raises the signal once it has shut down), a quiet exit."""
    if os.getpid() != main_pid:
        raise SystemExit(0)
    raise KeyboardInterrupt


def check_server(server: DictConfig) -> None:
    for key in ("workers_per_device", "max_batch_requests", "batch_size", "max_images_per_request", "max_pending"):
        if server[key] < 1:
            raise UserError(f"server.{key}={server[key]}: use >= 1")
    if server.accelerator not in ("auto", "cpu", "cuda"):
        raise UserError(f"server.accelerator={server.accelerator!r}: choose auto, cpu or cuda")
    if not (0 < server.port < 65536):
        raise UserError(f"server.port={server.port}: choose a port between 1 and 65535")
    if server.max_request_mb <= 0 or server.timeout <= 0 or server.batch_timeout < 0:
        raise UserError("server.max_request_mb and server.timeout must be > 0, server.batch_timeout >= 0")


def check_port_free(host: str, port: int) -> None:
    """UserError when another process listens on ``host:port`` (uvicorn would exit with code 3 and Errno 98)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"cannot serve on {host}:{port} ({error.strerror}): choose another --port, or stop what "
                            f"listens there") from None


def serve(cfg: DictConfig) -> None:
    """Build the reward once here (its settings are checked, nothing loads), then serve it until interrupted."""
    check_server(cfg.server)
    check_port_free(cfg.server.host, cfg.server.port)
    reward = build(cfg.reward, "reward")
    server = OmegaConf.to_container(cfg.server, resolve=True)
    metadata = {"reward": reward.name, "output_range": list(reward.output_range),
                "differentiable": bool(reward.differentiable)}
    app = ls.LitServer(RewardAPI(OmegaConf.to_container(cfg.reward, resolve=True), server, cfg.threads),
                       accelerator=server["accelerator"], devices=server["devices"],
                       workers_per_device=server["workers_per_device"], timeout=server["timeout"],
                       max_payload_size=int(server["max_request_mb"] * 2 ** 20), model_metadata=metadata,
                       middlewares=[(PendingLimit, {"limit": server["max_pending"]})])
    print(f"serving reward {reward.name} at http://{server['host']}:{server['port']}/predict "
          f"(health: /health, info: /info)", flush=True)
    # SIGTERM (kill, scancel, docker stop) shuts down like Ctrl-C: LitServe then stops its API and worker processes,
    # which a plain SIGTERM to this process would leave running, still holding the port
    signal.signal(signal.SIGTERM, partial(interrupt, os.getpid()))
    app.run(host=server["host"], port=server["port"], generate_client_file=False, log_level="warning")
