"""The reference (base) model under full fine-tuning (ddpo_cli/reference.py): a copy of the weights as loaded,
swapped in place. DPO, DPOK, the forward rules' kl_beta and prior preservation read it; with LoRA it is the
adapter-disabled denoiser (tests/algorithms/test_update_rules.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpo_cli.errors import UserError
from ddpo_cli.pairs import draw_forward
from ddpo_cli.reference import loaded_weights, needs_reference
from ddpo_cli.report import read_metrics

FULL = ("model.use_lora=false", "train.lr=1e-3")


def dpo_terms(trainer):
    """DPO's loss terms on the trainer's first two samples, one pair at one shared noise level."""
    samples, _ = trainer.sample(0)
    targets = trainer.training_targets(samples, np.array([1.0, 0.0]), 0)
    trainer.draws = draw_forward(trainer.sampler, 2, 1, trainer.model.latent_shape(), torch.Generator().manual_seed(0),
                                 trainer.device, targets[:, 0])
    return trainer.pair_tensors(samples, targets, torch.arange(2), torch.zeros(2).long())


def test_full_fine_tuning_dpo_starts_at_its_reference_and_keeps_it_while_the_weights_move(make_trainer):
    trainer = make_trainer("algo=dpo", "sampler.group_size=2", *FULL)
    loss, _ = trainer.algo.loss(**dpo_terms(trainer))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)          # policy = reference: the bracket is 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.params)
    with torch.no_grad():
        for p in trainer.params:
            p.add_(1e-2 * torch.randn_like(p))
    moved = [p.detach().clone() for p in trainer.params]
    terms = dpo_terms(trainer)
    _, metrics = trainer.algo.loss(**terms)
    assert metrics["margin"].item() != 0
    assert all(torch.equal(p, m) for p, m in zip(trainer.params, moved))    # swapped back bit for bit
    with torch.no_grad(), trainer.reference():                                # the base model is the loaded one
        assert all(torch.equal(p, c) for p, c in zip(trainer.params, trainer.reference.copy.copies))
    assert not torch.equal(terms["base_prediction"], terms["prediction"].detach())


def test_full_fine_tuning_dpok_trains_with_its_kl_to_the_loaded_weights(make_trainer):
    trainer = make_trainer("algo=dpok", "train.num_epochs=2", *FULL)
    trainer.train()                                  # the graph survives the reference's in-place swaps
    rows = read_metrics(trainer.run_dir)
    assert rows[0]["kl_penalty"] == pytest.approx(0.0, abs=1e-8)          # the first update starts at the base
    assert rows[1]["kl_penalty"] > 0 and rows[1]["kl_to_base"] > 0


def test_a_full_fine_tuning_run_keeps_a_copy_only_when_something_reads_the_base(make_trainer):
    class Rule:
        def __init__(self, *needs):
            self.needs = needs

    assert needs_reference(Rule("log_prob", "base_mean"), preserve=False)
    assert needs_reference(Rule("prediction"), preserve=True)
    assert not needs_reference(Rule("prediction", "old_prediction"), preserve=False)
    trainer = make_trainer("algo=ddpo_is", *FULL)
    assert trainer.reference is None and trainer.kl_reading(trainer.sample(0)[0]) is None
    assert loaded_weights(trainer.model, use_lora=True, needed=True, sharded=False, strategy="ddp") is None
    with pytest.raises(UserError, match="model.use_lora=true"):
        loaded_weights(trainer.model, use_lora=False, needed=True, sharded=True, strategy="fsdp2")
