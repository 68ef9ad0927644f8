"""Small model helpers the white-box attacks share (backbone, final norm, unembedding)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack that returns ``last_hidden_state`` (``model.model`` for HF causal LMs)."""
    base = getattr(model, "model", None)
    if base is None:
        raise RuntimeError(f"{type(model).__name__} has no .model backbone")
    inner = getattr(base, "language_model", None)  # multimodal wrappers (Gemma-3 4B+)
    return inner if inner is not None and hasattr(inner, "layers") else base


def final_norm(model: nn.Module) -> nn.Module:
    base = backbone(model)
    for name in ("norm", "final_layernorm", "ln_f"):
        mod = getattr(base, name, None)
        if mod is not None:
            return mod
    raise RuntimeError(f"cannot find the final norm of {type(model).__name__}")


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Unembed already-normed hidden states (with Gemma's final logit soft-capping where set)."""
    logits = model.get_output_embeddings()(hidden)
    cfg: Any = getattr(model, "config", None)
    cap = getattr(cfg, "final_logit_softcapping", None) or getattr(getattr(cfg, "text_config", None),
                                                                     "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
