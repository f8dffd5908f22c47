"""How a batch's noise is drawn: plain (every image its own), grouped (a group shares its initial noise), branched
(a group also shares every step's noise but one trained step's) or antithetic (mirrored pairs)."""
from __future__ import annotations

from .errors import UserError


def check_noise(sampler_cfg, advantage_mode: str) -> None:
    """The noise strategy's settings (``sampler.group_size``, ``sampler.branch``, ``sampler.antithetic``) against the
    advantages that compare a group's images. UserError naming the key."""
    s = sampler_cfg
    if s.branch and advantage_mode != "group":
        raise UserError(f"sampler.branch=true compares the images of a group, which differ only at one step: use "
                        f"advantage.mode=group (not {advantage_mode}) with sampler.group_size > 1")
    if s.antithetic and not (s.group_size % 2 == 0 and not s.branch and advantage_mode == "group"):
        raise UserError(f"sampler.antithetic=true pairs the images of a group (same initial noise) and takes each "
                        f"pair's baseline from the rest of its group: use an even sampler.group_size (not "
                        f"{s.group_size}), advantage.mode=group (not {advantage_mode}) and sampler.branch=false")
