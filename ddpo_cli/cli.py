"""The `ddpo` command. Typer owns the commands; Hydra owns overrides, run directories and sweeps.

Extra arguments are handed to ``hydra.main`` unchanged, so ``-m``, ``--cfg job``, ``-cd DIR`` and
``hydra.run.dir=...`` work as in any Hydra app. Before Hydra starts, the overrides are composed once per sweep job
and validated, so a typo fails in one line with exit code 2 before any directory is written.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import typer
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import compose, conf_dir, config_error_line, plan_run
from .errors import UserError
from .runs import run_dir_of
from .sample_config import prepare_args, validate_eval, validate_sample

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="RL fine-tuning of text-to-image diffusion models (DDPO, RWR, DPOK, AlignProp).")
err = Console(stderr=True)
HYDRA_ARGS = {"context_settings": {"allow_extra_args": True, "ignore_unknown_options": True}}
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-dir", "-cd", "--config-path", "-cp",
                          "--config-name", "-cn", "--info", "-i", "--experimental-rerun"}


def print_error(message: str) -> None:
    """``error: <message>`` on stderr, the message shown verbatim (no rich markup: ``[start, end]`` stays)."""
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)


def fail(message: str) -> None:
    print_error(message)
    raise typer.Exit(2)


def split_args(args: list[str]) -> tuple[list[str], list[str], bool]:
    """Separate Hydra flags from ``key=value`` overrides; report whether ``-m/--multirun`` was given."""
    flags, overrides, multirun = [], [], False
    it = iter(args)
    for arg in it:
        if arg in ("-m", "--multirun"):
            multirun = True
            flags.append(arg)
        elif arg in HYDRA_FLAGS_WITH_VALUE:
            flags += [arg, next(it, "")]
        elif arg.startswith("-"):
            flags.append(arg)
        else:
            overrides.append(arg)
    return flags, overrides, multirun


def sweep_jobs(overrides: list[str], multirun: bool, limit: int = 64) -> list[list[str]]:
    """The override list of each job Hydra will run (the first ``limit`` of a sweep)."""
    if not multirun:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra")])
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [job for batch in batches for job in batch][:limit]


def preflight(config_name: str, overrides: list[str], multirun: bool, config_dir: Path | None,
              validate) -> list[tuple[dict, object]]:
    """Compose and validate every job before Hydra creates anything; returns each job's config (as a container)
    with what ``validate(cfg, config_dir)`` returned, so that the job can reuse it instead of checking again."""
    checked = []
    for job in sweep_jobs(overrides, multirun):
        cfg = compose(config_name, job, config_dir)
        try:
            checked.append((OmegaConf.to_container(cfg, resolve=False), validate(cfg, config_dir)))
        except OmegaConfBaseException as exc:
            raise UserError(config_error_line(exc)) from None
    return checked


def checked_result(checked: list[tuple[dict, object]], cfg):
    """What the preflight returned for the job whose config is ``cfg`` (None if it was not checked)."""
    container = OmegaConf.to_container(cfg, resolve=False)
    return next((result for job, result in checked if job == container), None)


def resume_overrides(overrides: list[str], resume: Path | None) -> list[str]:
    """``resume=<run or checkpoint>`` writes into that run: add ``hydra.run.dir`` unless the user set it, and keep
    the run's original ``.hydra/`` record by writing this session's resolved config to ``.hydra/resume_<time>/``."""
    if resume is None or any(o.startswith("hydra.run.dir=") for o in overrides):
        return overrides
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return [*overrides, f"hydra.run.dir={run_dir_of(resume).resolve()}", f"hydra.output_subdir=.hydra/resume_{stamp}"]


def run_hydra(config_name: str, args: list[str], task, validate) -> None:
    """Hand ``args`` to ``hydra.main`` as if they were on its own command line. ``validate(cfg, config_dir)`` runs
    on every job first (exit 2 on a UserError); ``task(cfg, checked)`` gets what it returned for that job."""
    flags, overrides, multirun = split_args(args)
    config_dir = None
    for i, flag in enumerate(flags):
        if flag in ("-cd", "--config-dir") and i + 1 < len(flags):
            config_dir = Path(flags[i + 1]).resolve()
    info_only = any(f in flags for f in ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help"))
    checked = []
    try:
        if not info_only:
            checked = preflight(config_name, overrides, multirun, config_dir, validate)
            if not multirun:
                overrides = resume_overrides(overrides, getattr(checked[0][1], "resume", None))
    except UserError as exc:
        fail(str(exc))
    sys.argv = [f"ddpo {config_name}", *flags, *overrides]
    main = hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")(
        guarded(lambda cfg: task(cfg, checked_result(checked, cfg))))
    main()


def validate_train(cfg, config_dir: Path | None = None):
    return plan_run(cfg, check_weights=True)


def train_task(cfg, plan) -> None:
    """One training job (Hydra calls this once per run or sweep job); ``plan`` is the preflight's, when it has
    one for exactly this config."""
    from .trainer import Trainer  # torch and diffusers load only when a job runs, not for `ddpo ls` or `--help`

    trainer = Trainer(cfg, Path(HydraConfig.get().runtime.output_dir), plan)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()


@app.command(**HYDRA_ARGS)
def train(ctx: typer.Context) -> None:
    """Fine-tune with RL. Arguments are Hydra overrides: `ddpo train reward=aesthetic algo=ddpo_is train.lr=1e-4`."""
    run_hydra("train", list(ctx.args), train_task, validate_train)


@app.command("ls")
def list_options(group: str = typer.Argument(None, help="A config group (model, reward, algo, ...)")) -> None:
    """List the config groups and their options, with each option's description."""
    root = conf_dir()
    groups = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    if group and group not in groups:
        fail(f"unknown config group '{group}': choose one of {', '.join(groups)}")
    table = Table("group", "option", "description", title=f"config groups in {root}", title_justify="left")
    for name in [group] if group else groups:
        for option in sorted((root / name).glob("*.yaml")):
            table.add_row(name, option.stem, first_comment(option))
    Console().print(table)


