"""What the samplers share: an SDE window over their stochastic steps, and the form of those steps' log-probs."""
from __future__ import annotations

import torch

from .gaussian import step_log_prob
from .window import SDEWindow


class StochasticChain:
    """A chain whose steps inside ``window`` may be stochastic Gaussian policy steps, scored in ``log_prob_form``
    (``exact`` or ``unscaled``, :func:`~ddpo_cli.samplers.gaussian.step_log_prob`)."""

    window: SDEWindow
    log_prob_form: str = "exact"

    def set_epoch(self, epoch: int) -> None:
        """A sliding SDE window moves."""
        self.window.set_epoch(epoch)

    def log_prob(self, x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """``[N]`` log-prob of the draws ``x_next`` of stochastic steps ``N(mean, std^2)`` (fp32)."""
        return step_log_prob(self.log_prob_form, x_next, mean, std)
