"""``ddpo eval``: an honest comparison of a run's checkpoints with the base model.

Every model (the base, then each chosen checkpoint) draws the same images: the same prompts and the same per-image
seeds as ``ddpo sample`` (``derive_seed(seed, prompt index, image index)``), so differences are paired. Every image
is scored by the training reward and the extra rewards of ``rewards`` (e.g. a held-out ``gold`` reward). Outputs (in
Hydra's output dir, by default ``<run>/eval/<time>``)::

    eval.json            means +- standard errors, paired changes vs the base, diversity, flags, best checkpoint
    eval.md              the same as tables, with comparison.png and reward_curve.png
    eval_samples.jsonl   one row per (model, image): prompt, seed and every reward
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import report
from .report import console
from .config.compose import override_keys
from .config.run_defaults import apply_run_defaults, extra_rewards, user_config_dir
from .errors import UserError
from .runs import epoch_of, resolve_checkpoints
from .sample import ImageSampler, ImageSpec, build_prompts, build_reward, plan_images, score
from .samplers import evaluation_sampler
from .stats import fmt, mean_se, significant



@dataclass
class ModelEval:
    """What one model produced: per-image rewards, per-prompt diversity and the images of the comparison grid."""

    name: str
    checkpoint: str | None
    epoch: int | None
    rewards: dict[str, np.ndarray]   # reward name -> [N] (one value per image, in plan order)
    diversity: np.ndarray            # [P] mean pairwise distance among each prompt's images
    grid: torch.Tensor               # [G, 3, H, W] the images of ``grid_specs`` (same order)


# ----------------------------------------------------------------------------------------------- statistics


def pairwise_diversity(images: torch.Tensor, groups: list[int], size: int = 32) -> np.ndarray:
    """Per group (prompt): the mean pairwise RMS pixel distance of its images, downsampled to ``size`` x ``size``.

    images ``[N,3,H,W]`` in [0,1]; groups ``[N]`` prompt index of each image -> ``[P]`` (NaN for a single image).
    0 = identical images; two independent uniform-noise images (no larger than ``size``) score about 0.41.
    """
    small = F.adaptive_avg_pool2d(images.float(), size).flatten(1)   # [N, 3 * size * size]
    keys = list(dict.fromkeys(groups))
    out = np.full(len(keys), np.nan)
    for g, key in enumerate(keys):
        members = small[[i for i, k in enumerate(groups) if k == key]]  # [n, D]
        if len(members) > 1:
            distances = torch.pdist(members) / math.sqrt(members.shape[1])  # [n (n - 1) / 2]
            out[g] = float(distances.mean())
    return out




def overoptimization(models: list[ModelEval], train: str, gold: str | None, threshold: float) -> list[dict]:
    """Pairs (base -> each checkpoint, and consecutive checkpoints) where the training reward clearly rose while the
    gold reward clearly fell, with the paired changes (same seeds, so per-image differences)."""
    if gold is None:
        return []
    pairs = [(models[0], m) for m in models[1:]] + list(zip(models[1:], models[2:]))
    flags = []
    for before, after in pairs:
        d_train = mean_se(after.rewards[train] - before.rewards[train])
        d_gold = mean_se(after.rewards[gold] - before.rewards[gold])
        if significant(d_train, +1, threshold) and significant(d_gold, -1, threshold):
            flags.append({"from": before.name, "to": after.name, "train_change": d_train, "gold_change": d_gold,
                          "message": f"{before.name} -> {after.name}: {train} {fmt(d_train, signed=True)} but "
                                     f"{gold} {fmt(d_gold, signed=True)}"})
    return flags


def best_model(models: list[ModelEval], reward: str) -> dict:
    """The model (``models[0]`` is the base) with the highest mean ``reward``, and its paired change vs the base."""
    means = [float(np.nanmean(m.rewards[reward])) for m in models]
    best = models[int(np.argmax(means))]
    return {"by": reward, "model": best.name, "checkpoint": best.checkpoint, "mean": max(means),
            "change_vs_base": mean_se(best.rewards[reward] - models[0].rewards[reward])}




# ----------------------------------------------------------------------------------------------- running


def eval_rewards(cfg: DictConfig, device, config_dir: Path | None = None) -> tuple[dict, str, str | None]:
    """``{name: reward}`` with the training reward first, its name, and the gold reward's name (or None)."""
    if cfg.reward is None:
        raise UserError("no training reward to evaluate: the run names none; give reward=<reward option>")
    extras = extra_rewards(cfg, config_dir)
    train_fn = build_reward(cfg.reward, device)
    train_name = train_fn.name if train_fn.name not in extras else f"{train_fn.name}_train"
    rewards = {train_name: train_fn, **{name: build_reward(node, device) for name, node in extras.items()}}
    gold = cfg.gold or ("gold" if "gold" in extras else next(iter(extras), None))
    return rewards, train_name, gold