def first_comment(path: Path) -> str:
    """The first comment line of a YAML file (its one-line description)."""
    for line in path.read_text().splitlines():
        if line.startswith("# @package"):
            continue
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def guarded(task):
    """A Hydra task that turns a UserError into one line on stderr and exit code 2."""
    def run(cfg) -> None:
        try:
            task(cfg)
        except UserError as exc:
            print_error(str(exc))
            sys.exit(2)

    return run


@app.command(**HYDRA_ARGS)
def sample(ctx: typer.Context) -> None:
    """Images from a run's checkpoint or the base model, with per-image seeds.

    Arguments are Hydra overrides:
    `ddpo sample run=<run dir> checkpoint=latest|none|<epoch> n=4 seed=0 lora_scale=1 prompts=<option>`.
    Writes PNGs, grid.png and samples.jsonl into <run>/sample/<time>."""
    run_hydra("sample", prepare_args(list(ctx.args)), sample_task, lambda cfg, _: validate_sample(cfg))


def sample_task(cfg, _) -> None:
    from .sample import sample_task as run  # torch and diffusers load only when a job runs

    run(cfg)


@app.command("eval", **HYDRA_ARGS)
def evaluate(ctx: typer.Context) -> None:
    """Base model vs checkpoints on the same prompts and seeds, scored by several rewards.

    `ddpo eval run=<run dir> checkpoints=latest|all rewards.gold=<reward option> prompts=<held-out set>`.
    Writes eval.md and eval.json into <run>/eval/<time>. `ddpo eval sweep=<multirun dir>` summarises a sweep."""
    run_hydra("eval", prepare_args(list(ctx.args)), eval_task, validate_eval)


def eval_task(cfg, _) -> None:
    if cfg.sweep:
        from .sweep import sweep_task as run
    else:
        from .evaluate import eval_task as run  # torch and diffusers load only when a job runs
    run(cfg)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
