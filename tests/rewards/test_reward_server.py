"""The reward server (`ddpo serve-reward`, LitServe) and its client (`reward=remote`): the wire format is exact and
refuses what is malformed; requests merged into one scoring call get their own results back; the bound on requests
in flight answers 503; a training run through a server that restarts mid-run loses nothing."""
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, TRAIN, ddpo, free_port, read_metrics
from ddpo_cli.errors import UserError
from ddpo_cli.images import to_uint8_hwc
from ddpo_cli.rewards.jpeg import JpegCompressibility
from ddpo_cli.rewards.remote import RemoteReward
from ddpo_cli.rewards.wire import WireError, decode_reply, decode_request, encode_reply, encode_request


def images(n: int = 3, side: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("image_format", ["png", "uint8"])
def test_images_travel_as_exactly_the_8_bit_pictures(image_format):
    batch = images()
    body = json.loads(json.dumps(encode_request(batch, ["a", "b", "c"], [{"n": 1}, {}, {}], image_format)))
    decoded, prompts, metadata = decode_request(body, max_images=8)
    expected = torch.from_numpy(to_uint8_hwc(batch)).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(decoded, expected) and prompts == ["a", "b", "c"] and metadata[0] == {"n": 1}


def png_of(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def request(*items, prompts=None) -> dict:
    return {"images": list(items), "prompts": prompts or ["p"] * len(items), "metadata": [{}] * len(items)}


RAW = {"uint8": base64.b64encode(bytes(12)).decode(), "shape": [2, 2, 3]}
MALFORMED = {
    "not an object": ([1, 2], "not a JSON object"),
    "lengths": (request(RAW, prompts=["a", "b"]), "1 images, 2 prompts and 1 metadata"),
    "none": (request(), "0 images in one request: send 1 to 4"),
    "too many": (request(*[RAW] * 5), "5 images in one request: send 1 to 4"),
    "not base64": (request({"png": "%%%"}), "image 0: not base64"),
    "bytes": (request({"uint8": RAW["uint8"], "shape": [2, 3, 3]}), "12 bytes for shape [2, 3, 3] (18 expected)"),
    "shape": (request({"uint8": RAW["uint8"], "shape": [2, 2, 4]}), "shape must be [H, W, 3]"),
    "keys": (request({"pickle": "gASV"}), "give {'png': base64} or"),
    "a jpeg": (request({"png": png_of(Image.new("RGB", (4, 4)), "JPEG")}), "a JPEG file, not a PNG"),
    "huge": (request({"png": png_of(Image.new("L", (5000, 1)))}), "5000x1 pixels, more than 4096 a side"),
    "broken": (request({"png": base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode()}), "not a readable PNG"),
    "sizes": (request(RAW, {"png": png_of(Image.new("RGB", (3, 3)))}), "images of different sizes"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_requests_are_refused_with_the_reason(case):
    body, reason = MALFORMED[case]
    with pytest.raises(WireError) as info:
        decode_request(body, max_images=4)
    assert reason in str(info.value) and "\n" not in str(info.value)


def test_replies_carry_non_finite_rewards_as_null_and_are_checked():
    reply = json.loads(json.dumps(encode_reply(torch.tensor([1.5, float("nan")]), {"kb": torch.tensor([1.0, 2.0])})))
    assert reply == {"rewards": [1.5, None], "info": {"kb": [1.0, 2.0]}}
    values, info = decode_reply(reply, 2)
    assert values[0] == 1.5 and values[1] != values[1] and info == {"kb": [1.0, 2.0]}
    for bad in ({"rewards": [1.0]}, {"rewards": ["x", 1]}, {"rewards": [True, 1]}, [1, 2], {"rewards": [1, 2],
                                                                                            "info": [1]}):
        with pytest.raises(WireError):
            decode_reply(bad, 2)


def test_merged_requests_get_their_own_results_back():
    pytest.importorskip("litserve")
    from ddpo_cli.reward_server import score_requests

    reward = JpegCompressibility()
    requests = [(images(2, 8, 1), ["a", "b"], [{}, {}]), (images(3, 16, 2), ["c"] * 3, [{}] * 3),
                (images(1, 8, 3), ["d"], [{}])]
    results = score_requests(reward, requests, batch_size=2)
    for (batch, prompts, metadata), (values, info) in zip(requests, results):
        alone, alone_info = reward(batch, prompts, metadata)
        assert values == alone.tolist() and info["jpeg_kb"] == alone_info["jpeg_kb"]


def test_requests_beyond_max_pending_get_503_at_once():
    pytest.importorskip("litserve")
    from ddpo_cli.reward_server import PendingLimit

    release, sent = asyncio.Event(), []

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def call(app, path="/predict"):
        async def send(message):
            if message["type"] == "http.response.start":
                sent.append((path, message["status"]))
        await app({"type": "http", "path": path}, None, send)

    async def scenario():
        app = PendingLimit(slow_app, limit=2)
        first = [asyncio.create_task(call(app)) for _ in range(2)]
        await asyncio.sleep(0.01)
        await call(app)                        # a third in flight: refused without waiting
        health = asyncio.create_task(call(app, "/health"))  # other paths are not counted
        await asyncio.sleep(0.01)
        assert sent == [("/predict", 503)] and app.pending == 2
        release.set()
        await asyncio.gather(*first, health)
        assert app.pending == 0

    asyncio.run(scenario())


def test_a_taken_port_is_one_line():
    pytest.importorskip("litserve")
    import socket

    from ddpo_cli.reward_server import check_port_free

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot serve on 127.0.0.1:{port} .*choose another --port"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # free again


def test_the_client_refuses_bad_settings_and_says_when_no_server_answers():
    with pytest.raises(UserError, match="reward.url='ftp://x'"):
        RemoteReward(url="ftp://x")
    with pytest.raises(UserError, match="reward.image_format='jpeg'"):
        RemoteReward(image_format="jpeg")
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"no reward server answers at http://127.0.0.1:\d+ .*ddpo serve-reward") as info:
        RemoteReward(url=f"http://127.0.0.1:{free_port()}", max_retries=1, backoff=0.01).setup("cpu")
    assert "\n" not in str(info.value) and time.perf_counter() - start < 5


# ------------------------------------------------------------------------------------ a real server, end to end
def start_server(port: int, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "ddpo_cli", "serve-reward", "reward=jpeg_compressibility", "--port", str(port),
               "threads=1", *overrides]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_healthy(port: int, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stdout.read()[-3000:]
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the reward server did not become healthy")


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.mark.slow
@pytest.mark.distributed
def test_training_through_a_server_that_restarts_mid_run_loses_nothing(tmp_path, cache_dir):
    port = free_port()
    server = start_server(port, "server.max_request_mb=1")
    try:
        wait_healthy(port, server)
        # the server refuses an oversized body (413) and a malformed one (400), and states its limit in /info
        oversized = json.dumps(request({"uint8": "A" * 2 ** 21, "shape": [1, 2, 3]})).encode()
        for body, code in ((oversized, 413), (json.dumps(request({"png": "%%"})).encode(), 400)):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=body,
                                                              headers={"Content-Type": "application/json"}))
            assert info.value.code == code
        served = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/info"))
        assert served["model"]["reward"] == "jpeg_compressibility" and served["server"]["max_payload_size"] == 2 ** 20

        remote_dir, local_dir = tmp_path / "remote", tmp_path / "local"
        restarted = []

        def restart_after_first_epoch():
            nonlocal server
            while not (remote_dir / "metrics.jsonl").exists():
                time.sleep(0.02)
            stop(server)
            restarted.append(time.monotonic())
            server = start_server(port, "server.max_request_mb=1")

        watcher = threading.Thread(target=restart_after_first_epoch, daemon=True)
        watcher.start()
        remote = ddpo("train", *TRAIN, "train.num_epochs=4", "reward=remote", f"reward.url=http://127.0.0.1:{port}",
                      "reward.images_per_request=3", "reward.backoff=0.5", f"hydra.run.dir={remote_dir}")
        watcher.join(timeout=60)
        assert remote.returncode == 0, remote.stderr[-3000:]
        assert restarted and "remote:jpeg_compressibility" in remote.stderr
        # one epoch waited for the new server (it takes seconds to start): the restart fell inside the run
        assert max(r["reward_seconds"] for r in read_metrics(remote_dir)) > 2
    finally:
        stop(server)
    local = ddpo("train", *TRAIN, "train.num_epochs=4", f"hydra.run.dir={local_dir}")
    assert local.returncode == 0, local.stderr[-3000:]
    # every epoch scored, the same numbers as in process, and so the same LoRA bit for bit
    assert [r["reward_mean"] for r in read_metrics(remote_dir)] == [r["reward_mean"] for r in read_metrics(local_dir)]
    lora = "checkpoints/epoch_0003/pytorch_lora_weights.safetensors"
    remote_weights, local_weights = load_file(remote_dir / lora), load_file(local_dir / lora)
    assert all(torch.equal(remote_weights[k], local_weights[k]) for k in local_weights)
