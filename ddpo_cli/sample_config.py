"""Typed configs of ``ddpo sample`` and ``ddpo eval`` (registered in Hydra's ConfigStore), their checks, and how a
run's own settings become the defaults.

Both commands reuse the groups ``model``, ``sampler``, ``prompts`` and ``reward`` of ``ddpo train``. With
``run=<run dir>`` the sections that the user did not override are taken from the run's ``.hydra/config.yaml``, so a
checkpoint is sampled with the model, LoRA shape, sampler and prompts it was trained with. The checks here run
before Hydra creates an output directory and import no torch unless they must look at checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import MISSING, DictConfig, OmegaConf

from .config import ModelConfig, SamplerConfig, check_model, check_target, group_option, nonfinite_keys
from .errors import UserError
from .runs import RUN_CONFIG, load_run_config, resolve_checkpoint, resolve_checkpoints, sweep_job_dirs


@dataclass
class GenerateConfig:
    """What both commands share: which model and checkpoint, which prompts, how many images, which seeds."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # num_steps, eta, guidance; batch_size per call
    prompts: Any = MISSING
    reward: Any = None
    run: Optional[str] = None         # a run directory written by `ddpo train`
    n: int = 4                        # images per prompt
    num_prompts: Optional[int] = 8    # evenly spaced prompts of the set; null = all
    seed: int = 0                     # image (p, i) uses derive_seed(seed, p, i): the same for every checkpoint
    lora_scale: float = 1.0           # W = W0 + lora_scale * dW (0 = base model, 1 = as trained)
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "auto"           # auto | no | fp16 | bf16 (auto: fp32 on CPU)
    threads: Optional[int] = None     # torch CPU threads; None = torch default
    trust_run: bool = False           # let the run's config name code outside ddpo_cli (its own rewards, prompts)


@dataclass
class SampleConfig(GenerateConfig):
    checkpoint: Optional[str] = "latest"  # latest | none | <epoch number> | epoch_XXXX | a checkpoint folder


@dataclass
class EvalConfig(GenerateConfig):
    num_prompts: Optional[int] = 16
    sweep: Optional[str] = None       # a multirun directory: summarise its jobs instead of evaluating a run
    checkpoints: Any = "latest"       # latest | all | a list of epochs / epoch_XXXX names / checkpoint folders
    rewards: Dict[str, Any] = field(default_factory=dict)  # extra rewards: name -> reward option or _target_ node
    gold: Optional[str] = None        # which reward judges over-optimisation; null = rewards.gold or the first extra
    grid_prompts: int = 4             # prompts shown in the side-by-side grid (comparison.png)
    grid_images: int = 4              # images per prompt and model in that grid (the same seeds for every model)
    diversity_size: int = 32          # images are downsampled to this side before the pairwise distance
    overopt_threshold: float = 1.0    # a change counts when |mean| > threshold x its paired standard error


def register_configs() -> None:
    ConfigStore.instance().store(name="sample_schema", node=SampleConfig)
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


def output_dir(command: str, run: Optional[str], sweep: Optional[str], stamp: str) -> str:
    """Hydra's run dir: ``<run>/<command>/<stamp>`` for a run, the multirun dir itself for a sweep summary, else
    ``outputs/<command>/<stamp>``."""
    if sweep:
        return str(Path(sweep))
    if run:
        return str(Path(run) / command / stamp)
    return str(Path("outputs") / command / stamp)


register_configs()
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


# ----------------------------------------------------------------------------------------------- run defaults
def override_keys(overrides: list[str]) -> list[str]:
    """``["sampler.num_steps=8", "model=sd15", "+x=1"]`` -> ``["sampler.num_steps", "model", "x"]``."""
    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra.")])
    return [o.key_or_group for o in parsed]


RUN_SECTIONS = ("model", "sampler", "prompts", "reward")  # what sample / eval take from a run's config


def foreign_code(node: Any, where: str) -> list[str]:
    """``key=value`` of every place in a config that would import code from outside ``ddpo_cli``: a ``_target_``,
    the ``path`` of ``hydra.utils.get_method`` (custom rewards) or a model family given as a dotted path."""
    if isinstance(node, dict):
        found = []
        target = str(node.get("_target_", "ddpo_cli."))
        if target in ("hydra.utils.get_method", "hydra.utils.get_class"):  # harmless itself: what does it fetch?
            if not str(node.get("path", "")).startswith("ddpo_cli."):
                found.append(f"{where}.path={node.get('path')}")
        elif not target.startswith("ddpo_cli."):
            found.append(f"{where}._target_={target}")
        if where == "model" and "." in str(node.get("family", "")):
            found.append(f"model.family={node['family']}")
        return found + [f for key, value in node.items() for f in foreign_code(value, f"{where}.{key}")]
    if isinstance(node, list):
        return [f for i, value in enumerate(node) for f in foreign_code(value, f"{where}.{i}")]
    return []


def check_trusted(run_cfg: DictConfig, run: str, trust: bool) -> None:
    """Opening a run folder must be as safe as loading its weights: the parts of its config that sample / eval use
    may only name ddpo_cli's own code, unless the user vouches for the folder with ``trust_run=true``."""
    if trust:
        return
    for section in RUN_SECTIONS:
        found = foreign_code(OmegaConf.to_container(run_cfg[section], resolve=False), section) \
            if OmegaConf.select(run_cfg, section) is not None else []
        if found:
            raise UserError(f"the config of {run} names code from outside ddpo_cli ({found[0]}); a run folder from "
                            f"someone else could run anything this way: add trust_run=true only if you trust it, or "
                            f"choose {section}=<option> yourself")


