"""``reward=mix``: a weighted sum of several rewards, each normalised on its own before weighting.

```yaml
_target_: ddpo_cli.rewards.mix.Mix
normalize: zscore            # default for every component: none | zscore (per batch) | affine (scale * r + shift)
                             #   | range (the reward's declared output_range mapped to [0, 1])
components:
  jpeg:
    weight: 0.5
    reward: {_target_: ddpo_cli.rewards.jpeg.JpegCompressibility}
  aesthetic:
    weight: 1.0
    normalize: affine        # per-component override
    scale: 2.0               # affine: scale * r + shift
    shift: -11.0
    reward: {_target_: ddpo_cli.rewards.aesthetic.Aesthetic}
```

Each component's raw reward is logged as ``info["<name>"]`` and its own extras as ``info["<name>/<key>"]``.
The mix is differentiable iff every component is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .base import Reward

NORMALIZATIONS = ("none", "zscore", "affine", "range")
COMPONENT_KEYS = {"weight", "reward", "normalize", "scale", "shift"}


@dataclass
class Component:
    """One weighted, normalised reward of the mix."""

    name: str
    reward: Reward
    weight: float = 1.0
    normalize: str = "none"
    scale: float = 1.0
    shift: float = 0.0

    def transform(self, values: torch.Tensor) -> torch.Tensor:
        """``[B]`` raw rewards -> ``[B]`` normalised rewards (before the weight)."""
        if self.normalize == "zscore":  # a batch of one becomes 0
            return (values - values.mean()) / (values.std(unbiased=False) + 1e-6)
        if self.normalize == "affine":
            return self.scale * values + self.shift
        if self.normalize == "range":
            low, high = self.reward.output_range
            return (values - low) / (high - low)
        return values


def build_component(name: str, spec, default_normalize: str) -> Component:
    """A config entry ``{weight, reward: {_target_: ...}, normalize?, scale?, shift?}`` -> :class:`Component`."""
    from hydra.utils import instantiate

    unknown = set(spec) - COMPONENT_KEYS
    if unknown or "reward" not in spec:
        raise UserError(f"reward.components.{name} needs a 'reward: {{_target_: ...}}' entry and only the keys "
                        f"{sorted(COMPONENT_KEYS)} (got {sorted(map(str, spec))})")
    reward = spec["reward"]
    reward = reward if isinstance(reward, Reward) else instantiate(reward)  # already built if hydra recursed
    if not isinstance(reward, Reward):
        raise UserError(f"reward.components.{name}.reward built a {type(reward).__name__}, not a Reward")
    normalize = str(spec.get("normalize", default_normalize))
    if normalize not in NORMALIZATIONS:
        raise UserError(f"reward.components.{name}.normalize={normalize!r}: choose one of {NORMALIZATIONS}")
    if normalize == "range" and (None in reward.output_range or reward.output_range[0] >= reward.output_range[1]):
        raise UserError(f"reward.components.{name}.normalize=range needs a bounded output range, but "
                        f"{reward.name} declares {reward.output_range}: use zscore or affine for it")
    return Component(name, reward, float(spec.get("weight", 1.0)), normalize, float(spec.get("scale", 1.0)),
                     float(spec.get("shift", 0.0)))


class Mix(Reward):
    """``sum_k weight_k * normalize_k(reward_k)``; ``normalize`` is the default for components that set none."""

    name = "mix"

    def __init__(self, components: dict | None = None, normalize: str = "none") -> None:
        super().__init__()
        if not components:
            raise UserError("reward=mix needs reward.components: {name: {weight: 1.0, reward: {_target_: ...}}}")
        if normalize not in NORMALIZATIONS:
            raise UserError(f"reward.normalize={normalize!r}: choose one of {NORMALIZATIONS}")
        self.components = [build_component(str(name), spec, normalize) for name, spec in components.items()]
        self.differentiable = all(c.reward.differentiable for c in self.components)

    def load(self) -> None:
        for component in self.components:
            component.reward.setup(self.device, self.dtype)

    def score(self, images, prompts, metadata):
        total, info = torch.zeros(images.shape[0], device=images.device), {}
        for c in self.components:
            raw, extras = c.reward(images, prompts, metadata)  # [B]
            raw = raw.to(images.device)
            info[c.name] = raw.detach().tolist()
            info.update({f"{c.name}/{key}": value for key, value in extras.items()})
            total = total + c.weight * c.transform(raw)
        return total, info
