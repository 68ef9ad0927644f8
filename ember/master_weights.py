"""fp32 master copies for training low-precision weights (``model.master_weights``, off by default).

The reference trains its bf16 models with AdamW directly on the bf16 weights. An AdamW update is
about ``lr`` per element, and a bf16 weight of magnitude w moves only in steps of about w / 128, so
at lr 1e-5 most updates of weights above ~0.003 round away. With master weights on, the optimizer
keeps a float32 copy of every trained tensor, steps that copy with the float32 gradient, and writes
it back (rounded) after each step: small updates accumulate until they move the bf16 weight. It costs
4 bytes per trained element on top of AdamW's state. Off, training is the reference's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeights:
    """Wraps the trained parameters: ``tensors`` go to the optimizer; call ``before_step`` after
    ``backward`` (it moves the gradients to the masters) and ``after_step`` after ``optimizer.step``."""

    def __init__(self, params: Sequence[nn.Parameter], enabled: bool) -> None:
        self.params = list(params)
        self.active = enabled and any(p.dtype in LOW_PRECISION for p in self.params)
        self.masters = ([p.detach().float().clone().requires_grad_(True) for p in self.params]
                        if self.active else list(self.params))

    @property
    def tensors(self) -> list[torch.Tensor]:
        return self.masters

    def before_step(self) -> None:
        if not self.active:
            return
        for m, p in zip(self.masters, self.params, strict=True):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def after_step(self) -> None:
        if not self.active:
            return
        for m, p in zip(self.masters, self.params, strict=True):
            p.copy_(m)

    def zero_grad(self) -> None:
        for t in (*self.params, *self.masters):
            t.grad = None
