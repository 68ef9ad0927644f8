"""Gradient difference (GradDiff): ascend on the concept's sentences, descend on neutral ones.

Loss per step: ``-forget_weight * NLL(forget batch) + retain_weight * NLL(retain batch)``
(open-unlearning's ``gamma * forget + alpha * retain`` with the NLL retain loss; both weights 1 by
default). Forget and retain batches cycle independently.
"""

from __future__ import annotations

from typing import Any

import torch

from ember.methods.base import Method, MethodContext, MethodReport, register_method
from ember.methods.training import (
    LM_DEFAULTS,
    BatchCycler,
    LMUnlearningMethod,
    StepOutput,
    check_non_negative,
    mean_nll,
)


@register_method
class GradDiff(LMUnlearningMethod, Method):
    name = "graddiff"
    defaults: dict[str, Any] = {**LM_DEFAULTS, "forget_weight": 1.0, "retain_weight": 1.0}

    def check_params(self) -> None:
        self.check_lm_params()
        check_non_negative(self.params, "forget_weight")
        check_non_negative(self.params, "retain_weight")

    def apply(self, ctx: MethodContext) -> MethodReport:
        torch.manual_seed(ctx.seed)
        params = self.trainable_params(ctx.model, ctx.facts.n_layers)
        forget = BatchCycler(self.batches(ctx, ctx.forget_texts, ctx.seed, "forget"), ctx.seed)
        retain = BatchCycler(self.batches(ctx, ctx.retain_texts, ctx.seed + 1, "retain"), ctx.seed + 1)
        gamma, alpha = self.params["forget_weight"], self.params["retain_weight"]

        def step(_: int) -> StepOutput:
            _, fb = forget.next()
            _, rb = retain.next()
            f_nll, r_nll = mean_nll(ctx.model, fb), mean_nll(ctx.model, rb)
            loss = -gamma * f_nll + alpha * r_nll
            return StepOutput(loss, {"forget_nll": float(f_nll.detach()), "retain_nll": float(r_nll.detach())})

        return self.run(ctx, params, step)