def evaluate_model(sampler: ImageSampler, name: str, path: Path | None, cfg: DictConfig, specs: list[ImageSpec],
                   rewards: dict) -> ModelEval:
    sampler.use(path, cfg.lora_scale)
    console.print(f"eval: {name}: {len(specs)} images")
    images = sampler.generate([s.prompt for s in specs], [s.seed for s in specs])     # [N, 3, H, W]
    values = {}
    for key, fn in rewards.items():
        scores, info = score(fn, images, specs, cfg.sampler.batch_size)
        values[key] = np.asarray(scores)
        values.update({f"{key}/{name}": column for name, column in report.numeric_columns(info).items()
                       if column.size == len(specs)})  # e.g. shapes_counting/exact: accuracy, paired like a reward
    return ModelEval(name, str(path) if path else None, epoch_of(path) if path else None, values,
                     pairwise_diversity(images, [s.prompt_index for s in specs], cfg.diversity_size),
                     images[grid_specs(specs, cfg.grid_prompts, cfg.grid_images)])


def grid_specs(specs: list[ImageSpec], prompts: int, images: int) -> list[int]:
    """Plan indices shown in comparison.png: the first ``images`` images of each of the first ``prompts`` prompts."""
    shown = list(dict.fromkeys(s.prompt_index for s in specs))[:prompts]
    return [k for k, s in enumerate(specs) if s.prompt_index in shown and s.image_index < images]


