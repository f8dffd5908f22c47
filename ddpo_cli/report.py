"""Run outputs: metrics.jsonl, captioned image grids, the reward curve, the start-up table and the console lines."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .images import to_uint8_hwc

METRICS_FILE = "metrics.jsonl"
console = Console(stderr=True, soft_wrap=True)  # the commands' messages; long lines (paths) stay greppable


def warn(message: str) -> None:
    """``warning: <message>`` on the console, verbatim (no rich markup)."""
    console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl``; a line that is not a JSON object (cut short by a full disk or a kill) is
    skipped, so the run stays resumable and readable."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows.append(row)
    return rows


def metrics_row(epoch: int, global_step: int, lr: float, rewards: np.ndarray, metrics: dict, timings: dict,
                info: dict) -> dict:
    """The epoch's line of metrics.jsonl (``rewards``: everyone's, non-finite ones when dropped included; ``info``:
    the reward's per-image extras)."""
    finite = rewards[np.isfinite(rewards)]
    return {"epoch": epoch, "global_step": global_step, "lr": lr, "reward_mean": float(finite.mean()),
            "reward_std": float(finite.std()), **metrics, "samples": int(rewards.size),
            "nonfinite_rewards": int(rewards.size - finite.size), **timings,
            **{f"reward_info/{k}": v for k, v in numeric_means(info).items()}}


def print_resumed(path: Path, skipped: list[str], start_epoch: int, global_step: int, superseded: Path | None) -> None:
    """What a resume did: the newer checkpoints it skipped as unreadable, where it continues, what it moved aside."""
    for line in skipped:
        console.print(f"[yellow]skipped an unreadable checkpoint: {escape(line)}[/]", highlight=False)
    console.print(f"[green]resumed from {path}: epoch {start_epoch}, global step {global_step}[/]")
    if superseded:
        console.print(f"[yellow]later checkpoints and metrics of this run moved to {superseded}[/]")


def monitor_history(run_dir: Path) -> list[dict]:
    """The monitors' checks of the epochs in ``metrics.jsonl``, oldest first."""
    return [row["monitor"] for row in read_metrics(run_dir) if "monitor" in row]


def truncate_metrics(run_dir: Path, before_epoch: int, keep_dropped_in: Path | None = None) -> None:
    """Keep only epochs < ``before_epoch`` (a resumed run rewrites what came after its checkpoint); the dropped rows
    go to ``keep_dropped_in/metrics.jsonl`` when given (resuming from an older checkpoint loses nothing)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    rows = read_metrics(run_dir)
    dropped = [row for row in rows if row["epoch"] >= before_epoch]
    if dropped and keep_dropped_in is not None:
        (Path(keep_dropped_in) / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in dropped))
    path.write_text("".join(json.dumps(row) + "\n" for row in rows if row["epoch"] < before_epoch))


def append_metrics(run_dir: Path, row: dict) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def shown_prompt(prompt: str) -> str:
    """A prompt as captions show it: the empty prompt (unconditional sampling) as "(no prompt)"."""
    return prompt or "(no prompt)"


def image_grid(images: torch.Tensor, captions: list[str], columns: int | None = None,
               min_cell: int = 128) -> Image.Image:
    """``[N,3,H,W]`` in [0,1] -> one PIL grid, each cell upscaled to at least ``min_cell`` px with a caption below."""
    n = images.shape[0]
    columns = columns or min(n, max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / columns)
    side = max(min_cell, images.shape[-1])
    caption_height = 24
    font = ImageFont.load_default()
    grid = Image.new("RGB", (columns * side, rows * (side + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (array, caption) in enumerate(zip(to_uint8_hwc(images), captions)):
        x, y = (i % columns) * side, (i // columns) * (side + caption_height)
        grid.paste(Image.fromarray(array).resize((side, side), Image.NEAREST), (x, y))
        for line_no, line in enumerate(_wrap(caption, side)[:2]):
            draw.text((x + 2, y + side + 1 + 11 * line_no), line, fill="black", font=font)
    return grid


def epoch_grid(images: torch.Tensor, prompts: list[str], rewards: list[float]) -> Image.Image:
    """An epoch's first images ``[n,3,H,W]`` captioned ``prompt | reward``."""
    captions = [f"{shown_prompt(p)} | {r:.2f}" for p, r in zip(prompts[: len(images)], rewards[: len(images)])]
    return image_grid(images, captions)


