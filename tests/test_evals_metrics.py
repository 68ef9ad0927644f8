"""The paper's metric formulas (reference-spec 5.7) against hand-computed cases, and `relative` on raw scores."""

from __future__ import annotations

import math

import pytest

from ember.evals.metrics import (
    harmonic_mean,
    loglik_frac,
    mc_frac,
    open_frac,
    paper_metrics,
    ratio_frac,
)
from ember.evals.suite import relative

NAN = float("nan")


def test_harmonic_mean_hand_computed() -> None:
    assert harmonic_mean(0.5, 1.0) == pytest.approx(2 / (2 + 1))  # 2 / (1/0.5 + 1/1) = 0.6667
    assert harmonic_mean(0.2, 0.4, 0.8) == pytest.approx(3 / (5 + 2.5 + 1.25))  # 0.342857
    assert harmonic_mean([0.2, 0.4, 0.8]) == harmonic_mean(0.2, 0.4, 0.8)
    assert harmonic_mean(0.7) == pytest.approx(0.7)


@pytest.mark.parametrize("terms", [(0.9, 0.0), (0.9, -0.1), (0.9, NAN), (0.9, math.inf), (0.9, None)])
def test_harmonic_mean_is_zero_on_a_bad_term(terms) -> None:
    assert harmonic_mean(*terms) == 0.0


def test_harmonic_mean_of_nothing_is_nan() -> None:
    assert math.isnan(harmonic_mean([]))


