"""``ddpo sample`` / ``ddpo eval`` with ``run=<run dir>``: the sections the user did not override are taken from the
run's ``.hydra/config.yaml``, so a checkpoint is sampled with the model, LoRA shape, sampler and prompts it was trained
with; and a run folder is opened like its weights, not like code."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ..errors import UserError
from ..runs import RUN_CONFIG, load_run_config
from .compose import check_target, group_option, override_keys


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
