"""What every update rule declares, so that the trainer never switches on which algorithm it runs.

- ``rollout``: how it gets its data. ``sample``: sample chains with log-probs, score them, then update on the stored
  (sample, step) pairs; ``backprop``: generate with the autograd graph kept and backpropagate the reward;
  ``none``: sample and score only (the control run of a comparison).
- ``targets`` (sample rollouts): what the gathered rewards become per sample, ``advantages`` (per-prompt, batch or
  group normalisation, ``advantage.mode``) or the algorithm's own (:meth:`targets_from_rewards`: ``weights`` for
  RWR, ``pairs`` for online DPO); a control run (``advantage.shuffle``) scrambles them with :meth:`shuffled`.
- ``trains_on``: ``chain``, the stored steps of the sampled chains (log-probs, the recorded outputs), or
  ``forward``, the samples' clean latents noised afresh by the forward process at ``times_per_sample`` drawn noise
  levels (:mod:`ddpo_cli.algorithms.forward`: any sampler, deterministic ones included).
- ``old_policy``: ``None``, or ``(increment, max)`` for an algorithm that keeps a slowly updated copy of the trained
  weights (updated after each epoch's updates, ``old <- eta old + (1 - eta) theta`` with
  ``eta = min(increment x epochs so far, max)``); ``samples_with_old_policy``: the chains are drawn with it.
- ``needs``: the per-pair tensors its ``loss`` takes as keyword arguments, besides the targets (named
  ``advantages`` / ``weights``). The trainer computes exactly these:

  ``log_prob``      [P]  log-prob of the stored step under the current policy (with gradient)
  ``old_log_prob``  [P]  log-prob recorded when sampling
  ``mean`` / ``std``      the current policy's step Gaussian ([P,C,h,w] / [P,1,1,1])
  ``output``        [P,C,h,w]  the current denoiser output after CFG
  ``base_mean`` / ``base_output``  the same for the base model (LoRA off, or the weights as loaded; no gradient)
  ``errors``        [P]  the family's denoising loss on the sample's clean latents at a random noise level
  ``clean_estimate``      [P,C,h,w]  the clean latents the current policy's output implies at the stored step
  ``old_clean_estimate``  [P,C,h,w]  the same from the output recorded when sampling (the old policy)
  ``clean_latents``       [P,C,h,w]  the sample's final latents
  ``old_mean``            [P,C,h,w]  the step mean of the output recorded when sampling (the old policy's)

  Forward-process algorithms (``trains_on = "forward"``) get, at the pair's fresh noise level and noise:

  ``prediction`` / ``target``       the current denoiser output (guidance ``algo.guidance``) and its regression
                                    target (noise, v or velocity: the family's training loss)
  ``old_prediction``                the old policy's output (no gradient)
  ``base_prediction``               the base model's (LoRA off, or the weights as loaded; no gradient)
  ``partner_prediction`` / ``partner_target`` / ``partner_base_prediction``  the same for the pair's partner sample
                                    (``targets = "pairs"``) at the same noise level and noise; its policy side has
                                    no gradient (the partner's own row carries it)

A backprop algorithm's ``loss(rewards)`` takes the rewards of images generated with the graph kept.
``check(cfg, reward)`` validates the algorithm's settings against the run (raise UserError) before anything starts.
"""
from __future__ import annotations

import numpy as np

from ..errors import UserError
from ..samplers import SAMPLERS, noise_key, policy_samplers, stochastic_steps


class Algorithm:
    rollout: str = "sample"
    targets: str = "advantages"
    trains_on: str = "chain"
    needs: tuple[str, ...] = ("log_prob", "old_log_prob")
    old_policy: tuple[float, float] | None = None
    samples_with_old_policy: bool = False

    def __init__(self, name: str) -> None:
        self.name = name

    def check(self, cfg, reward) -> None:
        """Sample-based algorithms need a stochastic policy (the log-prob divides by the step's std), and one whose
        log-prob the update recomputes exactly as sampling computed it."""
        s = cfg.sampler
        if not stochastic_steps(s) and s.sde_window:
            raise UserError(f"sampler.sde_window={list(s.sde_window)} holds no stochastic step of sampler={s.name} "
                            f"(the final step of a flow sampler is always the Euler step), and the policy needs "
                            f"noise: move the window earlier")
        if not stochastic_steps(s):
            key, kind = noise_key(s.name), SAMPLERS[s.name].model_kind
            raise UserError(f"sampler={s.name} (sampler.{key}={s[key]}) has no stochastic step, and the policy needs "
                            f"noise: use sampler.{key} > 0 with one of {', '.join(policy_samplers(kind))} (DDPO's "
                            f"eta is 1.0)")
        if "log_prob" not in self.needs and "old_clean_estimate" not in self.needs:
            return
        if not cfg.train.guidance_in_training and cfg.sampler.guidance_scale != 1:
            raise UserError(f"train.guidance_in_training=false trains a policy without the guidance the samples were drawn with "
                            f"(sampler.guidance_scale={cfg.sampler.guidance_scale}), so its log-probs are not the "
                            f"sampler's: keep train.guidance_in_training=true, or sample with sampler.guidance_scale=1")
        if cfg.model.use_lora and cfg.model.lora.dropout > 0:
            raise UserError(f"model.lora.dropout={cfg.model.lora.dropout}: dropout in training but not in sampling "
                            f"makes the recomputed log-probs differ from the sampled ones; use 0 with {self.name}")

    def targets_from_rewards(self, rewards: np.ndarray, group_size: int) -> np.ndarray:
        """Per-sample targets ``[N]`` (or ``[N, k]``) of an algorithm whose ``targets`` are not advantages."""
        raise NotImplementedError

    def shuffled(self, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The control run's targets: the same values given to other samples, so that they cannot teach."""
        return targets[rng.permutation(len(targets))]

    def warnings(self, cfg, counts) -> list[str]:
        """Settings that run but change what the algorithm means (printed at start-up)."""
        return []