def test_mc_frac_chance_normalised() -> None:
    assert mc_frac(0.55, 0.85) == pytest.approx(0.5)  # (0.55-0.25)/(0.85-0.25)
    assert mc_frac(0.25, 0.85) == 0.0
    assert mc_frac(0.10, 0.85) == 0.0  # below chance clips to 0
    assert mc_frac(0.95, 0.85) == 1.0  # above base clips to 1
    assert mc_frac(0.6, 0.7, chance=0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("base", [0.25, 0.2, 0.0, NAN])
def test_mc_frac_undefined_when_base_at_or_below_chance(base) -> None:
    assert math.isnan(mc_frac(0.5, base))


def test_open_frac() -> None:
    assert open_frac(0.3, 0.6) == pytest.approx(0.5)
    assert open_frac(0.9, 0.6) == 1.0
    assert open_frac(0.0, 0.6) == 0.0
    assert math.isnan(open_frac(0.3, 0.0))


def test_ratio_and_loglik_fracs() -> None:
    assert ratio_frac(0.4, 0.5) == pytest.approx(0.8)
    assert ratio_frac(-0.1, 0.5) == 0.0
    assert math.isnan(ratio_frac(0.4, 0.0))
    assert ratio_frac(20.0, 10.0, higher_is_better=False) == pytest.approx(0.5)  # perplexity doubled
    assert ratio_frac(8.0, 10.0, higher_is_better=False) == 1.0
    assert loglik_frac(-3.0, -2.0) == pytest.approx(math.exp(-1.0))  # judge perplexity e^3 vs e^2
    assert loglik_frac(-1.5, -2.0) == 1.0


def test_paper_metrics_hand_computed() -> None:
    fr = {"qa_frac": 0.2, "simdom_frac": 0.8, "control_frac": 1.0, "ppl_frac": 0.5,
          "relevance_frac": 0.9, "fluency_frac": 0.6}
    m = paper_metrics(fr)
    assert m["efficacy"] == pytest.approx(0.8)
    spec = 3 / (1 / 0.8 + 1 / 1.0 + 1 / 0.5)  # 0.70588
    assert m["specificity"] == pytest.approx(spec)
    coh = 2 / (1 / 0.9 + 1 / 0.6)  # 0.72
    assert m["coherence"] == pytest.approx(coh)
    assert m["harmonic"] == pytest.approx(2 / (1 / 0.8 + 1 / spec))
    assert m["harmonic_alpaca"] == pytest.approx(3 / (1 / 0.8 + 1 / spec + 1 / coh))
    assert m["specificity_terms"] == ["control_frac", "ppl_frac", "simdom_frac"]


def test_paper_metrics_zero_and_undefined_terms() -> None:
    full_erase_but_broken = paper_metrics({"qa_frac": 0.0, "simdom_frac": 0.0, "ppl_frac": 1.0})
    assert full_erase_but_broken["efficacy"] == 1.0
    assert full_erase_but_broken["specificity"] == 0.0 and full_erase_but_broken["harmonic"] == 0.0
    nothing_erased = paper_metrics({"qa_frac": 1.0, "simdom_frac": 1.0})
    assert nothing_erased["efficacy"] == 0.0 and nothing_erased["harmonic"] == 0.0
    # a NaN retention term (base at chance) is left out of specificity, not allowed to zero it
    m = paper_metrics({"qa_frac": 0.5, "simdom_frac": NAN, "control_frac": 0.8})
    assert m["specificity"] == pytest.approx(0.8) and m["undefined_terms"] == ["simdom_frac"]
    # a NaN qa_frac makes efficacy NaN and the harmonic means 0
    m = paper_metrics({"qa_frac": NAN, "simdom_frac": 1.0, "relevance_frac": 1.0, "fluency_frac": 1.0})
    assert math.isnan(m["efficacy"]) and m["harmonic"] == 0.0 and m["harmonic_alpaca"] == 0.0
    # no coherence terms: coherence and harmonic_alpaca are NaN (not evaluated), harmonic still defined
    m = paper_metrics({"qa_frac": 0.5, "simdom_frac": 1.0})
    assert math.isnan(m["coherence"]) and math.isnan(m["harmonic_alpaca"]) and m["harmonic"] == pytest.approx(2 / 3)


def test_paper_metrics_lm_eval_terms_and_min_coherence_gate() -> None:
    m = paper_metrics({"qa_frac": 0.5, "simdom_frac": 1.0, "lmeval_mmlu_frac": 0.5})
    assert m["specificity"] == pytest.approx(2 / 3) and "lmeval_mmlu_frac" in m["specificity_terms"]
    fr = {"qa_frac": 0.0, "simdom_frac": 1.0, "relevance_frac": 0.85, "fluency_frac": 1.0}
    assert paper_metrics(fr)["harmonic_alpaca"] > 0.9
    assert paper_metrics(fr, min_coherence=0.9)["harmonic_alpaca"] == 0.0


BASE = {"qa_acc": 0.85, "qa_chance": 0.25, "simdom_acc": 0.65, "simdom_chance": 0.25, "control_acc": 0.75,
        "control_chance": 0.25, "open_qa_acc": 0.5, "ppl": 20.0, "relevance": 0.6, "fluency": -1.0,
        "judge": "local", "frac_on": "acc", "qa_p_correct": 0.7, "simdom_p_correct": 0.5, "control_p_correct": 0.6}


def test_relative_from_raw_scores() -> None:
    edited = {**BASE, "qa_acc": 0.40, "simdom_acc": 0.55, "control_acc": 0.75, "open_qa_acc": 0.1, "ppl": 25.0,
              "relevance": 0.54, "fluency": -1.2, "qa_p_correct": 0.3}
    r = relative(edited, BASE)
    assert r["qa_frac"] == pytest.approx(0.15 / 0.6)
    assert r["efficacy"] == pytest.approx(1 - 0.25)
    assert r["simdom_frac"] == pytest.approx(0.30 / 0.40)
    assert r["control_frac"] == 1.0
    assert r["ppl_frac"] == pytest.approx(20 / 25)
    assert r["open_qa_frac"] == pytest.approx(0.2) and r["efficacy_open"] == pytest.approx(0.8)
    assert r["relevance_frac"] == pytest.approx(0.9)
    assert r["fluency_frac"] == pytest.approx(math.exp(-0.2))
    spec = 3 / (1 / 0.75 + 1 + 1 / 0.8)
    assert r["specificity"] == pytest.approx(spec)
    assert r["harmonic"] == pytest.approx(2 / (1 / 0.75 + 1 / spec))
    assert r["judge"] == "local"
    # the continuous measure instead of accuracy: (0.3-0.25)/(0.7-0.25)
    assert relative(edited, BASE, measure="p_correct")["qa_frac"] == pytest.approx(0.05 / 0.45)


def test_relative_of_base_with_itself_keeps_everything() -> None:
    r = relative(BASE, BASE)
    for k in ("qa_frac", "simdom_frac", "control_frac", "ppl_frac", "relevance_frac", "fluency_frac"):
        assert r[k] == pytest.approx(1.0), k
    assert r["efficacy"] == 0.0 and r["harmonic"] == 0.0 and r["specificity"] == pytest.approx(1.0)


def test_relative_llm_coherence_ratings_take_precedence() -> None:
    base = {**BASE, "coherence_judge": "llm", "relevance_llm": 1.8, "fluency_llm": 2.0}
    edited = {**base, "relevance_llm": 0.9, "fluency_llm": 2.0, "relevance": 0.3}
    r = relative(edited, base)
    assert r["relevance_frac"] == pytest.approx(0.5) and r["relevance_local_frac"] == pytest.approx(0.5)
    assert r["fluency_frac"] == 1.0
