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


SIDE_MEASURES = ("gold_reward", "diversity_pixels")   # from the monitors' last check, beside the trained reward
BUDGETS = (0.25, 0.5, 1.0)                          # fractions of a job's reward queries the budget table reads
CONTROL = "advantage.shuffle=true"                  # the override that makes a job its configuration's control


def job_summary(job: Path) -> dict:
    """Overrides, epochs, final and best training reward of one job (rewards None if it logged no epoch), and the
    monitors' last values of :data:`SIDE_MEASURES` (None if not measured)."""
    rows = report.read_metrics(job)
    rewards = [row["reward_mean"] for row in rows]
    best = max(range(len(rows)), key=lambda i: rewards[i]) if rows else None
    checks = [row["monitor"] for row in rows if "monitor" in row]
    return {"job": job.name, "overrides": [command_line_spelling(o) for o in job_overrides(job)], "epochs": len(rows),
            "final_reward": rewards[-1] if rows else None,
            "best_reward": rewards[best] if rows else None,
            "best_epoch": rows[best]["epoch"] if rows else None,
            **{key: checks[-1].get(key) if checks else None for key in SIDE_MEASURES},
            "curve": {"epochs": [row["epoch"] for row in rows], "reward_mean": rewards,
                      "reward_queries": cumulative([row["samples"] for row in rows]),
                      "wall_seconds": cumulative([row["epoch_seconds"] for row in rows])}}


def command_line_spelling(override: str) -> str:
    """``key=True`` as a sweep's ``key=true,false`` is typed on the command line (Hydra's sweeper writes the parsed
    booleans back capitalised in a job's overrides.yaml)."""
    key, sep, value = override.partition("=")
    return f"{key}={value.lower()}" if sep and value in ("True", "False") else override


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


def curve_labels(pooled: list[dict]) -> list[str]:
    """A legend label per pooled configuration: its overrides less those every plotted configuration shares (as
    ``advantage.shuffle=false`` when the controls stay in the table), and its number of seeds."""
    names = varying_overrides([p["config"].split() for p in pooled])
    return [f"{' '.join(name) or p['config']} ({p['seeds']} seeds)" for name, p in zip(names, pooled)]


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
    controls = [config for config in groups if "algo=baseline" in config.split() and CONTROL not in config.split()]
    if len(controls) != 1:
        return
    control = {seed_of(j["label"]): late_mean(j["curve"]["reward_mean"]) for j in groups[controls[0]]}
    for entry in pooled:
        diffs = [late_mean(j["curve"]["reward_mean"]) - control[seed_of(j["label"])]
                 for j in groups[entry["config"]] if seed_of(j["label"]) in control]
        if diffs:
            paired = mean_se(diffs)
            entry["vs_baseline"], entry["vs_baseline_se"] = paired["mean"], paired["se"]


def versus_control(pooled: list[dict], groups: dict[str, list[dict]]) -> None:
    """Each configuration with a control in the sweep (the same overrides with ``advantage.shuffle=true``): its
    last-epochs reward (:func:`late_mean`) minus the control's, paired seed by seed, as ``vs_control`` /
    ``vs_control_se``."""
    for entry in pooled:
        words = entry["config"].split()
        if CONTROL in words:
            continue
        control = " ".join(CONTROL if w == "advantage.shuffle=false" else w for w in words)
        if control == entry["config"] or control not in groups:
            continue
        theirs = {seed_of(j["label"]): late_mean(j["curve"]["reward_mean"]) for j in groups[control]}
        diffs = [late_mean(j["curve"]["reward_mean"]) - theirs[seed_of(j["label"])]
                 for j in groups[entry["config"]] if seed_of(j["label"]) in theirs]
        if diffs:
            paired = mean_se(diffs)
            entry["vs_control"], entry["vs_control_se"] = paired["mean"], paired["se"]


def reward_at(curve: dict, queries: float) -> float:
    """The training reward of the first epoch whose cumulative reward queries reach ``queries``, averaged with the
    epoch before it (two epochs: less of one batch's luck)."""
    i = next((k for k, q in enumerate(curve["reward_queries"]) if q >= queries), len(curve["reward_queries"]) - 1)
    return sum(curve["reward_mean"][max(0, i - 1):i + 1]) / len(curve["reward_mean"][max(0, i - 1):i + 1])


def budget_leaders(pooled: list[dict], groups: dict[str, list[dict]]) -> list[dict]:
    """For each budget (a fraction of the shortest job's reward queries): every trained configuration's reward
    gain over its first epoch there (mean +- s.e. over seeds), the leader, and the configurations within noise of it
    (the difference under twice its standard error)."""
    trained = [p for p in pooled if CONTROL not in p["config"].split() and "algo=baseline" not in p["config"].split()]
    if not trained:
        return []
    total = min(j["curve"]["reward_queries"][-1] for p in trained for j in groups[p["config"]])
    table = []
    for fraction in BUDGETS:
        queries = fraction * total
        gains = {p["config"]: mean_se([reward_at(j["curve"], queries) - j["curve"]["reward_mean"][0]
                                       for j in groups[p["config"]]]) for p in trained}
        leader = max(gains, key=lambda c: gains[c]["mean"])
        tied = [c for c in gains if c != leader and gains[leader]["mean"] - gains[c]["mean"]
                < 2 * (gains[leader]["se"] ** 2 + gains[c]["se"] ** 2) ** 0.5]
        table.append({"fraction": fraction, "queries": queries, "leader": leader, "within_noise": tied,
                      "gains": gains})
    return table


