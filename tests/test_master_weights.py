"""fp32 master weights (model.master_weights): small updates to bf16 weights accumulate instead of rounding away."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ember.methods.training import StepOutput, train_loop


def _train_ones_bf16(master: bool, steps: int = 10) -> torch.Tensor:
    """AdamW on bf16 ones with gradient 1: each step moves an element by about lr = 1e-3, under half a
    bf16 step at 1.0 (2**-8)."""
    p = nn.Parameter(torch.ones(64, dtype=torch.bfloat16), requires_grad=False)
    rep = train_loop("toy", {}, [("w", p)], steps, lambda _: StepOutput(p.float().sum(), {}), lr=1e-3,
                     master_weights=master)
    assert rep.status == "ok" and rep.steps == steps
    return p.detach()


def test_bf16_updates_below_half_a_step_round_away_without_master_weights() -> None:
    assert torch.equal(_train_ones_bf16(master=False), torch.ones(64, dtype=torch.bfloat16))


def test_master_weights_accumulate_them() -> None:
    # a constant gradient makes every Adam step exactly lr: ten steps take the float32 copy to 0.99
    assert torch.all(_train_ones_bf16(master=True) == torch.tensor(0.99).to(torch.bfloat16))


def test_master_weights_leave_float32_training_unchanged() -> None:
    a = nn.Parameter(torch.linspace(-1, 1, 64), requires_grad=False)
    b = nn.Parameter(a.detach().clone(), requires_grad=False)
    for p, master in ((a, False), (b, True)):
        train_loop("toy", {}, [("w", p)], 5, lambda _, p=p: StepOutput((p ** 2).sum(), {}), lr=1e-2,
                   master_weights=master)
    assert torch.equal(a.detach(), b.detach())


@pytest.mark.slow
def test_relearning_a_bf16_model_with_master_weights_moves_more_weights(tiny) -> None:
    from ember.attacks import AttackContext
    from ember.attacks.relearn import relearn_model
    from ember.data import ConceptStore
    from ember.paths import STARTER_DIR

    concept = ConceptStore(STARTER_DIR).concept("Harry Potter")
    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    settings = {"name": "full", "max_paragraphs": 2, "epochs": 3, "lr": 3e-5, "max_grad_norm": 0}
    changed = {}
    for master in (False, True):
        ctx = AttackContext(max_questions=4, master_weights=master)
        res, trained = relearn_model(model, tiny.tokenizer, concept, settings, ctx)
        assert res.status == "ok" and res.extra["master_weights"] is master
        changed[master] = sum(int((a != b).sum()) for a, b in zip(model.parameters(), trained.parameters(), strict=True))
    assert changed[True] > changed[False]
