"""The `ddpo` command. Typer owns the commands; Hydra owns overrides, run directories and sweeps.

Extra arguments are handed to ``hydra.main`` unchanged, so ``-m``, ``--cfg job``, ``-cd DIR`` and
``hydra.run.dir=...`` work as in any Hydra app. Before Hydra starts, the overrides are composed once per sweep job
and validated, so a typo fails in one line with exit code 2 before any directory is written.
"""
from __future__ import annotations

import errno
import os
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

from .cluster import RELAUNCHED, relaunch_if_multi_gpu
from .config import compose, conf_dir, config_groups, plan_run
from .config.checks import validate_eval, validate_sample
from .config.compose import config_error_line, prepare_args
from .errors import UserError
from .runs import fresh_folder, holds_a_run, lock_run, run_dir_of

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="RL fine-tuning of text-to-image diffusion and flow-matching models: train, sample, eval, ls.")
err = Console(stderr=True, soft_wrap=True)
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


def resume_overrides(overrides: list[str], resume: Path) -> list[str]:
    """``resume=<run or checkpoint>`` writes into that run (unless ``hydra.run.dir`` says otherwise) and keeps the
    run's original ``.hydra/`` record: this session's resolved config goes to ``.hydra/resume_<time>/``."""
    extra = [f"hydra.output_subdir=.hydra/resume_{time.strftime('%Y%m%d-%H%M%S')}"]
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        extra.append(f"hydra.run.dir={quoted(run_dir_of(resume).resolve())}")
    return [*overrides, *extra]


def quoted(path: Path) -> str:
    """A path as a Hydra override value (quoted when it holds characters the override grammar reads)."""
    text = str(path)
    return f"'{text}'" if any(c in text for c in "=,'\" []{}()") else text


def claim_train_folder(overrides: list[str], multirun: bool, plan, config_dir: Path | None) -> list[str]:
    """Where a training run (or sweep) writes, settled before Hydra writes anything: a run folder that already
    holds a run is refused unless resumed; the default folder is new for every process (``_2``, ``_3`` when two
    start in the same second); and the folder is locked for this process's lifetime. Returns the overrides with
    the folder set explicitly."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    explicit = next((o.split("=", 1)[1].strip("'\"") for o in overrides if o.startswith(key + "=")), None)
    resume = None if multirun else plan.resume
    processes, first_process = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")) == 0
    if explicit is not None:
        folder = Path(explicit).expanduser().resolve()
        own_run = resume is not None and folder == run_dir_of(resume).resolve()
        own_run = own_run or folder == Path(os.environ.get(RELAUNCHED, "/nonexistent")).resolve()  # a sweep job
        if first_process and not own_run and holds_a_run(folder):
            raise UserError(f"{key}={explicit} already holds a run: continue it with resume={explicit}, or choose "
                            f"an empty or new folder")
        overrides = resume_overrides(overrides, resume) if resume is not None else overrides
    elif resume is not None:
        folder = run_dir_of(resume).resolve()
        overrides = resume_overrides(overrides, resume)
    elif processes > 1:
        raise UserError(f"{processes} processes must write one run: give them the same hydra.run.dir=<folder>")
    else:
        default = OmegaConf.select(compose("train", overrides, config_dir, return_hydra_config=True), key)
        folder = fresh_folder(Path(default).expanduser().resolve())
        overrides = [*overrides, f"{key}={quoted(folder)}"]
    if first_process:
        lock_run(folder)
        return overrides
    # the other processes of a distributed launch write nothing there (Hydra's record and log are the first's): a
    # file of theirs could land before the first process looks, and it would refuse the folder as taken
    return [*overrides, "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def run_hydra(config_name: str, args: list[str], task, validate, claim=None) -> None:
    """Hand ``args`` to ``hydra.main`` as if they were on its own command line. ``validate(cfg, config_dir)`` runs
    on every job first (exit 2 on a UserError); ``task(cfg, checked)`` gets what it returned for that job;
    ``claim(overrides, multirun, checked, config_dir)`` may settle the output folder first."""
    flags, overrides, multirun = split_args(args)
    config_dir = None
    for i, flag in enumerate(flags):
        if flag in ("-cd", "--config-dir") and i + 1 < len(flags):
            config_dir = Path(flags[i + 1]).resolve()
    info_only = any(f in flags for f in ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help"))
    checked = []
    try:
        if info_only:  # --cfg / --info print the config: the keys must still exist and hold the right types
            for job in sweep_jobs(overrides, multirun):
                compose(config_name, job, config_dir)
        else:
            checked = preflight(config_name, overrides, multirun, config_dir, validate)
            if claim is not None:
                overrides = claim(overrides, multirun, checked[0][1], config_dir)
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

    if relaunch_if_multi_gpu(cfg, HydraConfig.get()):  # a sweep job asking for several GPUs ran as accelerate launch
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir, plan)
        trainer.setup()
        trainer.train()
    except KeyboardInterrupt:
        # leave at once: a reward call in flight (a VLM server may take minutes) is abandoned, not awaited
        if trainer is not None:
            trainer.cleanup(wait=False)
        print_error(f"interrupted; the checkpoints written so far are in {run_dir / 'checkpoints'}: continue with "
                    f"ddpo train resume={run_dir}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    finally:
        if trainer is not None:
            trainer.cleanup()


@app.command(**HYDRA_ARGS)
def train(ctx: typer.Context) -> None:
    """Fine-tune with RL. Arguments are Hydra overrides: `ddpo train reward=aesthetic algo=ddpo_is train.lr=1e-4`."""
    run_hydra("train", list(ctx.args), train_task, validate_train, claim_train_folder)


@app.command("ls")
def list_options(group: str = typer.Argument(None, help="A config group (model, reward, algo, ...)")) -> None:
    """List the config groups and their options, with each option's description."""
    root = conf_dir()
    groups = config_groups()
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
    """A Hydra task that turns a UserError, or a file that cannot be written (full disk, read-only folder), into one
    line on stderr and exit code 2."""
    def run(cfg) -> None:
        try:
            task(cfg)
        except UserError as exc:
            print_error(str(exc))
            sys.exit(2)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM):
                raise
            print_error(f"cannot write {exc.filename or 'a file'} ({exc.strerror}): free some space or choose a "
                        f"writable folder; what was written before is intact")
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