def evaluate_run(cfg: DictConfig, out_dir: Path, config_dir: Path | None = None) -> dict:
    """Evaluate the base model and the chosen checkpoints of ``cfg.run``; write the outputs into ``out_dir``.
    ``config_dir``: the user's extra config folder (``-cd``), where reward options named in ``rewards`` may live."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = resolve_checkpoints(cfg.run, cfg.checkpoints)
    prompt_set = build_prompts(cfg)
    specs = plan_images(prompt_set, cfg.num_prompts, cfg.n, cfg.seed)
    sampler = ImageSampler(cfg)
    rewards, train, gold = eval_rewards(cfg, sampler.device, config_dir)
    models = [evaluate_model(sampler, "base", None, cfg, specs, rewards)]
    models += [evaluate_model(sampler, p.name, p, cfg, specs, rewards) for p in paths]
    summary = summarise(cfg, models, specs, getattr(prompt_set, "name", "prompts"), train, gold)
    write_outputs(out_dir, cfg, summary, models, specs)
    return summary


def training_summary(run_dir: Path) -> dict:
    rows = report.read_metrics(run_dir)
    if not rows:
        return {"epochs": 0}
    best = max(rows, key=lambda r: r["reward_mean"])
    return {"epochs": len(rows), "first_reward": rows[0]["reward_mean"], "final_reward": rows[-1]["reward_mean"],
            "best_reward": best["reward_mean"], "best_epoch": best["epoch"]}


def summarise(cfg: DictConfig, models: list[ModelEval], specs: list[ImageSpec], prompts_name: str, train: str,
              gold: str | None) -> dict:
    base = models[0]
    return {
        "run": str(cfg.run),
        "prompts": {"name": prompts_name, "indices": sorted({s.prompt_index for s in specs}),
                    "images_per_prompt": cfg.n, "seed": cfg.seed},
        "sampler": {k: cfg.sampler[k] for k in ("name", "num_steps", "eta", "guidance_scale")},
        "lora_scale": cfg.lora_scale, "train_reward": train, "gold_reward": gold, "rewards": list(base.rewards),
        "models": [{"name": m.name, "checkpoint": m.checkpoint, "epoch": m.epoch,
                    "rewards": {k: mean_se(v) for k, v in m.rewards.items()},
                    "change_vs_base": {k: mean_se(v - base.rewards[k]) for k, v in m.rewards.items()},
                    "diversity": mean_se(m.diversity)} for m in models],
        "best": best_model(models, gold or train),
        "overoptimization": overoptimization(models, train, gold, cfg.overopt_threshold),
        "training": training_summary(Path(cfg.run)),
    }


# ----------------------------------------------------------------------------------------------- outputs
def write_outputs(out_dir: Path, cfg: DictConfig, summary: dict, models: list[ModelEval],
                  specs: list[ImageSpec]) -> None:
    files = {"report": "eval.md", "samples": "eval_samples.jsonl"}
    if cfg.grid_prompts and len(models[0].grid):
        comparison_grid(models, specs, summary["train_reward"], cfg.grid_prompts, cfg.grid_images).save(
            out_dir / "comparison.png")
        files["comparison"] = "comparison.png"
    if report.plot_reward_curve(Path(cfg.run), out_dir / "reward_curve.png"):
        files["reward_curve"] = "reward_curve.png"
    summary["files"] = files
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=2))
    with open(out_dir / "eval_samples.jsonl", "w") as handle:
        for m in models:
            for k, s in enumerate(specs):
                handle.write(json.dumps({"model": m.name, "prompt": s.prompt, "prompt_index": s.prompt_index,
                                         "image_index": s.image_index, "seed": s.seed,
                                         **{r: float(v[k]) for r, v in m.rewards.items()}}) + "\n")
    (out_dir / "eval.md").write_text(markdown(summary))


def comparison_grid(models: list[ModelEval], specs: list[ImageSpec], train: str, prompts: int, images: int):
    """One row per (prompt, model): base first, then each checkpoint; columns are the prompt's first images, drawn
    from the same seeds by every model. Captions: model, training reward of the image, prompt."""
    ids = grid_specs(specs, prompts, images)
    by_prompt: dict[int, list[int]] = {}
    for position, k in enumerate(ids):
        by_prompt.setdefault(specs[k].prompt_index, []).append(position)
    columns = max(len(positions) for positions in by_prompt.values())
    cells, captions = [], []
    for positions in by_prompt.values():
        for m in models:
            for position in positions:
                cells.append(m.grid[position])
                prompt = report.shown_prompt(specs[ids[position]].prompt)
                captions.append(f"{m.name} {m.rewards[train][ids[position]]:.3g}: {prompt}")
            blank = columns - len(positions)
            cells += [torch.ones_like(m.grid[0])] * blank
            captions += [""] * blank
    return report.image_grid(torch.stack(cells), captions, columns=columns, min_cell=160)


def markdown(summary: dict) -> str:
    train, gold = summary["train_reward"], summary["gold_reward"]
    names = summary["rewards"]

    def header(name):
        return name + (" (train)" if name == train else " (gold)" if name == gold else "")

    table = report.markdown_table(
        ["model", "epoch", *map(header, names), "diversity"],
        [[m["name"], "-" if m["epoch"] is None else m["epoch"], *(fmt(m["rewards"][r]) for r in names),
          fmt(m["diversity"])] for m in summary["models"]])
    changes = report.markdown_table(
        ["model", *(f"Δ {header(r)}" for r in names)],
        [[m["name"], *(fmt(m["change_vs_base"][r], signed=True) for r in names)] for m in summary["models"][1:]])
    p, s, t = summary["prompts"], summary["sampler"], summary["training"]
    best = summary["best"]
    flags = summary["overoptimization"]
    lines = [
        f"# Evaluation of {summary['run']}", "",
        f"{len(p['indices'])} prompts of `{p['name']}` x {p['images_per_prompt']} images (seeds from seed={p['seed']}, "
        f"the same for every model); {s['name']} {s['num_steps']} steps, eta {s['eta']}, guidance {s['guidance_scale']}; "
        f"lora_scale {summary['lora_scale']}. Values are mean ± standard error over images; diversity is the mean "
        f"pairwise RMS pixel distance (downsampled) among each prompt's images, mean ± standard error over prompts.",
        "", table, "", "## Change vs the base model (paired: same prompts and seeds)", "",
        changes if len(summary["models"]) > 1 else "(no checkpoint)", "", "## Verdict", "",
        f"- Best model by {'the gold reward' if gold else 'the training reward (no gold reward given)'} "
        f"`{best['by']}`: **{best['model']}** (mean {best['mean']:.4g}; vs base "
        f"{fmt(best['change_vs_base'], signed=True)}).",
    ]
    if not gold:
        lines.append("- Over-optimisation not checked: name a held-out reward, e.g. `rewards.gold=<reward option>`.")
    elif flags:
        lines += [f"- **Likely over-optimisation**: {f['message']}" for f in flags]
    else:
        lines.append(f"- No over-optimisation flagged (training reward `{train}` up while `{gold}` down).")
    if t.get("epochs"):
        lines.append(f"- Training: {t['epochs']} epochs logged, reward {t['first_reward']:.4g} -> "
                     f"{t['final_reward']:.4g} (best {t['best_reward']:.4g} at epoch {t['best_epoch']}).")
    files = summary.get("files", {})
    if "comparison" in files:
        lines += ["", "## Base vs fine-tuned (same seeds)", "", "![comparison](comparison.png)"]
    if "reward_curve" in files:
        lines += ["", "## Training reward", "", "![training reward](reward_curve.png)"]
    return "\n".join(lines) + "\n"


def with_evaluation_sampler(cfg: DictConfig, chosen: list[str]) -> DictConfig:
    """A run is evaluated with the sampler its training sampler names for evaluation (a flow run trained with an SDE:
    the deterministic ODE, the model's own sampler at inference, so the comparison has no step noise at all),
    unless the sampler was chosen on the command line."""
    name = evaluation_sampler(cfg.sampler.name)
    if name != cfg.sampler.name and not {"sampler", "sampler.name"} & set(chosen):
        cfg = cfg.copy()
        cfg.sampler.name = name
    return cfg


def eval_task(cfg: DictConfig) -> None:
    """Hydra task of ``ddpo eval run=...``: merge the run's settings, save the effective config, evaluate."""
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    cfg = apply_run_defaults(cfg, overrides, ("model", "sampler", "prompts", "reward"))
    cfg = with_evaluation_sampler(cfg, override_keys(overrides))
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out_dir / "resolved_config.yaml")
    summary = evaluate_run(cfg, out_dir, user_config_dir())
    for flag in summary["overoptimization"]:
        console.print(f"[yellow]likely over-optimisation: {flag['message']}[/]")
    console.print(f"[green]best by {summary['best']['by']}: {summary['best']['model']}; report in "
                  f"{out_dir / 'eval.md'}[/]")
