#!/usr/bin/env python
"""Throughput of a reward behind `ddpo serve-reward` on 127.0.0.1 against the same reward in process (prints one JSON
object; numbers, not pass/fail). Both sides score the same images with one torch thread, in one run:

    python scripts/benchmark_reward_server.py [--images 128] [--side 256] [--rounds 3]

Rewards: JPEG compressibility, and the aesthetic predictor on tiny random weights (an open_clip CLIP of one layer
with 768-dim embeddings and a random MLP, built here): its CLIP preprocessing and MLP run for real, its transformer
is small, so the numbers show the serving overhead rather than ViT-L/14's cost.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ddpo_cli.config import build, compose  # noqa: E402
from ddpo_cli.rewards.aesthetic import AestheticMLP  # noqa: E402
from ddpo_cli.rewards.remote import RemoteReward  # noqa: E402

TINY_CLIP = {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32,
                                              "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def tiny_aesthetic(root: Path) -> list[str]:
    """The overrides of `reward=aesthetic` on tiny random weights saved under ``root``."""
    from open_clip.model import CLIP

    torch.manual_seed(0)
    (root / "clip").mkdir()
    (root / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    torch.save(CLIP(**TINY_CLIP).state_dict(), root / "clip" / "open_clip_pytorch_model.bin")
    torch.save(AestheticMLP().state_dict(), root / "mlp.pth")
    return ["reward=aesthetic", f"reward.model_name=local-dir:{root / 'clip'}", "reward.pretrained=null",
            f"reward.weights_path={root / 'mlp.pth'}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images_of(n: int, side: int) -> torch.Tensor:
    coarse = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False).clamp(0, 1)


def rate(score, images: torch.Tensor, rounds: int) -> float:
    n = images.shape[0]
    prompts, metadata = ["a photo"] * n, [{}] * n
    score(images[:4], prompts[:4], metadata[:4])  # warm-up
    start = time.perf_counter()
    for _ in range(rounds):
        score(images, prompts, metadata)
    return round(n * rounds / (time.perf_counter() - start), 1)


def served_rate(overrides: list[str], images: torch.Tensor, rounds: int, image_format: str) -> float:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "ddpo_cli", "serve-reward", *overrides, "--port", str(port),
                               "threads=1", "server.max_batch_requests=4"], cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        client = RemoteReward(url=f"http://127.0.0.1:{port}", image_format=image_format, images_per_request=16,
                              concurrency=4).setup("cpu")
        return rate(client, images, rounds)
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = images_of(args.images, args.side)
    result = {"images": args.images, "side": args.side, "rounds": args.rounds, "torch_threads": 1,
              "client": "reward=remote, 16 images per request, 4 in flight",
              "server": "1 worker on the CPU, up to 4 requests merged", "images_per_second": {}}
    with tempfile.TemporaryDirectory() as root:
        for name, overrides in (("jpeg_compressibility", ["reward=jpeg_compressibility"]),
                                ("aesthetic (tiny weights)", tiny_aesthetic(Path(root)))):
            local = build(compose("train", overrides).reward, "reward").setup("cpu")
            result["images_per_second"][name] = {
                "in process": rate(local, images, args.rounds),
                "server, png": served_rate(overrides, images, args.rounds, "png"),
                "server, uint8": served_rate(overrides, images, args.rounds, "uint8")}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
