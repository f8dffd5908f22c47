"""``ddpo eval sweep=<multirun dir>``: one table and one plot over all jobs of a ``ddpo train -m`` sweep.

Each job folder holds ``.hydra/config.yaml``, ``.hydra/overrides.yaml`` and ``metrics.jsonl``. The summary is written
into the multirun dir: ``sweep_summary.md`` (table + plot), ``sweep_summary.json`` and ``sweep_rewards.png``.
Jobs that differ only in ``seed`` are pooled into one configuration (mean +- standard error over seeds), and the
reward-vs-queries / reward-vs-wall-time plots then draw one mean curve per configuration. If the sweep includes
``algo=baseline`` (no updates; same prompts and noise per seed), every configuration is also compared with it seed by
seed, which removes the luck of the prompt draw from the comparison.
"""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from . import report
from .runs import job_overrides, sweep_job_dirs
from .stats import mean_se


def job_summary(job: Path) -> dict:
    """Overrides, epochs, final and best training reward of one job (rewards None if it logged no epoch)."""
    rows = report.read_metrics(job)
    rewards = [row["reward_mean"] for row in rows]
    best = max(range(len(rows)), key=lambda i: rewards[i]) if rows else None
    return {"job": job.name, "overrides": job_overrides(job), "epochs": len(rows),
            "final_reward": rewards[-1] if rows else None,
            "best_reward": rewards[best] if rows else None,
            "best_epoch": rows[best]["epoch"] if rows else None,
            "curve": {"epochs": [row["epoch"] for row in rows], "reward_mean": rewards,
                      "reward_queries": cumulative([row["samples"] for row in rows]),
                      "wall_seconds": cumulative([row["epoch_seconds"] for row in rows])}}


def cumulative(values: list[float]) -> list[float]:
    """Running totals: reward queries (samples) or wall-clock seconds spent up to the end of each epoch."""
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


def varying_overrides(all_overrides: list[list[str]]) -> list[list[str]]:
    """Keep the overrides that differ between jobs (what the sweep swept); all of them for a single job."""
    if len(all_overrides) < 2:
        return all_overrides
    shared = set.intersection(*(set(o) for o in all_overrides))
    return [[o for o in overrides if o not in shared] for overrides in all_overrides]


def without_seed(label: str) -> str:
    """A job label with its ``seed=...`` override removed: jobs that differ only in the seed share it."""
    return " ".join(o for o in label.split() if not o.startswith("seed=")) or "(all jobs)"


def seed_of(label: str) -> str | None:
    return next((o.split("=", 1)[1] for o in label.split() if o.startswith("seed=")), None)


