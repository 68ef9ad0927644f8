"""Choosing EMBER's delta: the reference's grid, gates and tie-breaking, behind a scoring function.

For each delta of the grid the caller's ``score`` function evaluates the edited model on the
*train* split and returns the relative metrics. A delta qualifies when every retention term is at
least ``retention_gate`` of base and every coherence term at least ``coherence_gate``; among the
qualifying deltas the highest ``harmonic_alpaca`` (or ``harmonic`` when coherence is off) wins,
ties going to the smaller delta; when none qualifies (or every score is 0) delta is 0 (no edit),
as the reference does (reference-spec 3 and 11.12).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DeltaChoice:
    delta: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""


def ranking_value(row: dict[str, Any]) -> float:
    """``harmonic_alpaca`` where coherence was measured (0 counts: a collapsed cell cannot win on
    ``harmonic``), else ``harmonic``; NaN or missing counts as 0."""
    v = row.get("harmonic_alpaca")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        v = row.get("harmonic", 0.0)
    return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def passes_gates(row: dict[str, Any], retention_keys: Sequence[str] | None, coherence_keys: Sequence[str],
                 retention_gate: float, coherence_gate: float, skip: Collection[str] = ()) -> bool:
    """Every retention term >= ``retention_gate`` and every coherence term >= ``coherence_gate``; missing
    or NaN terms are not gated. ``retention_keys=None``: every specificity term the row holds (similar
    domain, control facts, perplexity and each lm-eval task, e.g. MMLU); ``skip`` leaves terms out
    (``eval.gate_skip``: the paper gates on MMLU alone, not on the similar domain)."""
    if retention_keys is None:
        from ember.evals.metrics import retention_terms

        retention_keys = list(retention_terms(row))
    retention_keys = [k for k in retention_keys if k not in skip]

    def ok(keys: Sequence[str], gate: float) -> bool:
        for k in keys:
            v = row.get(k)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            if v < gate:
                return False
        return True

    return ok(retention_keys, retention_gate) and ok(coherence_keys, coherence_gate)


def choose_delta(
    grid: Sequence[float],
    score: Callable[[float], dict[str, Any]],
    retention_keys: Sequence[str] | None,
    coherence_keys: Sequence[str],
    retention_gate: float = 0.9,
    coherence_gate: float = 0.9,
    progress: bool = False,
    skip: Collection[str] = (),
) -> DeltaChoice:
    from tqdm.auto import tqdm

    rows = []
    for d in tqdm(sorted(grid), desc="delta grid", disable=not progress, leave=False):
        row = {"delta": float(d), **score(float(d))}
        row["gate_pass"] = passes_gates(row, retention_keys, coherence_keys, retention_gate, coherence_gate, skip)
        row["objective"] = ranking_value(row) if row["gate_pass"] else 0.0
        rows.append(row)
    best = max(rows, key=lambda r: (r["objective"], -r["delta"]))
    if best["objective"] <= 0:
        return DeltaChoice(0.0, rows, "no delta passed the gates with a positive score: no edit (delta 0)")
    return DeltaChoice(best["delta"], rows, f"best objective {best['objective']:.3f} among gated deltas")