def apply_run_defaults(cfg: DictConfig, overrides: list[str], sections: tuple[str, ...]) -> DictConfig:
    """Replace each section the user did not choose (``model=...``) by the run's, keeping dotted overrides
    (``sampler.num_steps=8``) on top. Returns a new config; ``cfg`` is unchanged."""
    cfg = cfg.copy()
    if not cfg.run:
        return cfg
    run_cfg = load_run_config(cfg.run)
    check_trusted(run_cfg, cfg.run, cfg.trust_run)
    keys = override_keys(overrides)
    for section in sections:
        if section in keys or OmegaConf.select(run_cfg, section) is None:
            continue  # chosen on the command line (or absent from the run): keep the composed section
        merged = OmegaConf.create({section: OmegaConf.to_container(run_cfg[section], resolve=False)})
        for key in keys:
            if key.startswith(section + "."):
                OmegaConf.update(merged, key, OmegaConf.select(cfg, key), force_add=True)
        try:
            current = cfg[section]  # a dataclass section (model, sampler) is merged to keep its type
            typed = isinstance(current, DictConfig) and OmegaConf.get_type(current) is not dict
            cfg[section] = OmegaConf.merge(current, merged[section]) if typed else merged[section]
        except Exception as exc:  # the run was written by an incompatible version of the schema
            raise UserError(f"the {section} section of {cfg.run}/{RUN_CONFIG} does not fit this version's schema "
                            f"({str(exc).splitlines()[0]}): choose it explicitly, e.g. {section}=<option>") from None
    return cfg


# ----------------------------------------------------------------------------------------------- rewards
def user_config_dir() -> Optional[Path]:
    """Inside a Hydra task: the user's extra config folder (``-cd DIR``), if one was given."""
    for source in HydraConfig.get().runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            return Path(source.path)
    return None


def extra_rewards(cfg: DictConfig, config_dir: Optional[Path] = None) -> dict[str, DictConfig]:
    """``rewards`` with option names replaced by their configs (looked up like ``reward=<name>``, so a ``-cd``
    folder's own rewards work too); every node checked against its target."""
    out = {}
    for name, node in (cfg.rewards or {}).items():
        node = group_option("reward", str(node), config_dir) if isinstance(node, str) else node
        check_target(node, f"rewards.{name}")
        out[str(name)] = node
    return out


# ----------------------------------------------------------------------------------------------- validation
def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate_common(cfg: DictConfig) -> None:
    for key in nonfinite_keys(OmegaConf.to_container(cfg, resolve=True))[:1]:
        raise UserError(f"{key}={OmegaConf.select(cfg, key)}: must be a finite number")
    _require(cfg.n >= 1, f"n={cfg.n}: give at least one image per prompt")
    _require(cfg.num_prompts is None or cfg.num_prompts >= 1, f"num_prompts={cfg.num_prompts}: use >= 1 or null")
    _require(cfg.lora_scale >= 0, f"lora_scale={cfg.lora_scale}: use 0 (base) .. 1 (as trained)")
    _require(0 <= cfg.sampler.eta <= 1, f"sampler.eta={cfg.sampler.eta}: use 0 (deterministic) .. 1")
    _require(cfg.sampler.num_steps >= 1, f"sampler.num_steps={cfg.sampler.num_steps}: use at least 1")
    _require(cfg.sampler.batch_size >= 1, f"sampler.batch_size={cfg.sampler.batch_size}: use at least 1")
    _require(cfg.precision in ("auto", "no", "fp16", "bf16"), f"precision={cfg.precision!r}: auto, no, fp16 or bf16")
    _require(cfg.device in ("auto", "cpu", "cuda"), f"device={cfg.device!r}: choose auto, cpu or cuda")
    check_model(cfg.model)
    if cfg.run:
        check_trusted(load_run_config(cfg.run), cfg.run, cfg.trust_run)
    check_target(cfg.prompts, "prompts")
    if cfg.reward is not None:
        check_target(cfg.reward, "reward")


def validate_sample(cfg: DictConfig) -> None:
    """Checks of ``ddpo sample`` before anything is written. Raises UserError."""
    validate_common(cfg)
    resolve_checkpoint(cfg.run, cfg.checkpoint)


def validate_eval(cfg: DictConfig, config_dir: Optional[Path] = None) -> None:
    """Checks of ``ddpo eval`` before anything is written. Raises UserError."""
    if cfg.sweep:
        _require(not cfg.run, "give either run=<run dir> or sweep=<multirun dir>, not both")
        sweep_job_dirs(Path(cfg.sweep))
        return
    _require(bool(cfg.run), "ddpo eval needs run=<run dir> (or sweep=<multirun dir> to summarise a sweep)")
    validate_common(cfg)
    _require(cfg.grid_prompts >= 0 and cfg.grid_images >= 1 and cfg.diversity_size >= 4,
             "grid_prompts must be >= 0, grid_images >= 1, diversity_size >= 4")
    names = set(extra_rewards(cfg, config_dir))
    _require(cfg.gold is None or cfg.gold in names,
             f"gold={cfg.gold!r} is not one of the rewards ({', '.join(sorted(names)) or 'none given'}): "
             f"add it with rewards.{cfg.gold}=<reward option>")
    resolve_checkpoints(cfg.run, cfg.checkpoints)
