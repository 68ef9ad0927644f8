"""The paper's grid protocol for a base method (ember/search.py), with a synthetic scorer."""

from __future__ import annotations

import pytest

from ember.search import expand_grid, search

RET = ("specificity",)


def make_scorer(table: dict[float, dict[str, float]], calls: list[tuple[float, bool]], fail_at: int | None = None):
    """score_cell over cells {"lr": x}: metrics from ``table``; coherence only when asked."""

    def score(params: dict, with_coherence: bool) -> dict:
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt("killed")
        calls.append((params["lr"], with_coherence))
        row = dict(table[params["lr"]])
        alpaca = row.pop("alpaca")
        if with_coherence:
            row["harmonic_alpaca"] = alpaca
        return row

    return score


TABLE = {  # lr -> harmonic, specificity, harmonic with coherence
    1.0: {"harmonic": 0.9, "specificity": 0.5, "alpaca": 0.9},  # best harmonic but fails the retention gate
    2.0: {"harmonic": 0.8, "specificity": 0.95, "alpaca": 0.3},  # best gated harmonic, poor coherence
    3.0: {"harmonic": 0.7, "specificity": 0.95, "alpaca": 0.6},  # the winner after coherence
    4.0: {"harmonic": 0.2, "specificity": 0.95, "alpaca": 0.2},  # not in the top 2
}
CELLS = expand_grid({"lr": list(TABLE)})


def test_gate_then_rank_then_coherence_picks_the_best_validated_cell(tmp_path) -> None:
    calls: list = []
    res = search(CELLS, make_scorer(TABLE, calls), RET, 0.7, 2, tmp_path)
    assert res["best_params"] == {"lr": 3.0}
    assert res["n_passing"] == 3
    validated = sorted(lr for lr, coh in calls if coh)
    assert validated == [2.0, 3.0]  # top-2 gated cells by harmonic, re-scored with coherence
    assert sum(1 for _, coh in calls if not coh) == 4


def test_an_interrupted_grid_resumes_where_it_stopped(tmp_path) -> None:
    calls: list = []
    with pytest.raises(KeyboardInterrupt):
        search(CELLS, make_scorer(TABLE, calls, fail_at=2), RET, 0.7, 2, tmp_path)
    assert [lr for lr, _ in calls] == [1.0, 2.0]
    again: list = []
    res = search(CELLS, make_scorer(TABLE, again), RET, 0.7, 2, tmp_path)
    assert [lr for lr, coh in again if not coh] == [3.0, 4.0]  # finished cells are not re-run
    assert res["best_params"] == {"lr": 3.0}
    lines = (tmp_path / "grid.jsonl").read_text().splitlines()
    assert len(lines) == 4  # one record per cell, no duplicates


def test_a_grid_validated_whole_is_trained_once_per_cell(tmp_path) -> None:
    calls: list = []
    res = search(CELLS, make_scorer(TABLE, calls), RET, 0.7, 15, tmp_path)
    assert sorted(calls) == [(lr, True) for lr in sorted(TABLE)]  # coherence in the first and only pass
    assert res["best_params"] == {"lr": 3.0}


def test_when_no_cell_passes_the_gate_the_best_harmonic_is_kept(tmp_path) -> None:
    calls: list = []
    table = {k: {**v, "specificity": 0.1} for k, v in TABLE.items()}
    res = search(CELLS, make_scorer(table, calls), RET, 0.7, 2, tmp_path)
    assert res["n_passing"] == 0 and res["best_params"] == {"lr": 1.0} and res["gate_pass"] is False


def test_records_from_another_context_are_scored_again(tmp_path) -> None:
    first: list = []
    search(CELLS, make_scorer(TABLE, first), RET, 0.7, 2, tmp_path, context="eval-A")
    same: list = []
    search(CELLS, make_scorer(TABLE, same), RET, 0.7, 2, tmp_path, context="eval-A")
    assert same == []  # everything was scored under this context already
    changed: list = []
    res = search(CELLS, make_scorer(TABLE, changed), RET, 0.7, 2, tmp_path, context="eval-B")
    assert sorted(lr for lr, coh in changed if not coh) == [lr for lr in sorted(TABLE)]  # every cell again
    assert res["best_params"] == {"lr": 3.0}


def test_a_cell_whose_coherence_collapsed_cannot_win_on_harmonic(tmp_path) -> None:
    """harmonic_alpaca 0.0 is a measured collapse (the min-coherence gate), not a missing value."""
    table = {1.0: {"harmonic": 0.95, "specificity": 0.95, "alpaca": 0.0},
             2.0: {"harmonic": 0.8, "specificity": 0.95, "alpaca": 0.5}}
    res = search(expand_grid({"lr": [1.0, 2.0]}), make_scorer(table, []), RET, 0.7, 2, tmp_path)
    assert res["best_params"] == {"lr": 2.0}


def test_validated_ties_go_to_the_smaller_parameters_whatever_the_grid_order(tmp_path) -> None:
    table = {3.0: {"harmonic": 0.8, "specificity": 0.95, "alpaca": 0.6},
             1.0: {"harmonic": 0.8, "specificity": 0.95, "alpaca": 0.6}}
    res = search(expand_grid({"lr": [3.0, 1.0]}), make_scorer(table, []), RET, 0.7, 2, tmp_path)
    assert res["best_params"] == {"lr": 1.0}


@pytest.mark.parametrize("retention_keys", [None, RET])
def test_a_diverged_cell_never_passes_the_gate_nor_wins_the_fallback(tmp_path, retention_keys) -> None:
    """A diverged cell has no retention terms to fail (the runner scores it harmonic 0, status diverged):
    it once passed the gate on that absence and won whenever no trained cell passed, so the final erase
    retrained it and diverged again."""
    # trained, below the gate (simdom_frac: a retention term the runner's rows carry, gated when keys are None)
    table = {1.0: {"harmonic": 0.4, "specificity": 0.5, "simdom_frac": 0.5, "alpaca": 0.4}}

    def score(params: dict, with_coherence: bool) -> dict:
        if params["lr"] == 9.0:
            return {"harmonic": 0.0, "harmonic_alpaca": 0.0, "status": "diverged", "reason": "loss nan"}
        return make_scorer(table, [])(params, with_coherence)

    res = search(expand_grid({"lr": [1.0, 9.0]}), score, retention_keys, 0.7, 2, tmp_path)
    assert res["n_passing"] == 0 and res["gate_pass"] is False
    assert res["best_params"] == {"lr": 1.0}