def _wrap(text: str, width_px: int, char_px: int = 6) -> list[str]:
    limit = max(4, width_px // char_px)
    lines, current = [], ""
    for word in text.split():
        if len(current) + len(word) + 1 > limit and current:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return lines + ([current] if current else [])


def smoothed(values, window: int = 5) -> np.ndarray:
    """Trailing moving average over up to ``window`` values (the first points average what exists so far)."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def paired_series(rows: list[dict], metric: str) -> dict[str, dict[str, np.ndarray]]:
    """Per probe set: the epochs measured and the base, policy, gain and gain_se of ``metric`` there."""
    series: dict[str, dict[str, list]] = {}
    for row in rows:
        for name, keys in row.get("paired", {}).items():
            if metric in keys:
                entry = series.setdefault(name, {"epoch": [], "base": [], "policy": [], "gain": [], "gain_se": []})
                entry["epoch"].append(row["epoch"])
                for field in ("base", "policy", "gain", "gain_se"):
                    entry[field].append(keys[metric][field])
    return {name: {k: np.asarray(v, dtype=np.float64) for k, v in entry.items()} for name, entry in series.items()}


def draw_monitors(ax, checks: list[dict], base: dict) -> None:
    """Each monitored value over the checks as a multiple of the base model's (1 = unchanged)."""
    epochs = [r["epoch"] for r in checks]
    for key in sorted(k for k in base if base[k]):
        ax.plot(epochs, [r["monitor"].get(key, np.nan) / base[key] for r in checks], marker="o", markersize=3,
                label=key)
    for r in checks:
        if r.get("monitor_best"):
            ax.axvline(r["epoch"], color="tab:green", linestyle=":", linewidth=1)
        if "monitor_stop" in r:
            ax.axvline(r["epoch"], color="tab:red", linestyle="--", linewidth=1, label="stopped by a rule")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("value / base model's")
    ax.set_title("monitors (dotted: a new best checkpoint)", fontsize=10)
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3)


