"""Monitors: what a run watches besides its reward, on fixed prompts and seeds, and the rules that act on it.

- :mod:`.base`: the interface a monitor implements (one module + one YAML in ``conf/monitor`` each);
- :mod:`.image_stats`, :mod:`.diversity`, :mod:`.gold`: the monitors;
- :mod:`.rules`: ``monitor.stop_when`` and ``checkpoint.best_by`` as pure functions of the checks so far;
- :mod:`.watch`: draws the images every ``monitor.every`` epochs and runs the monitors and the rules.
"""
