"""Write a preference-pairs file from the toy world, for `algo=dpo_offline` on `model=tiny_shapes`:

    python scripts/toy_preference_pairs.py outputs/toy_pairs --n 512
    ddpo train model=tiny_shapes prompts=shapes_train reward=shapes_counting algo=dpo_offline \
        algo.pairs_file=outputs/toy_pairs/pairs.jsonl

Chosen = the caption's count, rejected = the same colour and shape in another count (ddpo_cli/toyworld)."""
from __future__ import annotations

import argparse

from ddpo_cli.toyworld.preference_pairs import write_preference_pairs

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--n", type=int, default=512, help="pairs to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_preference_pairs(args.folder, args.n, args.seed))
