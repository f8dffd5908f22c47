"""Write a preference-pairs file for `algo=dpo_offline` from the images of `ddpo sample` scored by a reward:

    ddpo sample model=tiny_shapes prompts=shapes_train reward=shapes_counting n=8 num_prompts=null
    python scripts/pairs_from_samples.py outputs/sample/<dir>/samples.jsonl     # -> <dir>/pairs.jsonl

Within each prompt the k-th best image is chosen over the k-th worst; ties make no pair (ddpo_cli/preferences.py)."""
from __future__ import annotations

import argparse

from ddpo_cli.preferences import pairs_from_samples

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", help="samples.jsonl written by ddpo sample with a reward")
    parser.add_argument("--out", default=None, help="pairs file (default: pairs.jsonl beside the samples)")
    args = parser.parse_args()
    print(pairs_from_samples(args.samples, args.out))
