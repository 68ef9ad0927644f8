"""The EMBER edit: subtract the selected features' contribution from concept-only token embeddings.

For each eligible token t (concept-only, in V', non-zero G on a selected feature) the effective
embedding moves by ``-delta * sum_{k in S} G[t,k] F[:,k]``. The factorization lives in the
effective space (stored rows times the model's embedding scale), so the stored row moves by that
amount divided by the scale. Tokens are matched by id. Only input embeddings change (untie tied
models first: :func:`ember.models.untie_embeddings`). The rows touched are snapshotted before the
first edit and restored bit-exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ember.features import EmbeddingFeatures, eligible_tokens
from ember.models import embeddings_tied


@dataclass
class EditPlan:
    token_ids: torch.Tensor  # (m,) vocabulary ids
    direction: torch.Tensor  # (m, d) the concept component c_t in the effective space
    features: list[int]

    @classmethod
    def from_features(cls, feats: EmbeddingFeatures, selected: Sequence[int]) -> EditPlan:
        rows = eligible_tokens(feats, selected)
        sel = list(selected)
        if len(rows) == 0 or not sel:
            return cls(torch.zeros(0, dtype=torch.long), torch.zeros(0, feats.F.shape[0]), sel)
        direction = feats.G[rows][:, sel] @ feats.F[:, sel].T  # (m, K') @ (K', d)
        return cls(feats.vprime[rows].clone(), direction, sel)

    def __len__(self) -> int:
        return int(self.token_ids.numel())


@dataclass
class EditReport:
    delta: float
    n_features: int
    n_tokens: int
    tokens: list[dict[str, Any]]  # per token: id, text, edit_norm, relative_edit

    def summary(self) -> dict[str, Any]:
        rel = [t["relative_edit"] for t in self.tokens]
        return {"delta": self.delta, "n_features": self.n_features, "n_tokens": self.n_tokens,
                "mean_relative_edit": sum(rel) / len(rel) if rel else 0.0}


class EmbeddingEditor:
    """Applies :class:`EditPlan` edits to a model's input embeddings and restores them exactly."""

    def __init__(self, model: nn.Module, embed_scale: float):
        if embeddings_tied(model):
            raise RuntimeError("input and output embeddings are tied: untie them first (model.untie_embeddings=true)")
        self.model = model
        self.scale = float(embed_scale)
        self._snapshot: dict[int, torch.Tensor] = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def _ensure_snapshot(self, ids: torch.Tensor) -> None:
        new = [t for t in ids.tolist() if t not in self._snapshot]
        if new:
            rows = self.weight[torch.tensor(new, device=self.weight.device)].detach().clone()
            self._snapshot.update(zip(new, rows, strict=True))

    @torch.no_grad()
    def apply(self, plan: EditPlan, delta: float, tokenizer: Any | None = None) -> EditReport:
        """Set the plan's rows to (pristine row - delta * c / scale). Idempotent for a given delta.

        One gather and one scatter for all rows (no per-token device round trips); the arithmetic is
        the per-row rule, in the weight's dtype, so results are the same bit for bit."""
        if delta < 0:
            raise ValueError(f"ember.delta must be non-negative, got {delta}")
        W = self.weight
        self._ensure_snapshot(plan.token_ids)
        if len(plan) == 0:
            return EditReport(delta=float(delta), n_features=len(plan.features), n_tokens=0, tokens=[])
        ids = plan.token_ids.tolist()
        orig = torch.stack([self._snapshot[t] for t in ids])
        change = (delta * plan.direction / self.scale).to(W.dtype).to(W.device)
        W[plan.token_ids.to(W.device)] = orig if delta == 0 else orig - change
        edit_norm = (delta * plan.direction.norm(dim=1)).tolist()
        eff = (self.scale * orig.float().norm(dim=1)).tolist()
        tokens = [{"id": t, "text": tokenizer.decode([t]) if tokenizer is not None else "",
                   "edit_norm": float(n), "relative_edit": n / e if e > 0 else 0.0}
                  for t, n, e in zip(ids, edit_norm, eff, strict=True)]
        return EditReport(delta=float(delta), n_features=len(plan.features), n_tokens=len(plan), tokens=tokens)

    @torch.no_grad()
    def restore(self) -> None:
        if self._snapshot:
            W = self.weight
            W[torch.tensor(list(self._snapshot), device=W.device)] = torch.stack(list(self._snapshot.values()))

    @property
    def touched(self) -> list[int]:
        return sorted(self._snapshot)
