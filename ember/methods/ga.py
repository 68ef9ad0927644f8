"""Gradient ascent (GA): maximise the language-model loss on the concept's sentences.

Loss per step: ``-NLL(forget batch)`` (mean over non-padding tokens), AdamW on the parameters whose
names match ``trainable`` (default: the gated-MLP weights of every layer). Unbounded by design: the
loss guard stops a run whose loss becomes NaN/inf or explodes.
"""

from __future__ import annotations

from typing import Any

import torch

from ember.methods.base import Method, MethodContext, MethodReport, register_method
from ember.methods.training import LM_DEFAULTS, BatchCycler, LMUnlearningMethod, StepOutput, mean_nll


@register_method
class GradientAscent(LMUnlearningMethod, Method):
    name = "ga"
    defaults: dict[str, Any] = dict(LM_DEFAULTS)

    def check_params(self) -> None:
        self.check_lm_params()

    def apply(self, ctx: MethodContext) -> MethodReport:
        torch.manual_seed(ctx.seed)
        params = self.trainable_params(ctx.model, ctx.facts.n_layers)
        forget = BatchCycler(self.batches(ctx, ctx.forget_texts, ctx.seed, "forget"), ctx.seed)

        def step(_: int) -> StepOutput:
            _, b = forget.next()
            nll = mean_nll(ctx.model, b)
            return StepOutput(-nll, {"forget_nll": float(nll.detach())})

        return self.run(ctx, params, step)
