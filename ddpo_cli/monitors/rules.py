"""``monitor.stop_when`` and ``checkpoint.best_by``: pure functions of the checks so far.

A check is a dict of named values (the monitors' and the epoch's ``kl_to_base`` and ``reward_mean``). A rule names
one value and one condition; it fires when the condition held on each of its last ``checks`` checks:

- ``above: x`` / ``below: x``: the value is above / below x;
- ``below_best_by: x``: the value is more than x below the best (largest) it had up to that check;
- ``below_base_fraction: f``: the value is below f times the base model's (drawn at the start).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..errors import UserError

CONDITIONS = ("above", "below", "below_best_by", "below_base_fraction")


@dataclass(frozen=True)
class StopRule:
    metric: str
    above: Optional[float] = None
    below: Optional[float] = None
    below_best_by: Optional[float] = None
    below_base_fraction: Optional[float] = None
    checks: int = 1

    @property
    def condition(self) -> tuple[str, float]:
        return next((name, getattr(self, name)) for name in CONDITIONS if getattr(self, name) is not None)

    def describe(self) -> str:
        name, x = self.condition
        text = {"above": f"{self.metric} > {x:g}", "below": f"{self.metric} < {x:g}",
                "below_best_by": f"{self.metric} < its best - {x:g}",
                "below_base_fraction": f"{self.metric} < {x:g} x the base model's"}[name]
        return text + (f" on {self.checks} checks in a row" if self.checks > 1 else "")


def parse_rules(nodes: list, known: set[str]) -> list[StopRule]:
    """``monitor.stop_when`` checked: each rule a dict with ``metric`` (one of ``known``), exactly one condition and
    ``checks >= 1``. UserError naming the rule otherwise."""
    rules = []
    for i, node in enumerate(nodes):
        where = f"monitor.stop_when[{i}]"
        if not isinstance(node, dict) or "metric" not in node:
            raise UserError(f"{where}={node!r}: give a dict like {{metric: dark_fraction, above: 0.8}}")
        unknown = set(node) - {"metric", "checks", *CONDITIONS}
        if unknown:
            raise UserError(f"{where} has unknown keys {sorted(unknown)}: use metric, checks and one of "
                            f"{', '.join(CONDITIONS)}")
        try:
            rule = StopRule(**node)
        except TypeError as exc:
            raise UserError(f"{where}: {exc}") from None
        given = [name for name in CONDITIONS if getattr(rule, name) is not None]
        if len(given) != 1:
            raise UserError(f"{where} sets {given or 'no condition'}: give exactly one of {', '.join(CONDITIONS)}")
        if rule.metric not in known:
            raise UserError(f"{where}.metric={rule.metric!r}: the monitors measure {', '.join(sorted(known))}; add "
                            f"the monitor that measures it (monitor=[...]) or name one of these")
        if not isinstance(rule.checks, int) or rule.checks < 1:
            raise UserError(f"{where}.checks={rule.checks}: use an integer >= 1")
        rules.append(rule)
    return rules


def breached(rule: StopRule, values: list[float], base: Optional[float]) -> bool:
    """Whether the condition holds at the last of ``values`` (this metric at every check so far, oldest first)."""
    name, x = rule.condition
    value = values[-1]
    if value is None or not math.isfinite(value):
        return False
    if name == "above":
        return value > x
    if name == "below":
        return value < x
    if name == "below_best_by":
        return value < max(v for v in values if v is not None and math.isfinite(v)) - x
    return base is not None and value < x * base


def fired(rules: list[StopRule], history: list[dict], base: dict) -> Optional[StopRule]:
    """The first rule whose condition held on each of its last ``checks`` checks (None if none did)."""
    for rule in rules:
        series = [check.get(rule.metric) for check in history]
        if len(series) >= rule.checks and all(breached(rule, series[:end], base.get(rule.metric))
                                              for end in range(len(series) - rule.checks + 1, len(series) + 1)):
            return rule
    return None


def is_new_best(history: list[dict], metric: str, mode: str) -> bool:
    """Whether the last check's ``metric`` beats every earlier one (``mode`` max or min); False when it is missing."""
    values = [check.get(metric) for check in history]
    last = values[-1] if values else None
    if last is None or not math.isfinite(last):
        return False
    earlier = [v for v in values[:-1] if v is not None and math.isfinite(v)]
    return not earlier or (last > max(earlier) if mode == "max" else last < min(earlier))
