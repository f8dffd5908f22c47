"""What the samplers share: an SDE window over their stochastic steps, and the form of those steps' log-probs."""
from __future__ import annotations

import torch

from ..errors import UserError
from .gaussian import LOG_PROB_FORMS, step_log_prob
from .window import SDEWindow


class StochasticChain:
    """A chain whose steps inside ``window`` may be stochastic Gaussian policy steps, scored in ``log_prob_form``
    (``exact`` or ``unscaled``, :func:`~ddpo_cli.samplers.gaussian.step_log_prob`)."""

    window: SDEWindow
    log_prob_form: str = "exact"
    evaluated_with: str | None = None   # the sampler ``ddpo eval`` uses for runs of this one (None: this one)
    noise_key: str = "eta"              # the setting that gives its stochastic steps their noise (0: none)
    deterministic_names: tuple[str, ...] = ()  # names of this class that never have a stochastic step

    @classmethod
    def check(cls, s) -> None:
        """The settings every sampler shares (``s``: the sampler config). UserError naming the key."""
        checks = [
            (s.num_steps >= 1, f"sampler.num_steps={s.num_steps}: use at least 1"),
            (s.guidance_scale >= 0, f"sampler.guidance_scale={s.guidance_scale}: use >= 0 (1 = no guidance; negative "
                                    f"values push away from the prompt)"),
            (s.sde_window is None or (len(s.sde_window) == 2 and 0 <= s.sde_window[0] < s.sde_window[1] <= s.num_steps),
             f"sampler.sde_window={s.sde_window}: use [first, end) step indices with 0 <= first < end <= "
             f"sampler.num_steps={s.num_steps}, or null for every step"),
            (s.sde_window_slide_every >= 0, f"sampler.sde_window_slide_every={s.sde_window_slide_every}: use >= 0"),
            (s.log_prob in LOG_PROB_FORMS, f"sampler.log_prob={s.log_prob!r}: choose {' or '.join(LOG_PROB_FORMS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def set_epoch(self, epoch: int) -> None:
        """A sliding SDE window moves."""
        self.window.set_epoch(epoch)

    def log_prob(self, x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """``[N]`` log-prob of the draws ``x_next`` of stochastic steps ``N(mean, std^2)`` (fp32)."""
        return step_log_prob(self.log_prob_form, x_next, mean, std)