def edge_epochs(rewards: list[float], k: int = 3) -> int:
    """How many epochs at each end to average: k, fewer for runs shorter than 2k epochs, at least 1."""
    return max(1, min(k, len(rewards) // 2))


def late_mean(rewards: list[float], k: int = 3) -> float:
    """Mean training reward of the last k epochs (k shrinks for short runs)."""
    k = edge_epochs(rewards, k)
    return sum(rewards[-k:]) / k


def gain(rewards: list[float], k: int = 3) -> float:
    """Mean training reward of the last k epochs minus that of the first k (k shrinks for short runs)."""
    k = edge_epochs(rewards, k)
    return late_mean(rewards, k) - sum(rewards[:k]) / k


def versus_baseline(pooled: list[dict], groups: dict[str, list[dict]]) -> None:
    """With an ``algo=baseline`` configuration in the sweep, add to every configuration its last-epochs reward minus
    the baseline's, paired seed by seed (same prompts and noise), as ``vs_baseline`` / ``vs_baseline_se``."""
    controls = [config for config in groups if "algo=baseline" in config.split()]
    if len(controls) != 1:
        return
    control = {seed_of(j["label"]): late_mean(j["curve"]["reward_mean"]) for j in groups[controls[0]]}
    for entry in pooled:
        diffs = [late_mean(j["curve"]["reward_mean"]) - control[seed_of(j["label"])]
                 for j in groups[entry["config"]] if seed_of(j["label"]) in control]
        if diffs:
            paired = mean_se(diffs)
            entry["vs_baseline"], entry["vs_baseline_se"] = paired["mean"], paired["se"]


def pool_seeds(jobs: list[dict]) -> list[dict]:
    """One entry per configuration (jobs differing only in ``seed``): final reward and gain as mean +- s.e. over
    seeds, and the mean curve over the epochs every seed reached."""
    groups: dict[str, list[dict]] = {}
    for job in jobs:
        if job["epochs"]:
            groups.setdefault(without_seed(job["label"]), []).append(job)
    pooled = []
    for config, members in groups.items():
        epochs = min(j["epochs"] for j in members)
        curve = {key: [sum(j["curve"][key][i] for j in members) / len(members) for i in range(epochs)]
                 for key in ("epochs", "reward_mean", "reward_queries", "wall_seconds")}
        final = mean_se([j["final_reward"] for j in members])
        change = mean_se([gain(j["curve"]["reward_mean"]) for j in members])
        pooled.append({"config": config, "seeds": len(members), "final_reward": final["mean"],
                       "final_reward_se": final["se"], "gain": change["mean"], "gain_se": change["se"],
                       "curve": curve})
    versus_baseline(pooled, groups)
    return pooled


def _pm(mean: float, se: float, signed: bool = False) -> str:
    return (f"{mean:+.4f}" if signed else f"{mean:.4f}") + f" +- {se:.4f}"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def summarise_sweep(sweep_dir: Path) -> dict:
    """Write the sweep summary into ``sweep_dir``; returns the summary (as in ``sweep_summary.json``)."""
    sweep_dir = Path(sweep_dir).expanduser()
    jobs = [job_summary(job) for job in sweep_job_dirs(sweep_dir)]
    labels = [" ".join(o) or job["job"] for o, job in zip(varying_overrides([j["overrides"] for j in jobs]), jobs)]
    for job, label in zip(jobs, labels):
        job["label"] = label
    done = [j for j in jobs if j["epochs"]]
    plot = report.plot_curves({j["label"]: (j["curve"]["epochs"], j["curve"]["reward_mean"]) for j in done},
                              sweep_dir / "sweep_rewards.png", ylabel="training reward (mean per epoch)")
    pooled = pool_seeds(jobs)
    by_seed_mean = any(p["seeds"] > 1 for p in pooled)
    lines = [(p["config"] + (f" ({p['seeds']} seeds)" if by_seed_mean else ""), p["curve"]) for p in pooled] \
        if by_seed_mean else [(j["label"], j["curve"]) for j in done]
    for x, xlabel in (("reward_queries", "reward queries (samples scored)"), ("wall_seconds", "wall time (s)")):
        report.plot_curves({label: (curve[x], curve["reward_mean"]) for label, curve in lines},
                           sweep_dir / f"sweep_rewards_vs_{x}.png",
                           ylabel="training reward" + (" (mean over seeds)" if by_seed_mean else " (mean per epoch)"),
                           xlabel=xlabel)
    finished = [j for j in jobs if j["best_reward"] is not None]
    best = max(finished, key=lambda j: j["final_reward"])["job"] if finished else None
    summary = {"sweep_dir": str(sweep_dir), "jobs": jobs, "configs": pooled, "best_job_by_final_reward": best,
               "plot": plot.name}
    (sweep_dir / "sweep_summary.json").write_text(json.dumps(summary, indent=2))
    rows = [[j["job"], j["label"], j["epochs"], _fmt(j["final_reward"]), f"{_fmt(j['best_reward'])} "
             f"(epoch {j['best_epoch']})" if j["epochs"] else "-"] for j in jobs]
    table = report.markdown_table(["job", "overrides", "epochs", "final training reward", "best training reward"], rows)
    pooled_rows = [[p["config"], p["seeds"], _pm(p["final_reward"], p["final_reward_se"]),
                    _pm(p["gain"], p["gain_se"], signed=True),
                    _pm(p["vs_baseline"], p["vs_baseline_se"], signed=True) if "vs_baseline" in p else "-"]
                   for p in pooled]
    pooled_table = report.markdown_table(
        ["configuration", "seeds", "final training reward", "gain (last 3 - first 3 epochs)",
         "last 3 epochs vs algo=baseline (paired by seed)"], pooled_rows)
    (sweep_dir / "sweep_summary.md").write_text(
        f"# Sweep summary: {sweep_dir}\n\n{table}\n\nBest final training reward: {best or '-'}\n\n"
        f"## Per configuration (seeds pooled: mean +- standard error)\n\n{pooled_table}\n\n"
        f"![training reward curves]({plot.name})\n\n![against reward queries](sweep_rewards_vs_reward_queries.png)"
        f"\n\n![against wall time](sweep_rewards_vs_wall_seconds.png)\n")
    return summary


def sweep_task(cfg) -> None:
    """Hydra task of ``ddpo eval sweep=<multirun dir>``."""
    summary = summarise_sweep(Path(cfg.sweep))
    Console(stderr=True).print(f"[green]{len(summary['jobs'])} jobs summarised in "
                               f"{Path(cfg.sweep) / 'sweep_summary.md'}[/]")
