"""Negative preference optimisation (NPO, Zhang et al. 2024) against the model as handed in.

Forget loss per batch: mean over sequences of ``-(2/beta) * logsigmoid(-beta * (logp_theta - logp_ref))``
with ``logp`` the summed token log-probability of the sequence (padding excluded), plus an optional
``retain_weight * NLL(retain batch)`` (open-unlearning's NPO: beta 0.1, retain NLL weight 1).

The reference is the model exactly as handed to the method (after the EMBER edit when ``ember=on``,
as in the paper). Its log-probabilities are computed ONCE, before the first update, for the fixed
forget batches and kept as a small tensor per batch; no second model is held in memory.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ember.methods.base import Method, MethodContext, MethodReport, register_method
from ember.methods.training import (
    LM_DEFAULTS,
    BatchCycler,
    LMUnlearningMethod,
    StepOutput,
    check_non_negative,
    check_positive,
    mean_nll,
    sequence_logprob,
)


@register_method
class NPO(LMUnlearningMethod, Method):
    name = "npo"
    defaults: dict[str, Any] = {**LM_DEFAULTS, "beta": 0.1, "forget_weight": 1.0, "retain_weight": 1.0}

    def check_params(self) -> None:
        self.check_lm_params()
        check_positive(self.params, "beta")
        check_non_negative(self.params, "forget_weight")
        check_non_negative(self.params, "retain_weight")

    @staticmethod
    @torch.no_grad()
    def reference_logprobs(model: torch.nn.Module, batches: list, needed: set[int]) -> dict[int, torch.Tensor]:
        """Summed sequence log-probs of the model as it is now, one (B,) tensor per needed batch."""
        return {i: sequence_logprob(model, batches[i]).detach() for i in sorted(needed)}

    def apply(self, ctx: MethodContext) -> MethodReport:
        torch.manual_seed(ctx.seed)
        p = self.params
        params = self.trainable_params(ctx.model, ctx.facts.n_layers)
        fbatches = self.batches(ctx, ctx.forget_texts, ctx.seed, "forget")
        forget = BatchCycler(fbatches, ctx.seed)
        # before any update, for exactly the batches the run will visit
        ref = self.reference_logprobs(ctx.model, fbatches, set(forget.schedule(p["steps"])))
        beta, gamma, alpha = p["beta"], p["forget_weight"], p["retain_weight"]
        retain = BatchCycler(self.batches(ctx, ctx.retain_texts, ctx.seed + 1, "retain"), ctx.seed + 1) \
            if alpha > 0 else None

        def step(_: int) -> StepOutput:
            i, fb = forget.next()
            logratio = sequence_logprob(ctx.model, fb) - ref[i]
            npo = (-2.0 / beta) * F.logsigmoid(-beta * logratio).mean()
            loss = gamma * npo
            parts = {"npo": float(npo.detach()), "log_ratio": float(logratio.detach().mean())}
            if retain is not None:
                _, rb = retain.next()
                r_nll = mean_nll(ctx.model, rb)
                loss = loss + alpha * r_nll
                parts["retain_nll"] = float(r_nll.detach())
            return StepOutput(loss, parts)

        return self.run(ctx, params, step, extra={"reference_batches": len(ref)})