@app.command("plan", **HYDRA_ARGS)
def plan(ctx: typer.Context,
         gpus: int = typer.Option(1, help="GPUs the run will use (processes)"),
         strategy: str = typer.Option("ddp", help="ddp (weights on every GPU), fsdp2 or zero3 (denoiser split), "
                                                  "zero2 (gradients and optimizer state split)"),
         benchmark: Path = typer.Option(None, help="a scripts/benchmark.py result on the target GPU: seconds/epoch")) \
        -> None:
    """Size a training run without running it: parameters per module, memory per GPU, work per epoch.

    Takes the same overrides as `ddpo train`: `ddpo plan model=flux_dev sampler=flow_sde --gpus 8 --strategy fsdp2`.
    Real models are built on the meta device from their configs (no download, no memory)."""
    try:
        cfg = compose("train", list(ctx.args))
        from .planner import plan_task  # torch and diffusers load only when a plan is made

        plan_task(cfg, gpus, strategy, benchmark)
    except UserError as exc:
        fail(str(exc))


@app.command("doctor", **HYDRA_ARGS)
def doctor(ctx: typer.Context) -> None:
    """Check that a training run is correct before running it: ratio 1 at the first update, log-probs independent of
    batching, the zero-noise limit, KL to base, the reward's contract, the paired measure, save -> resume.

    Takes the same overrides as `ddpo train`; builds the run as it would (in a temporary folder, one batch of
    samples) and prints check / measured / threshold / pass. Exit code 1 when a check fails."""
    try:
        cfg = compose("train", list(ctx.args))
        from .doctor import run_doctor  # torch and diffusers load only when the doctor runs

        checks, info = run_doctor(cfg)
    except UserError as exc:
        fail(str(exc))
    table = Table("check", "measured", "threshold", "pass", title="ddpo doctor", title_justify="left")
    for check in checks:
        verdict = {True: "[green]pass[/]", False: "[bold red]FAIL[/]", None: "n/a"}[check.passed]
        table.add_row(check.name, escape(check.measured), check.threshold, verdict)
    for name, value in info:
        table.add_row(name, value, "", "info")
    Console().print(table)
    failed = [check.name for check in checks if check.passed is False]
    if failed:
        print_error(f"{len(failed)} check{'s' * (len(failed) > 1)} failed: {', '.join(failed)}")
        raise typer.Exit(1)


@app.command("serve-reward", **HYDRA_ARGS)
def serve_reward(ctx: typer.Context,
                 host: str = typer.Option(None, help="Address to listen on (server.host; 0.0.0.0: all)"),
                 port: int = typer.Option(None, help="Port (server.port)")) -> None:
    """Serve a reward over HTTP for `reward=remote reward.url=http://<host>:<port>` (LitServe; JSON, no pickle).

    `ddpo serve-reward reward=aesthetic --host 0.0.0.0 --port 8100 server.devices=2`. Other keys: server.* in
    conf/serve_reward.yaml (batching, limits, devices)."""
    overrides = [*ctx.args, *([f"server.host={host}"] if host else []), *([f"server.port={port}"] if port else [])]
    try:
        cfg = compose("serve_reward", overrides)
        try:
            from .reward_server import serve  # litserve and torch load only when a server starts
        except ImportError as exc:
            raise UserError(f"ddpo serve-reward needs {exc.name or 'litserve'}: pip install 'ddpo-cli[serve]'") \
                from None
        serve(cfg)
    except UserError as exc:
        fail(str(exc))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
