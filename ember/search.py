"""The paper's selection protocol for a base method's hyper-parameters (reference-spec 5.8).

1. Every grid cell runs on a fresh copy of the model (EMBER-edited when on) and is scored on the
   *train* split without coherence; a cell whose specificity terms (lm-eval tasks such as MMLU
   included, when enabled; less those in ``eval.gate_skip``) fall below ``method.retention_gate`` scores 0.
2. The ``top_k_validate`` best cells by harmonic are re-scored with coherence. When that is every
   cell (a quick grid), the first pass scores coherence directly and no cell is trained twice.
3. The best by harmonic_alpaca wins (a measured 0, collapsed coherence, counts as 0; harmonic only
   where coherence is off); ties go to the smaller parameters in the grid's key order, as the
   reference's stable tie-break. The caller then evaluates it once on the test split.

Each scored cell is appended to a JSONL file in the job directory as soon as it finishes, so an
interrupted search resumes where it stopped (a torn last line is ignored, duplicates collapse).
Each record carries the caller's ``context`` (a digest of what a score depends on besides the cell:
the evaluation data and settings, the EMBER edit, the base parameters); records made under another
context are stale and scored again. When no cell passes the gate, the best-harmonic cell is kept and
flagged ``gate_pass: false``.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ember.delta import passes_gates, ranking_value
from ember.resume_log import append_jsonl, read_jsonl

log = logging.getLogger("ember")


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    if not grid:
        return [{}]
    keys = sorted(grid)
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*(list(grid[k]) for k in keys))]


def cell_id(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def _finite(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else 0.0


def _param_order(params: dict[str, Any]) -> tuple[tuple[int, Any], ...]:
    """A sortable key: each value in the params' own key order, numbers before anything else."""
    return tuple((0, float(x)) if isinstance(x, (int, float)) else (1, str(x)) for x in params.values())


def search(
    cells: list[dict[str, Any]],
    score_cell: Callable[[dict[str, Any], bool], dict[str, Any]],
    retention_keys: tuple[str, ...] | None,
    retention_gate: float,
    top_k: int,
    out_dir: Path,
    progress: bool = False,
    context: str = "",
    skip: Collection[str] = (),
) -> dict[str, Any]:
    """Run the protocol; ``score_cell(params, with_coherence)`` returns relative metrics."""
    grid_path, val_path = out_dir / "grid.jsonl", out_dir / "grid_validate.jsonl"
    done = read_jsonl(grid_path, context)
    # when every cell will be validated anyway (a quick grid), score coherence in the first pass and
    # skip the second training of each cell
    coherence_first = top_k >= len(cells)
    for i, params in enumerate(tqdm(cells, desc="grid", disable=not progress, leave=False)):
        cid = cell_id(params)
        if cid in done:
            continue
        m = score_cell(params, coherence_first)
        # a cell whose training diverged has no retention terms to fail: it must not pass the gate by that
        gate = _trained(m) and passes_gates(m, retention_keys, (), retention_gate, 0.0, skip)
        rec = {"cell": cid, "context": context, "params": params, "gate_pass": gate,
               "score": _finite(m.get("harmonic")) if gate else 0.0,
               "with_coherence": coherence_first,
               **{k: v for k, v in m.items() if isinstance(v, (int, float, str, bool))}}
        append_jsonl(grid_path, rec)
        done[cid] = rec
        log.info("grid cell %d/%d %s: harmonic %.3f%s", i + 1, len(cells), params, _finite(m.get("harmonic")),
                 "" if gate else " (fails the retention gate)")
    recs = [done[cell_id(p)] for p in cells]
    passing = [r for r in recs if r["gate_pass"] and _trained(r)]  # records written before the check above
    # no cell passes: the best trained one, flagged gate_pass false (a diverged one only when all diverged)
    pool = passing or sorted([r for r in recs if _trained(r)] or recs, key=lambda r: -_finite(r.get("harmonic")))[:1]
    top = sorted(pool, key=lambda r: -r["score"] if passing else -_finite(r.get("harmonic")))[:max(1, top_k)]
    vals = read_jsonl(val_path, context)
    for r in top:
        if r["cell"] in vals:
            continue
        if r.get("with_coherence"):
            v = {k: x for k, x in r.items() if k not in ("score", "with_coherence")}
        else:
            m = score_cell(r["params"], True)
            v = {"cell": r["cell"], "context": context, "params": r["params"], "gate_pass": r["gate_pass"],
                 **{k: x for k, x in m.items() if isinstance(x, (int, float, str, bool))}}
        append_jsonl(val_path, v)
        vals[r["cell"]] = v
    # ties go to the smaller parameters, compared in the grid's key order (the reference's stable tie-break)
    validated = sorted((vals[r["cell"]] for r in top), key=lambda v: _param_order(v["params"]))
    best = max(validated, key=ranking_value)  # harmonic_alpaca (0 when coherence collapsed), else harmonic
    return {"best_params": best["params"], "gate_pass": best["gate_pass"], "n_cells": len(cells),
            "n_passing": len(passing), "validated": [vals[r["cell"]] for r in top], "best": best}


def _trained(metrics: dict[str, Any]) -> bool:
    """The cell's method ran to the end (a diverged or failed one carries its status)."""
    return metrics.get("status", "ok") == "ok"


def method_cells(method_cfg: Any) -> list[dict[str, Any]]:
    grid = method_cfg.quick_grid if method_cfg.search == "quick" else method_cfg.grid
    from omegaconf import OmegaConf

    return expand_grid(OmegaConf.to_container(grid, resolve=True) if not isinstance(grid, dict) else grid)


def fresh_copy(model: Any) -> Any:
    return copy.deepcopy(model)
