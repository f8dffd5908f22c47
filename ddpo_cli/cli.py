"""The `ddpo` command. Typer owns the commands; Hydra owns overrides, run directories and sweeps.

Extra arguments are handed to ``hydra.main`` unchanged, so ``-m``, ``--cfg job``, ``-cd DIR`` and
``hydra.run.dir=...`` work as in any Hydra app. Before Hydra starts, the overrides are composed once per sweep job
and validated, so a typo fails in one line with exit code 2 before any directory is written.
"""
from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import typer
from rich.console import Console

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="RL fine-tuning of text-to-image diffusion models (DDPO, RWR, DPOK, AlignProp).")
err = Console(stderr=True)
HYDRA_ARGS = {"context_settings": {"allow_extra_args": True, "ignore_unknown_options": True}}
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-dir", "-cd", "--config-path", "-cp",
                          "--config-name", "-cn", "--info", "-i", "--experimental-rerun"}


def conf_dir() -> Path:
    """The config tree: the repository's conf/ in a source checkout, else the copy shipped as ddpo_cli.conf."""
    source = Path(__file__).resolve().parent.parent / "conf"
    if (source / "train.yaml").exists():
        return source
    return Path(str(resources.files("ddpo_cli.conf")))


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)
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
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra")])
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [job for batch in batches for job in batch][:limit]


def compose(config_name: str, overrides: list[str], config_dir: Path | None = None):
    """Compose the config as Hydra would (no run directory). Raises UserError with a one-line reason."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from . import config  # noqa: F401  (registers the schema in Hydra's ConfigStore)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir or conf_dir()), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=[o for o in overrides if not o.startswith("hydra.")])
    except UserError:
        raise
    except Exception as exc:  # Hydra and OmegaConf errors: keep the most specific line
        raise UserError(config_error_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()


def config_error_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    head = lines[0] if lines else type(cause).__name__
    full_key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), "")
    hint = "see the options with `ddpo ls` and the keys with `ddpo train --cfg job`"
    return f"invalid config: {head}{f' (key: {full_key})' if full_key else ''}; {hint}"


def preflight(config_name: str, overrides: list[str], multirun: bool, config_dir: Path | None,
              validate=None) -> None:
    """Compose and validate (``validate(cfg)``, default: the training checks) every job before Hydra creates anything."""
    from omegaconf.errors import OmegaConfBaseException

    if validate is None:
        from .config import validate

    for job in sweep_jobs(overrides, multirun):
        cfg = compose(config_name, job, config_dir)
        try:
            validate(cfg)
        except OmegaConfBaseException as exc:
            raise UserError(config_error_line(exc)) from None


def resume_overrides(overrides: list[str]) -> list[str]:
    """``resume=<run or checkpoint>`` writes into that run: add ``hydra.run.dir`` unless the user set it, and keep
    the run's original ``.hydra/`` record by writing this session's resolved config to ``.hydra/resume_<time>/``."""
    import time

    from .checkpoint import find_checkpoint, run_dir_of

    value = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    if not value or value == "null" or any(o.startswith("hydra.run.dir=") for o in overrides):
        return overrides
    run_dir = run_dir_of(find_checkpoint(value)).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return [*overrides, f"hydra.run.dir={run_dir}", f"hydra.output_subdir=.hydra/resume_{stamp}"]


def run_hydra(config_name: str, args: list[str], task, validate=None) -> None:
    """Hand ``args`` to ``hydra.main`` as if they were on its own command line."""
    import hydra

    from . import config  # noqa: F401  (registers the schema in Hydra's ConfigStore)

    flags, overrides, multirun = split_args(args)
    config_dir = None
    for i, flag in enumerate(flags):
        if flag in ("-cd", "--config-dir") and i + 1 < len(flags):
            config_dir = Path(flags[i + 1]).resolve()
    info_only = any(f in flags for f in ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help"))
    try:
        if not info_only:
            preflight(config_name, overrides, multirun, config_dir, validate)
            overrides = resume_overrides(overrides) if not multirun else overrides
    except UserError as exc:
        fail(str(exc))
    sys.argv = [f"ddpo {config_name}", *flags, *overrides]
    main = hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")(task)
    main()


def train_task(cfg) -> None:
    """One training job (Hydra calls this once per run or sweep job)."""
    from hydra.core.hydra_config import HydraConfig

    from .trainer import Trainer

    trainer = Trainer(cfg, Path(HydraConfig.get().runtime.output_dir))
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()


@app.command(**HYDRA_ARGS)
def train(ctx: typer.Context) -> None:
    """Fine-tune with RL. Arguments are Hydra overrides: `ddpo train reward=aesthetic algo=ddpo_is train.lr=1e-4`."""
    run_hydra("train", list(ctx.args), guarded(train_task))


@app.command("ls")
def list_options(group: str = typer.Argument(None, help="A config group (model, reward, algo, ...)")) -> None:
    """List the config groups and their options, with each option's description."""
    from rich.table import Table

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
            err.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
            sys.exit(2)

    return run


@app.command(**HYDRA_ARGS)
def sample(ctx: typer.Context) -> None:
    """Images from a run's checkpoint or the base model, with per-image seeds.

    Arguments are Hydra overrides:
    `ddpo sample run=<run dir> checkpoint=latest|none|<epoch> n=4 seed=0 lora_scale=1 prompts=<option>`.
    Writes PNGs, grid.png and samples.jsonl into <run>/sample/<time>."""
    from .sample_config import prepare_args, validate_sample

    def task(cfg) -> None:
        from .sample import sample_task

        sample_task(cfg)

    run_hydra("sample", prepare_args(list(ctx.args)), guarded(task), validate_sample)


@app.command("eval", **HYDRA_ARGS)
def evaluate(ctx: typer.Context) -> None:
    """Base model vs checkpoints on the same prompts and seeds, scored by several rewards.

    `ddpo eval run=<run dir> checkpoints=latest|all rewards.gold=<reward option> prompts=<held-out set>`.
    Writes eval.md and eval.json into <run>/eval/<time>. `ddpo eval sweep=<multirun dir>` summarises a sweep."""
    from .sample_config import prepare_args, validate_eval

    def task(cfg) -> None:
        if cfg.sweep:
            from .sweep import sweep_task as run
        else:
            from .evaluate import eval_task as run
        run(cfg)

    run_hydra("eval", prepare_args(list(ctx.args)), guarded(task), validate_eval)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