def plot_reward_curve(run_dir: Path, path: Path | None = None, metric: str = "reward") -> Path | None:
    """reward_curve.png from metrics.jsonl: each epoch's reward (its own fresh noise; the band is +- std) with a
    5-epoch moving average; when the run measures it (``log.paired``), ``metric`` of the policy against the base
    model on the same fixed prompts and noise (the band is +- the paired gain's standard error); and when monitors
    ran, their values relative to the base model's, with the epoch a rule stopped the run and the best check."""
    rows = read_metrics(run_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paired = paired_series(rows, metric)
    checks = [r for r in rows if "monitor" in r]
    base_path = Path(run_dir) / "monitor_base.json"
    base = json.loads(base_path.read_text()) if base_path.exists() else {}
    panels = 1 + bool(paired) + bool(checks and base)
    epochs = np.array([r["epoch"] for r in rows])
    mean = np.array([r["reward_mean"] for r in rows])
    std = np.array([r["reward_std"] for r in rows])
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(epochs, mean, marker="o", markersize=2.5, linewidth=0.8, alpha=0.5, label="each epoch (fresh noise)")
    ax.fill_between(epochs, mean - std, mean + std, alpha=0.12)
    ax.plot(epochs, smoothed(mean), linewidth=2, label="moving average (5 epochs)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reward (mean +- std)")
    ax.set_title("training batches", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    if paired:
        ax = axes[0][1]
        for (name, entry), colour in zip(paired.items(), ("tab:blue", "tab:green", "tab:purple")):
            se = entry["gain_se"]
            ax.plot(entry["epoch"], entry["policy"], marker="o", markersize=3, color=colour,
                    label=f"{name} prompts: policy")
            ax.fill_between(entry["epoch"], entry["policy"] - se, entry["policy"] + se, color=colour, alpha=0.15)
            ax.axhline(entry["base"][0], color=colour, linestyle="--", linewidth=1,
                       label=f"{name} prompts: base model")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title("policy vs base: same fixed prompts and noise (band: paired s.e.)", fontsize=10)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    if checks and base:
        draw_monitors(axes[0][-1], checks, base)
    fig.tight_layout()
    path = path or Path(run_dir) / "reward_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def flat_config(cfg) -> dict:
    """A config as flat ``{"a.b": value}`` (non-scalars as strings), for experiment trackers."""
    flat = {}

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk(OmegaConf.to_container(cfg, resolve=True))
    return flat


def epoch_progress(console, enabled: bool):
    """A rich progress bar over epochs (hidden when not on a terminal or not the main process)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
                    TimeRemainingColumn(), console=console, disable=not (console.is_terminal and enabled))


def epoch_line(row: dict, metric: str = "reward") -> str:
    """One console line per epoch: reward, the paired measure when taken, the update's diagnostics, the time."""
    shown = [f"{key} {row[key]:.3g}" for key in ("loss", "approx_kl", "clipfrac", "kl_to_base", "kl_penalty")
             if isinstance(row.get(key), float)]
    paired = [f"{name} {keys[metric]['base']:.3g} -> {keys[metric]['policy']:.3g}"
              for name, keys in row.get("paired", {}).items() if metric in keys]
    paired = [f"paired {metric}: {', '.join(paired)}"] if paired else []
    probe_time = f", paired {row['paired_seconds']:.1f}" if "paired_seconds" in row else ""
    return (f"epoch {row['epoch']:4d} | reward {row['reward_mean']:.4f} +- {row['reward_std']:.4f} | "
            f"{' | '.join(paired + shown)} | {row['epoch_seconds']:.1f}s (sample {row['sample_seconds']:.1f}, "
            f"reward wait {row['reward_seconds']:.1f}, train {row['train_seconds']:.1f}{probe_time})")


def tracker_values(row: dict) -> dict[str, float]:
    """A metrics row as flat numbers for TensorBoard / W&B (``paired/<set>/<key>/<base|policy|gain|gain_se>``)."""
    values = {k: v for k, v in row.items() if isinstance(v, (int, float))}
    values.update({f"monitor/{key}": v for key, v in row.get("monitor", {}).items()})
    for name, keys in row.get("paired", {}).items():
        for key, fields in keys.items():
            values.update({f"paired/{name}/{key}/{field}": v for field, v in fields.items()})
    return values


def loading_hint(checkpoints: Path) -> str:
    """How diffusers loads the run's checkpoints: the LoRA file, or full fine-tuning's denoiser folder."""
    full = next((d.name for d in sorted(Path(checkpoints).glob("*/*")) if d.name in ("unet", "transformer")
                 and d.is_dir()), None)
    return f"full weights: from_pretrained(<checkpoint>/{full})" if full else \
        "LoRA: pipe.load_lora_weights(<checkpoint>)"


def run_summary(run_dir: Path, metric: str = "reward", heldout: str | None = None, sampler: str | None = None,
                best_by: str | None = None) -> str:
    """What the run did and what to run next: the paired measure (base -> last, paired gain +- standard error, the
    ``sampler`` it was drawn with) when taken, a monitor's stop and the best checkpoint by ``best_by``, where the
    outputs are, and the exact ``ddpo eval`` / ``ddpo sample`` commands."""
    rows = read_metrics(run_dir)
    run = escape(str(run_dir))
    lines = ["", f"[bold]done:[/] {len(rows)} epochs in {run}"]
    stop = next((row for row in reversed(rows) if "monitor_stop" in row), None)
    if stop is not None and stop is rows[-1]:
        lines.append(f"[yellow]epoch {stop['epoch']}: {escape(stop['monitor_stop'])}[/]")
    best = next((row for row in reversed(rows) if row.get("monitor_best")), None)
    if best_by and best is not None:
        lines.append(f"[bold]best by {best_by}:[/] {Path(run) / 'checkpoints' / 'best'} (epoch {best['epoch']}, "
                     f"{best_by} {best['monitor'][best_by]:.4g})")
    last_paired = next((row for row in reversed(rows) if "paired" in row), None)
    if last_paired is not None:
        lines.append(f"[bold]paired {metric}[/] (the same fixed prompts and noise; base = the model before training, "
                     f"epoch {last_paired['epoch']}):")
        for name, keys in last_paired["paired"].items():
            if metric in keys:
                k = keys[metric]
                lines.append(f"  {name + ' prompts:':<20} base {k['base']:.4g} -> {k['policy']:.4g}   "
                             f"gain {k['gain']:+.4g} ± {k['gain_se']:.2g} (paired s.e.)")
        if sampler:
            lines.append(f"  {'sampled with:':<20} {escape(sampler)}")
    elif rows:
        first, last = rows[: min(5, len(rows))], rows[-min(5, len(rows)):]
        lines.append(f"reward of the training batches (fresh noise each epoch): first epochs "
                     f"{np.mean([r['reward_mean'] for r in first]):.4g}, last epochs "
                     f"{np.mean([r['reward_mean'] for r in last]):.4g} (log.paired.every>0 measures a paired gain)")
    lines += [f"  curve:        {Path(run) / 'reward_curve.png'}",
              f"  grids:        {Path(run) / 'images'}",
              f"  checkpoints:  {Path(run) / 'checkpoints'}   ({loading_hint(Path(run_dir) / 'checkpoints')})",
              "next:",
              f"  ddpo eval run={run}" + (f"\n  ddpo eval run={run} prompts={heldout}" if heldout else ""),
              f"  ddpo sample run={run} n=4"]
    return "\n".join(lines)


def startup_table(title: str, rows: list[tuple[str, str]]):
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def merge_info(infos: list[dict]) -> dict[str, list]:
    """Per-batch reward info dicts -> one dict of per-image lists (tensors become plain lists)."""
    merged: dict[str, list] = {}
    for info in infos:
        for key, values in info.items():
            merged.setdefault(key, []).extend(values.tolist() if torch.is_tensor(values) else list(values))
    return merged


def numeric_columns(info: dict) -> dict[str, np.ndarray]:
    """The per-image numeric lists of a reward's info as float arrays (text and other values are skipped)."""
    out = {}
    for key, values in info.items():
        try:
            array = np.asarray(values.detach().cpu() if torch.is_tensor(values) else values, dtype=np.float64)
        except (TypeError, ValueError):
            continue
        if array.ndim == 1 and array.size:
            out[key] = array
    return out


def numeric_means(info: dict) -> dict[str, float]:
    """Per-image numeric lists in a reward's info -> their means (for metrics.jsonl)."""
    return {key: float(array.mean()) for key, array in numeric_columns(info).items()}


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table (cells converted with ``str``; ``|`` escaped)."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(row) for row in rows)])


def plot_curves(curves: dict[str, tuple[list, list]], path: Path, ylabel: str = "reward (mean)",
                xlabel: str = "epoch") -> Path:
    """Several ``label -> (x, values)`` curves in one PNG (e.g. the reward curves of a sweep's jobs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(curves) > 10  # then distinct colours from a 20-colour map and the legend beside the axes
    fig, ax = plt.subplots(figsize=(11, 4.5) if many else (7, 4))
    colours = plt.get_cmap("tab20").colors
    for i, (label, (epochs, values)) in enumerate(curves.items()):
        ax.plot(epochs, values, marker="o", markersize=3, label=label, color=colours[i % 20] if many else None,
                linestyle=("-", "--", ":")[i // 20 % 3] if many else "-")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5)) if many else \
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
