"""Composing configs as Hydra does (tests and read-only commands), building ``_target_`` nodes, and the checks of
their keys; the resolvers the YAML files use; the command line's conveniences."""
from __future__ import annotations

import importlib
import inspect
import logging
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..errors import UserError, brief
from . import schema  # noqa: F401  (registers the schemas that the YAML files name)

RENAMED = {"train.cfg": "train.guidance_in_training", "train.mixed_precision": "precision"}  # old key -> new key


def conf_dir() -> Path:
    """The config tree: the repository's conf/ in a source checkout, else the copy shipped as ddpo_cli.conf."""
    source = Path(__file__).resolve().parents[2] / "conf"
    if (source / "train.yaml").exists():
        return source
    return Path(str(resources.files("ddpo_cli.conf")))


LAUNCH_CONFIGS = "accelerate"  # conf/accelerate/: `accelerate launch --config_file` files, not a Hydra group


def config_groups() -> list[str]:
    """ddpo's config groups (model, reward, algo, ...): not conf/accelerate/, nor conf/hydra/ (Hydra's own groups,
    e.g. the launcher presets)."""
    return sorted(p.name for p in conf_dir().iterdir()
                  if p.is_dir() and not p.name.startswith(("_", ".")) and p.name not in (LAUNCH_CONFIGS, "hydra"))


def compose(config_name: str, overrides: list[str], config_dir: Path | None = None,
            return_hydra_config: bool = False) -> DictConfig:
    """Compose the config as Hydra would (no run directory); ``config_dir`` is a user's extra config folder
    (``-cd``), searched after the built-in tree; ``return_hydra_config`` adds the ``hydra`` section (run folders).
    Raises UserError with a one-line reason."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [o for o in overrides if not o.startswith("hydra.")]
    if config_dir is not None:
        overrides.append(f"hydra.searchpath=[file://{Path(config_dir).resolve()}]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides,
                                 return_hydra_config=return_hydra_config)
    except UserError:
        raise
    except Exception as exc:  # Hydra and OmegaConf errors: keep the most specific line
        raise UserError(config_error_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()


def config_error_line(exc: BaseException) -> str:
    """Hydra's or OmegaConf's error as one line: its first line and the key; a renamed key names its new name."""
    cause = exc.__cause__ or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    head = lines[0] if lines else type(cause).__name__
    full_key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), "")
    if full_key in RENAMED:
        return f"{full_key} is now {RENAMED[full_key]}: write {RENAMED[full_key]}=<value> instead"
    if "hydra/launcher/submitit" in head:
        return "the submitit launchers need hydra-submitit-launcher: pip install 'ddpo-cli[cluster]'"
    hint = "see the options with `ddpo ls` and the keys with `ddpo train --cfg job`"
    return f"invalid config: {head}{f' (key: {full_key})' if full_key else ''}; {hint}"


def group_option(group: str, name: str, config_dir: Path | None = None) -> DictConfig:
    """The config of option ``name`` of ``group`` (e.g. a reward named on the command line), looked up like
    ``group=name`` would be: the built-in tree first, then the user's ``-cd`` folder."""
    try:
        return compose("train", [f"{group}={name}"], config_dir)[group]
    except UserError:
        known = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
        raise UserError(f"unknown {group} '{name}': choose one of {', '.join(known)} (or give a _target_ node)") \
            from None


def build(node: DictConfig, where: str):
    """Instantiate a ``_target_`` node; the target's own UserError (or ValueError/TypeError) becomes one line
    naming the group, not Hydra's wrapped traceback."""
    hydra_log = logging.getLogger("hydra.utils")  # it logs a failed get_method besides raising it
    hydra_log.disabled = True
    try:
        return instantiate(node, _convert_="all")
    except (InstantiationException, UserError, ValueError, TypeError) as exc:
        cause = exc.__cause__ or exc
        message = brief(cause)
        raise UserError(message if isinstance(cause, UserError) else f"{where}: {message}") from None
    finally:
        hydra_log.disabled = False


