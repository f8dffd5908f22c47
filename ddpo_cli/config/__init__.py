"""Configs: the typed schema, composition, the checks, and a training run's plan.

- :mod:`.schema`: the dataclasses of every command's config (registered in Hydra's ConfigStore);
- :mod:`.compose`: composing as Hydra does, building and checking ``_target_`` nodes, the YAML resolvers;
- :mod:`.checks`: value checks of the shared sections and of the rules between parts (a part checks its own);
- :mod:`.plan`: :func:`plan_run`, everything a training run needs, built once before anything is written;
- :mod:`.run_defaults`: ``ddpo sample`` / ``ddpo eval`` taking a run's own settings.
"""
from .compose import build, check_target, compose, conf_dir, config_groups, group_option
from .plan import Counts, RunPlan, derive_counts, plan_run, validate
from .schema import TinyModelConfig

__all__ = ["Counts", "RunPlan", "TinyModelConfig", "build", "check_target", "compose", "conf_dir", "config_groups",
           "derive_counts", "group_option", "plan_run", "validate"]
