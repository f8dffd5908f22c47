"""``cfg.monitor``: the chosen monitors (one ``_target_`` node each, from conf/monitor) beside the settings they share
(train.yaml), checked before a run starts."""
from __future__ import annotations

from ..errors import UserError
from .base import Monitor
from .rules import StopRule, parse_rules

ROW_VALUES = ("kl_to_base", "reward_mean")  # the epoch's own values the rules and best_by may name too
SETTINGS = ("every", "prompts", "images_per_prompt", "batch_size", "stop_when")
OFF = {"every": 0, "prompts": 1, "images_per_prompt": 1, "batch_size": 1, "stop_when": []}  # a config without them


def split_monitor_node(node: dict) -> tuple[dict, dict]:
    """``cfg.monitor`` (as a container) -> (settings, {name: monitor node}); UserError for a key that is neither.
    A config that sets no ``every`` monitors nothing."""
    settings = {key: node[key] for key in SETTINGS if key in node} if "every" in node else dict(OFF)
    monitors = {key: value for key, value in node.items() if key not in SETTINGS}
    for name, value in monitors.items():
        if not isinstance(value, dict) or "_target_" not in value:
            raise UserError(f"monitor.{name}={value!r}: not a setting ({', '.join(SETTINGS)}) nor a monitor "
                            f"(conf/monitor, a _target_ node)")
    return settings, monitors


def check_settings(settings: dict, monitors: dict[str, Monitor]) -> list[StopRule]:
    """The settings' values, and the rules against what the chosen monitors measure. UserError if wrong."""
    for key in ("every", "prompts", "images_per_prompt", "batch_size"):
        low = 0 if key == "every" else 1
        if not isinstance(settings[key], int) or settings[key] < low:
            raise UserError(f"monitor.{key}={settings[key]}: use an integer >= {low}")
    grouped = [name for name, m in monitors.items() if m.needs_groups]
    if grouped and settings["images_per_prompt"] < 2:
        raise UserError(f"monitor.images_per_prompt={settings['images_per_prompt']}: monitor {grouped[0]} compares "
                        f"the images of one prompt; use >= 2")
    if settings["every"] == 0 and settings["stop_when"]:
        raise UserError("monitor.stop_when is set but monitor.every=0 checks nothing: set monitor.every >= 1")
    return parse_rules(list(settings["stop_when"]), known_metrics(monitors))


def known_metrics(monitors: dict[str, Monitor]) -> set[str]:
    return {name for m in monitors.values() for name in m.produces} | set(ROW_VALUES)
