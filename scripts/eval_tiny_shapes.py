"""Measure how well a toy-world pipeline draws what its prompt asks, with the deterministic detector.

Generates ``--n`` images per prompt of the training and held-out prompt sets (DDIM, eta 1 by default, as RL samples)
and prints JSON: for each set the accuracy of colour / shape (majority of detected objects), count (number of
objects) and exact (exactly n objects, all of the right colour and shape), the mean ShapesCounting reward, and the
same numbers per count.

    python scripts/eval_tiny_shapes.py --model ddpo_cli/assets/tiny_shapes --n 8 --out outputs/tiny_shapes_eval.json
    python scripts/eval_tiny_shapes.py --model ddpo_cli/assets/tiny_shapes --lora outputs/run/checkpoints/...  # after RL
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpo_cli.rewards.shapes_counting import ShapesCounting  # noqa: E402
from ddpo_cli.toyworld.prompts import shapes_heldout, shapes_train  # noqa: E402

KEYS = ("colour_correct", "shape_correct", "count_correct", "exact")


def load_pipeline(model: str, lora: str | None):
    """Plain ``StableDiffusionPipeline.from_pretrained`` with a DDIM scheduler (and a LoRA adapter if given)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if lora:
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def evaluate(draw, prompt_set, n: int, seed: int, batch: int = 64) -> dict:
    """``n`` images per prompt of ``prompt_set``, drawn by ``draw(prompts, generator) -> [b, 3, H, W]`` in [0, 1] (one
    generator seeded ``seed + start`` per chunk), summarised by the detector (overall and per count)."""
    reward = ShapesCounting().setup("cpu")
    items = [item for item in prompt_set.items for _ in range(n)]
    rows = []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        prompts, metas = [p for p, _ in chunk], [m for _, m in chunk]
        images = draw(prompts, torch.Generator().manual_seed(seed + start))
        rewards, info = reward(images, prompts, metas)
        rows += [{"count": m["count"], "reward": r, **{k: float(info[k][i]) for k in KEYS}}
                 for i, (m, r) in enumerate(zip(metas, rewards.tolist()))]
    return {"images": len(rows), **summary(rows),
            "per_count": {str(c): summary([r for r in rows if r["count"] == c])
                          for c in sorted({r["count"] for r in rows})}}


def summary(rows: list[dict]) -> dict:
    """Mean of each accuracy key and of the reward over ``rows``."""
    out = {key: round(float(np.mean([r[key] for r in rows])), 4) for key in KEYS}
    out["reward"] = round(float(np.mean([r["reward"] for r in rows])), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "ddpo_cli" / "assets" / "tiny_shapes"))
    parser.add_argument("--lora", default=None, help="optional LoRA weights (diffusers format) to load on top")
    parser.add_argument("--n", type=int, default=8, help="images per prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, args.lora)
    settings = {k: getattr(args, k) for k in ("model", "lora", "n", "steps", "guidance", "eta", "seed")}

    def draw(prompts, generator):
        return pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
                    output_type="pt", generator=generator).images

    result = {"settings": settings, "train": evaluate(draw, shapes_train(), args.n, args.seed),
              "heldout": evaluate(draw, shapes_heldout(), args.n, args.seed)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
