#!/usr/bin/env python
"""Reward hacking on the toy world, with and without the monitor that stops it (docs/monitoring.md).

Runs `ddpo train experiment=hacking_demo` twice with the same seed: once as shipped (the gold reward's rule and
checkpoint.best_by), once with monitor.stop_when=[] checkpoint.best_by=null (the monitors still measure, so the
gold curve can be drawn, but nothing acts). Prints one JSON object and draws both runs' trained reward and gold
reward into docs/images/hacking_demo.png:

    python scripts/hacking_demo.py [--out outputs/hacking_demo] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ddpo_cli.report import read_metrics  # noqa: E402


def train(run_dir: Path, seed: int, *overrides: str) -> list[dict]:
    command = [sys.executable, "-m", "ddpo_cli", "train", "experiment=hacking_demo", f"seed={seed}",
               "log.tracker=none", f"hydra.run.dir={run_dir}", *overrides]
    subprocess.run(command, check=True, cwd=REPO)
    return read_metrics(run_dir)


def checks(rows: list[dict]) -> list[dict]:
    return [{"epoch": r["epoch"], "trained_reward": r["reward_mean"], "gold_reward": r["monitor"]["gold_reward"],
             "dark_fraction": r["monitor"]["dark_fraction"], "jpeg_kb": r["monitor"]["jpeg_kb"]}
            for r in rows if "monitor" in r]


def plot(monitored: list[dict], unmonitored: list[dict], stop_epoch, best_epoch, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, title in ((axes[0], "trained_reward", "trained reward: -JPEG kB (epoch batches)"),
                           (axes[1], "gold_reward", "gold reward: shape counter (fixed prompts, seeds)")):
        for series, label, style in ((unmonitored, "no rule", "--"), (monitored, "monitor.stop_when", "-")):
            ax.plot([c["epoch"] for c in series], [c[key] for c in series], style, marker="o", markersize=3,
                    label=label)
        if stop_epoch is not None:
            ax.axvline(stop_epoch, color="tab:red", linewidth=1, label=f"rule fired (epoch {stop_epoch})")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="tab:green", linestyle=":", linewidth=1.5,
                       label=f"checkpoints/best (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "hacking_demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    monitored_rows = train(args.out / "monitored", args.seed)
    unmonitored_rows = train(args.out / "unmonitored", args.seed, "monitor.stop_when=[]", "checkpoint.best_by=null")
    monitored, unmonitored = checks(monitored_rows), checks(unmonitored_rows)
    stop = next((r["epoch"] for r in monitored_rows if "monitor_stop" in r), None)
    best = next((r["epoch"] for r in reversed(monitored_rows) if r.get("monitor_best")), None)
    plot(monitored, unmonitored, stop, best, REPO / "docs" / "images" / "hacking_demo.png")
    print(json.dumps({"seed": args.seed, "stopped_at_epoch": stop, "stop_line": next(
        (r["monitor_stop"] for r in monitored_rows if "monitor_stop" in r), None), "best_epoch": best,
        "monitored": monitored, "unmonitored": unmonitored}, indent=1))


if __name__ == "__main__":
    main()
