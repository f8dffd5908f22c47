"""Does the alignment score tell a right image from a nearly-right one? Plain BERTScore vs the inconsistency-aware one.

On the toy world, where captions are exact (``reward.backend=shapes``): for every one of the 48 prompts
"{count} {colour} {shape}[s]", a rendered image that is right and three that are wrong in one thing (count +-1,
another colour, another shape), ``--seeds`` renderings each. Each image is scored against the prompt with
``prompt_alignment`` as the paper has it (``inconsistency=none``: BERTScore recall) and with ``inconsistency=margin``
(recall minus the best recall of the prompt's minimal edits) and ``softmax``. The captioner words its sentence differently from
image to image, as a VLM does. Prints JSON: per kind of image the mean score; per kind of mistake the fraction of
(prompt, seed) pairs where the right image scores higher than the wrong one, the mean gap, and the AUC over all
pairs (any right image vs any wrong one, across prompts: what a batch-normalised advantage compares).

    python scripts/alignment_inconsistency.py --bertscore-model <folder of all-MiniLM-L6-v2> --layers 6
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpo_cli.rewards.alignment import PromptAlignment  # noqa: E402
from ddpo_cli.toyworld.render import COLOURS, SHAPES, all_combos, caption, metadata, render  # noqa: E402

KINDS = ("right", "count", "colour", "shape")


def variant(count: int, colour: str, shape: str, kind: str) -> tuple[int, str, str]:
    """The combo to draw for ``kind``: the prompt's own, or one thing changed (the next count / colour / shape)."""
    if kind == "count":
        return (count + 1 if count < 4 else count - 1, colour, shape)
    if kind == "colour":
        return (count, COLOURS[(COLOURS.index(colour) + 1) % len(COLOURS)], shape)
    if kind == "shape":
        return (count, colour, SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)])
    return (count, colour, shape)


def scores(reward: PromptAlignment, seeds: int) -> dict[str, torch.Tensor]:
    """Per kind: ``[48, seeds]`` scores of that kind of image against its prompt."""
    out = {}
    for kind in KINDS:
        images, prompts, metas = [], [], []
        for combo in all_combos():
            for seed in range(seeds):
                drawn = render(*variant(*combo, kind), seed=seed)
                images.append(torch.from_numpy(drawn).permute(2, 0, 1).float() / 255)
                prompts.append(caption(*combo))
                metas.append(metadata(*combo))
        values, _ = reward(torch.stack(images), prompts, metas)
        out[kind] = values.view(len(all_combos()), seeds)
    return out


def summary(values: dict[str, torch.Tensor]) -> dict:
    right = values["right"]
    return {"mean": {kind: round(float(v.mean()), 4) for kind, v in values.items()},
            "right_beats_wrong": {kind: round(float((right > values[kind]).float().mean()), 4) for kind in KINDS[1:]},
            "mean_gap": {kind: round(float((right - values[kind]).mean()), 4) for kind in KINDS[1:]},
            "auc": {kind: round(auc(right.flatten(), values[kind].flatten()), 4) for kind in KINDS[1:]}}


def auc(right: torch.Tensor, wrong: torch.Tensor) -> float:
    """P(a random right image scores above a random wrong one), ties counting half."""
    difference = right[:, None] - wrong[None, :]
    return float((difference > 0).float().mean() + 0.5 * (difference == 0).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bertscore-model", required=True, help="hub id or local folder of the BERTScore model")
    parser.add_argument("--layers", type=int, default=None, help="its layer (needed for a local folder)")
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    common = dict(backend="shapes", bertscore_model=args.bertscore_model, bertscore_num_layers=args.layers,
                  edit_objects=SHAPES, edit_colours=COLOURS)
    result = {"images": len(all_combos()) * args.seeds * len(KINDS), "bertscore_model": args.bertscore_model}
    for mode in ("none", "margin", "softmax"):
        reward = PromptAlignment(inconsistency=mode, **common).setup("cpu")
        result[mode] = summary(scores(reward, args.seeds))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