def pool_seeds(jobs: list[dict]) -> list[dict]:
    """One entry per configuration (jobs differing only in ``seed``): final reward, gain and the side measures as
    mean +- s.e. over seeds, and the mean curve over the epochs every seed reached."""
    groups = seed_groups(jobs)
    pooled = []
    for config, members in groups.items():
        epochs = min(j["epochs"] for j in members)
        curve = {key: [sum(j["curve"][key][i] for j in members) / len(members) for i in range(epochs)]
                 for key in ("epochs", "reward_mean", "reward_queries", "wall_seconds")}
        final = mean_se([j["final_reward"] for j in members])
        change = mean_se([gain(j["curve"]["reward_mean"]) for j in members])
        side = {key: mean_se([j[key] for j in members]) for key in SIDE_MEASURES
                if all(j.get(key) is not None for j in members)}
        pooled.append({"config": config, "seeds": len(members), "final_reward": final["mean"],
                       "final_reward_se": final["se"], "gain": change["mean"], "gain_se": change["se"],
                       "curve": curve, **{key: value["mean"] for key, value in side.items()},
                       **{f"{key}_se": value["se"] for key, value in side.items()}})
    versus_baseline(pooled, groups)
    versus_control(pooled, groups)
    return pooled


def seed_groups(jobs: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for job in jobs:
        if job["epochs"]:
            groups.setdefault(without_seed(job["label"]), []).append(job)
    return groups


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
    trained = [p for p in pooled if CONTROL not in p["config"].split()] or pooled  # controls: in the table
    lines = list(zip(curve_labels(trained), [p["curve"] for p in trained])) if by_seed_mean \
        else [(j["label"], j["curve"]) for j in done]
    for x, xlabel in (("reward_queries", "reward queries (samples scored)"), ("wall_seconds", "wall time (s)")):
        report.plot_curves({label: (curve[x], curve["reward_mean"]) for label, curve in lines},
                           sweep_dir / f"sweep_rewards_vs_{x}.png",
                           ylabel="training reward" + (" (mean over seeds)" if by_seed_mean else " (mean per epoch)"),
                           xlabel=xlabel)
    finished = [j for j in jobs if j["best_reward"] is not None]
    best = max(finished, key=lambda j: j["final_reward"])["job"] if finished else None
    budgets = budget_leaders(pooled, seed_groups(jobs))
    summary = {"sweep_dir": str(sweep_dir), "jobs": jobs, "configs": pooled, "best_job_by_final_reward": best,
               "budgets": budgets, "plot": plot.name}
    (sweep_dir / "sweep_summary.json").write_text(json.dumps(summary, indent=2))
    rows = [[j["job"], j["label"], j["epochs"], _fmt(j["final_reward"]), f"{_fmt(j['best_reward'])} "
             f"(epoch {j['best_epoch']})" if j["epochs"] else "-"] for j in jobs]
    table = report.markdown_table(["job", "overrides", "epochs", "final training reward", "best training reward"], rows)
    (sweep_dir / "sweep_summary.md").write_text(
        f"# Sweep summary: {sweep_dir}\n\n{table}\n\nBest final training reward: {best or '-'}\n\n"
        f"## Per configuration (seeds pooled: mean +- standard error)\n\n{pooled_markdown(pooled)}\n\n"
        + (f"## Who leads at each budget\n\n{budget_markdown(budgets)}\n\n" if budgets else "")
        + f"![training reward curves]({plot.name})\n\n![against reward queries](sweep_rewards_vs_reward_queries.png)"
        f"\n\n![against wall time](sweep_rewards_vs_wall_seconds.png)\n")
    return summary


def _paired(entry: dict, key: str) -> str:
    return _pm(entry[key], entry[f"{key}_se"], signed=True) if key in entry else "-"


def pooled_markdown(pooled: list[dict]) -> str:
    rows = [[p["config"], p["seeds"], _pm(p["final_reward"], p["final_reward_se"]),
             _pm(p["gain"], p["gain_se"], signed=True), _paired(p, "vs_control"), _paired(p, "vs_baseline"),
             *(_pm(p[key], p[f"{key}_se"]) if key in p else "-" for key in SIDE_MEASURES)] for p in pooled]
    return report.markdown_table(
        ["configuration", "seeds", "final training reward", "gain (last 3 - first 3 epochs)",
         "last epochs vs its control (advantage.shuffle=true, paired by seed)",
         "last 3 epochs vs algo=baseline (paired by seed)", *(f"{key} (last check)" for key in SIDE_MEASURES)], rows)


def budget_markdown(budgets: list[dict]) -> str:
    rows = [[f"{b['queries']:.0f} ({b['fraction']:.0%})", b["leader"],
             _pm(b["gains"][b["leader"]]["mean"], b["gains"][b["leader"]]["se"], signed=True),
             ", ".join(b["within_noise"]) or "none"] for b in budgets]
    return report.markdown_table(["reward queries (of the budget)", "leader (reward gain over epoch 0)", "its gain",
                                  "within noise of it (difference < 2 s.e.)"], rows)


def sweep_task(cfg) -> None:
    """Hydra task of ``ddpo eval sweep=<multirun dir>``."""
    summary = summarise_sweep(Path(cfg.sweep))
    Console(stderr=True).print(f"[green]{len(summary['jobs'])} jobs summarised in "
                               f"{Path(cfg.sweep) / 'sweep_summary.md'}[/]")
