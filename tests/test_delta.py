"""Delta selection: gates, best score, ties to the smaller delta, none qualifying -> 0."""

from ember.delta import choose_delta


def table(rows):
    return lambda d: rows[d]


def test_best_gated_delta_wins_and_ties_go_small() -> None:
    rows = {
        1.0: {"spec": 0.99, "coh": 0.95, "harmonic_alpaca": 0.4},
        5.0: {"spec": 0.95, "coh": 0.95, "harmonic_alpaca": 0.7},
        10.0: {"spec": 0.95, "coh": 0.92, "harmonic_alpaca": 0.7},
        50.0: {"spec": 0.50, "coh": 0.95, "harmonic_alpaca": 0.9},  # fails the retention gate
    }
    c = choose_delta(list(rows), table(rows), ["spec"], ["coh"], 0.9, 0.9)
    assert c.delta == 5.0
    assert [r["gate_pass"] for r in c.rows] == [True, True, True, False]


def test_nothing_qualifies_means_no_edit() -> None:
    rows = {2.0: {"spec": 0.5, "harmonic_alpaca": 0.8}, 5.0: {"spec": 0.2, "harmonic_alpaca": 0.9}}
    c = choose_delta(list(rows), table(rows), ["spec"], [], 0.9, 0.9)
    assert c.delta == 0.0 and "no edit" in c.reason


def test_harmonic_used_when_coherence_is_off() -> None:
    rows = {1.0: {"spec": 1.0, "harmonic": 0.3, "harmonic_alpaca": float("nan")},
            2.0: {"spec": 1.0, "harmonic": 0.6, "harmonic_alpaca": float("nan")}}
    assert choose_delta(list(rows), table(rows), ["spec"], [], 0.9, 0.9).delta == 2.0


def test_the_default_retention_gate_covers_every_specificity_term_mmlu_included() -> None:
    """retention_keys=None gates on the row's specificity terms: an lm-eval task (the paper's MMLU gate) too."""
    rows = {
        5.0: {"simdom_frac": 0.97, "ppl_frac": 0.99, "harmonic_alpaca": 0.7},
        10.0: {"simdom_frac": 0.97, "ppl_frac": 0.99, "lmeval_mmlu_frac": 0.6, "harmonic_alpaca": 0.9},
        20.0: {"simdom_frac": 0.5, "harmonic_alpaca": 0.95},
    }
    c = choose_delta(list(rows), table(rows), None, [], 0.9, 0.9)
    assert [r["gate_pass"] for r in c.rows] == [True, False, False]
    assert c.delta == 5.0


def test_gate_skip_leaves_a_term_out_of_the_gate_only() -> None:
    """eval.gate_skip=[simdom_frac] (eval=paper): the paper gates on MMLU and its stand-ins, not the similar domain."""
    rows = {
        5.0: {"simdom_frac": 0.95, "control_frac": 1.0, "harmonic_alpaca": 0.80},
        10.0: {"simdom_frac": 0.85, "control_frac": 0.95, "harmonic_alpaca": 0.91},
        50.0: {"simdom_frac": 0.95, "control_frac": 0.80, "harmonic_alpaca": 0.95},
    }
    assert choose_delta(list(rows), table(rows), None, [], 0.9, 0.9).delta == 5.0
    c = choose_delta(list(rows), table(rows), None, [], 0.9, 0.9, skip=["simdom_frac"])
    assert [r["gate_pass"] for r in c.rows] == [True, True, False]
    assert c.delta == 10.0
