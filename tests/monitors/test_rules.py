"""monitor.stop_when and checkpoint.best_by as pure functions of the checks."""
import pytest

from ddpo_cli.errors import UserError
from ddpo_cli.monitors.rules import fired, is_new_best, parse_rules

KNOWN = {"dark_fraction", "gold_reward", "diversity_pixels"}


def test_above_and_below_fire_at_once_and_checks_asks_for_a_run_of_them():
    dark, = parse_rules([{"metric": "dark_fraction", "above": 0.8}], KNOWN)
    assert fired([dark], [{"dark_fraction": 0.5}], {}) is None
    assert fired([dark], [{"dark_fraction": 0.5}, {"dark_fraction": 0.9}], {}) is dark
    twice, = parse_rules([{"metric": "dark_fraction", "above": 0.8, "checks": 2}], KNOWN)
    assert fired([twice], [{"dark_fraction": 0.9}], {}) is None
    assert fired([twice], [{"dark_fraction": 0.9}, {"dark_fraction": 0.5}, {"dark_fraction": 0.9}], {}) is None
    assert fired([twice], [{"dark_fraction": 0.5}, {"dark_fraction": 0.9}, {"dark_fraction": 0.85}], {}) is twice


def test_below_best_by_compares_each_check_with_the_best_before_it():
    rule, = parse_rules([{"metric": "gold_reward", "below_best_by": 0.1, "checks": 2}], KNOWN)
    rising = [{"gold_reward": v} for v in (0.1, 0.2, 0.3)]
    assert fired([rule], rising, {}) is None
    falling = rising + [{"gold_reward": 0.15}]              # 0.15 < 0.3 - 0.1: once
    assert fired([rule], falling, {}) is None
    assert fired([rule], falling + [{"gold_reward": 0.19}], {}) is rule  # twice in a row
    assert fired([rule], falling + [{"gold_reward": 0.25}], {}) is None  # back within 0.1 of the best


def test_below_base_fraction_needs_the_base_value():
    rule, = parse_rules([{"metric": "diversity_pixels", "below_base_fraction": 0.5}], KNOWN)
    assert fired([rule], [{"diversity_pixels": 0.04}], {"diversity_pixels": 0.1}) is rule
    assert fired([rule], [{"diversity_pixels": 0.06}], {"diversity_pixels": 0.1}) is None
    assert fired([rule], [{"diversity_pixels": 0.0}], {}) is None  # no base: cannot say


def test_a_missing_or_non_finite_value_never_fires():
    rule, = parse_rules([{"metric": "dark_fraction", "below": 0.5}], KNOWN)
    assert fired([rule], [{}], {}) is None and fired([rule], [{"dark_fraction": float("nan")}], {}) is None


@pytest.mark.parametrize("node,message", [
    ({"metric": "dark_fraction"}, "sets no condition: give exactly one of above, below"),
    ({"metric": "dark_fraction", "above": 0.8, "below": 0.1}, r"sets \['above', 'below'\]"),
    ({"metric": "brightness", "above": 0.8}, "metric='brightness': the monitors measure dark_fraction, "),
    ({"metric": "dark_fraction", "above": 0.8, "checks": 0}, "checks=0: use an integer >= 1"),
    ({"metric": "dark_fraction", "over": 0.8}, r"unknown keys \['over'\]"),
    ("dark_fraction > 0.8", "give a dict like"),
])
def test_a_wrong_rule_is_one_line_naming_it(node, message):
    with pytest.raises(UserError, match=r"monitor.stop_when\[0\].*" + message):
        parse_rules([node], KNOWN)


def test_describe_says_the_rule_in_words():
    rule, = parse_rules([{"metric": "gold_reward", "below_best_by": 0.05, "checks": 3}], KNOWN)
    assert rule.describe() == "gold_reward < its best - 0.05 on 3 checks in a row"


def test_best_by_max_and_min():
    history = [{"gold_reward": 0.2}, {"gold_reward": 0.5}]
    assert is_new_best(history[:1], "gold_reward", "max") and is_new_best(history, "gold_reward", "max")
    assert not is_new_best(history, "gold_reward", "min")
    assert not is_new_best(history + [{"gold_reward": 0.5}], "gold_reward", "max")  # a tie keeps the first
    assert not is_new_best(history + [{}], "gold_reward", "max")
