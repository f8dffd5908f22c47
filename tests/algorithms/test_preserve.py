"""Prior preservation (``train.preserve``): the policy's guided output on other prompts is held at the base model's."""
from __future__ import annotations

import pytest
import torch

from ddpo_cli.config import compose, plan_run
from ddpo_cli.errors import UserError
from ddpo_cli.rollout import preservation_drift

from conftest import lora_and_frozen_grads, perturb_lora


def test_the_preserved_set_leaves_out_the_runs_own_prompts():
    one_prompt = ["prompts.low=3", "prompts.high=3", "prompts.colours=[red]", "prompts.shapes=[square]"]
    plan = plan_run(compose("train", ["experiment=quickstart", *one_prompt, "train.preserve.weight=10",
                                      "train.preserve.prompts=shapes_train"]))
    assert len(plan.preserve) == 37 and "three red squares" not in plan.preserve
    assert plan_run(compose("train", ["experiment=quickstart"])).preserve is None


@pytest.mark.parametrize("overrides, message", [
    (["train.preserve.weight=10"], "train.preserve.prompts"),
    (["train.preserve.weight=-1", "train.preserve.prompts=shapes_train"], "train.preserve.weight=-1"),
    (["train.preserve.weight=10", "train.preserve.prompts=shapes_train", "train.preserve.pairs=0"], "pairs=0"),
    (["train.preserve.weight=10", "train.preserve.prompts=shapes_train", "prompts.low=1", "prompts.high=4",
      "prompts.colours=null", "prompts.shapes=null", "prompts.include_heldout=true"], "only the run's own"),
])
def test_bad_preservation_settings_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        plan_run(compose("train", ["experiment=quickstart", *overrides]))


def test_drift_is_zero_at_the_base_model_and_trains_lora_only(make_trainer):
    trainer = make_trainer("train.preserve.weight=10", "train.preserve.prompts=simple_animals",
                           "prompts=from_list", "prompts.prompts=[a cat]")
    samples, _ = trainer.sample(0)
    rows, cols = torch.tensor([0, 1]), torch.tensor([0, 2])

    def drift_now():
        return preservation_drift(trainer.model, trainer.sampler, trainer.denoiser, trainer.reference,
                                  samples.trajectory, rows, cols, trainer.plan.preserve, 16,
                                  trainer.cfg.sampler.guidance_scale, torch.Generator().manual_seed(0))

    assert drift_now().item() == 0.0   # LoRA B starts at zero: the base model
    perturb_lora(trainer)
    drift = drift_now()
    assert drift.item() > 0
    drift.backward()
    lora, frozen = lora_and_frozen_grads(trainer)
    assert sum(g.abs().sum() for g in lora if g is not None) > 0 and all(g is None for g in frozen)