def import_target(path: str, where: str):
    module_name, _, attr = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"{where}._target_={path!r} cannot be imported ({exc}): give an importable module.attribute")


def _type_ok(value: Any, annotation: Any) -> bool:
    """Loose runtime check of a YAML value against a simple annotation (int/float/str/bool/list/dict/Optional)."""
    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, str):
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in args)
    if annotation is type(None):
        return value is None
    if isinstance(value, (DictConfig, ListConfig)) and not (isinstance(value, DictConfig) and "_target_" in value):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, DictConfig):  # a nested _target_ node: checked when instantiated
        return True
    base = origin or annotation
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base in (str, bool, list, dict, tuple):
        return isinstance(value, list if base is tuple else base)
    return True


def check_target(node: Any, where: str) -> None:
    """Every key of a ``_target_`` node must be a parameter of the target with a matching simple type."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise UserError(f"{where} has no _target_: pick one with {where}=<option> (see `ddpo ls {where}`)")
    target = import_target(node._target_, where)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    params = signature.parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target) if params else {}
    for key in node:
        if str(key).startswith("_"):
            continue
        if key not in params:
            if accepts_any:
                continue
            raise UserError(f"{where}.{key} is not an option of {node._target_}: known keys are "
                            f"{', '.join(k for k in params if k not in ('self', 'args', 'kwargs')) or 'none'} "
                            f"(drop it with ~{where}.{key})")
        value = node._get_node(key)._value() if OmegaConf.is_interpolation(node, key) else node[key]
        if not OmegaConf.is_interpolation(node, key) and not _type_ok(value, hints.get(key, params[key].annotation)):
            raise UserError(f"{where}.{key}={value!r} has the wrong type: {node._target_} expects "
                            f"{getattr(hints.get(key), '__name__', hints.get(key))}")


def _short_name(target: str) -> str:
    """``ddpo_cli.rewards.jpeg.JpegCompressibility`` -> ``jpeg_compressibility`` (for run names)."""
    name = str(target).rsplit(".", 1)[-1]
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))


def output_dir(command: str, run: Optional[str], sweep: Optional[str], stamp: str) -> str:
    """Hydra's run dir of ``ddpo sample`` / ``ddpo eval``: ``<run>/<command>/<stamp>`` for a run, the multirun dir
    itself for a sweep summary, else ``outputs/<command>/<stamp>``."""
    if sweep:
        return str(Path(sweep))
    if run:
        return str(Path(run) / command / stamp)
    return str(Path("outputs") / command / stamp)


OmegaConf.register_new_resolver("reward_name", _short_name, replace=True)
OmegaConf.register_new_resolver("ddpo_output_dir", output_dir, replace=True)


# ----------------------------------------------------------------------------------------------- command line
def prepare_args(args: list[str], path_keys: tuple[str, ...] = ("run", "sweep", "checkpoint")) -> list[str]:
    """Two conveniences before Hydra parses the arguments:

    - ``run=<existing path>`` is quoted, so paths holding ``=`` or ``,`` (multirun job folders) parse;
    - ``rewards.<name>=...`` becomes ``++rewards.<name>=...`` (add or replace an entry of the ``rewards`` dict).
    """
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in path_keys and value[:1] not in "'\"" and ("=" in value or "," in value) and Path(value).exists():
            quote = '"' if "'" in value else "'"
            arg = f"{key}={quote}{value}{quote}"
        elif sep and key.startswith("rewards."):
            arg = "++" + arg
        out.append(arg)
    return out


def override_keys(overrides: list[str]) -> list[str]:
    """``["sampler.num_steps=8", "model=sd15", "+x=1"]`` -> ``["sampler.num_steps", "model", "x"]``."""
    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra.")])
    return [o.key_or_group for o in parsed]
