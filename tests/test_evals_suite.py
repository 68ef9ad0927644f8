"""The suite end to end on tiny_random, and the baseline cache (computed once, then read; corrupt = recomputed)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ember.config import EvalConfig
from ember.data import ConceptStore
from ember.evals import suite
from ember.evals.baseline import BaselineCache, BaselineKey, model_identity, settings_hash
from ember.evals.suite import evaluate, relative
from ember.paths import STARTER_DIR


@pytest.fixture(scope="module")
def store() -> ConceptStore:
    return ConceptStore(STARTER_DIR)


def _cfg(**kw) -> EvalConfig:
    base = dict(max_questions=4, coherence_n=2, coherence_max_new_tokens=6, perplexity_n=6, open_max_new_tokens=6)
    return OmegaConf.structured(EvalConfig(**{**base, **kw}))


def test_evaluate_returns_flat_scores_rows_and_provenance(tiny, store: ConceptStore) -> None:
    concept = store.concept("Harry Potter")
    s = evaluate(tiny.model, tiny.tokenizer, concept, store, _cfg(open_qa=True), "test")
    for k in ("qa_acc", "qa_p_correct", "simdom_acc", "simdom_p_correct", "control_acc", "open_qa_acc", "ppl",
              "relevance", "fluency"):
        assert isinstance(s[k], float), k
    assert s["judge"] == "local" and s["coherence_judge"] == "local" and s["mc_mode"] == "loglik"
    assert s["fluency_judge"] == "self"
    assert s["qa_n"] == s["simdom_n"] == s["control_n"] == s["open_qa_n"] == 4  # max_questions honoured
    assert s["coherence_n"] == 2
    rows = s["rows"]
    assert sorted({r["set"] for r in rows}) == ["coherence", "control", "open_qa", "qa", "simdom"]
    qa_rows = [r for r in rows if r["set"] == "qa"]
    assert [r["qid"] for r in qa_rows] == [q.qid for q in concept.mc["QA_test"][:4]]
    assert all(r["split"] == "QA_test" for r in qa_rows)
    assert s["qa_acc"] == sum(r["correct"] for r in qa_rows) / 4
    assert all(s[f"time_{p}_s"] >= 0 for p in ("qa", "simdom", "control", "open_qa", "ppl", "coherence"))
    json.dumps(s)  # result files must serialise


def test_parts_switch_off_and_letter_mode(tiny, store: ConceptStore) -> None:
    cfg = _cfg(open_qa=False, coherence=False, perplexity=False, mc_mode="letter", max_questions=2)
    s = evaluate(tiny.model, tiny.tokenizer, store.concept("Harry Potter"), store, cfg, "train")
    assert "open_qa_acc" not in s and "ppl" not in s and "relevance" not in s
    assert s["mc_mode"] == "letter" and s["qa_n"] == 2
    assert all(r["generation"] is not None for r in s["rows"])  # the letter generations are kept
    with pytest.raises(ValueError, match="split"):
        evaluate(tiny.model, tiny.tokenizer, store.concept("Harry Potter"), store, cfg, "validation")


def test_relative_of_a_model_with_itself(tiny, store: ConceptStore) -> None:
    concept = store.concept("Harry Potter")
    cfg = _cfg(open_qa=False, coherence=False)
    a = evaluate(tiny.model, tiny.tokenizer, concept, store, cfg, "train")
    r = relative(a, a)
    assert r["ppl_frac"] == pytest.approx(1.0)
    assert r["judge"] == "local"
    for part in ("qa", "simdom", "control"):  # 1.0, or NaN where tiny's base is at or below chance
        frac = r[f"{part}_frac"]
        assert frac == pytest.approx(1.0) if a[f"{part}_acc"] > 0.25 else math.isnan(frac)


def _renamed(concept, name: str):
    return dataclasses.replace(concept, name=name)


def test_baseline_computed_once_then_read_from_cache(tiny, store: ConceptStore, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = suite.run_part

    def counting(name: str, ctx):
        calls.append(name)
        return real(name, ctx)

    monkeypatch.setattr(suite, "run_part", counting)
    concept = store.concept("Harry Potter")
    cfg = _cfg(open_qa=False, coherence=False)
    bc = BaselineCache(tmp_path)
    first = bc.get_or_compute(tiny.model, tiny.tokenizer, tiny.facts, concept, store, cfg, "train")
    assert sorted(calls) == ["control", "ppl", "qa", "simdom"] and bc.computed == 4
    assert len(bc.rows[("Harry Potter", "train")]) == 12
    again = BaselineCache(tmp_path).get_or_compute(tiny.model, tiny.tokenizer, tiny.facts, concept, store, cfg, "train")
    assert len(calls) == 4  # nothing recomputed
    assert {k: v for k, v in again.items()} == first
    # another concept shares the concept-independent parts (control facts, perplexity)
    calls.clear()
    BaselineCache(tmp_path).get_or_compute(tiny.model, tiny.tokenizer, tiny.facts, _renamed(concept, "Other"),
                                           store, cfg, "train")
    assert sorted(calls) == ["qa", "simdom"]
    # the test split: QA and SimDom again, control and perplexity are split-independent
    calls.clear()
    BaselineCache(tmp_path).get_or_compute(tiny.model, tiny.tokenizer, tiny.facts, concept, store, cfg, "test")
    assert sorted(calls) == ["qa", "simdom"]
    # a setting that changes what is scored makes a new entry; batch size does not
    calls.clear()
    BaselineCache(tmp_path).get_or_compute(tiny.model, tiny.tokenizer, tiny.facts, concept, store,
                                           _cfg(open_qa=False, coherence=False, batch_size=3), "train")
    assert calls == []
    BaselineCache(tmp_path).get_or_compute(tiny.model, tiny.tokenizer, tiny.facts, concept, store,
                                           _cfg(open_qa=False, coherence=False, max_questions=3), "train")
    assert sorted(calls) == ["control", "qa", "simdom"]


def test_corrupt_baseline_is_recomputed(tmp_path: Path) -> None:
    bc = BaselineCache(tmp_path)
    key = BaselineKey("m", "qa_train", "Harry Potter", "loglik", settings_hash({"n": 4}))
    n = {"calls": 0}

    def compute() -> dict:
        n["calls"] += 1
        return {"scores": {"qa_acc": 0.5, "nan": float("nan")}, "rows": []}

    assert bc.entry(key, compute)["scores"]["qa_acc"] == 0.5
    assert bc.entry(key, compute)["scores"]["qa_acc"] == 0.5 and n["calls"] == 1
    path = bc.path(key)
    path.write_text(path.read_text()[:40])  # truncated: invalid JSON
    assert bc.entry(key, compute)["scores"]["qa_acc"] == 0.5 and n["calls"] == 2
    doc = json.loads(path.read_text())
    del doc["checksum"]
    path.write_text(json.dumps(doc))
    bc.entry(key, compute)
    assert n["calls"] == 3
    doc = json.loads(path.read_text())
    doc["payload"]["scores"]["qa_acc"] = 0.9  # edited by hand: checksum no longer matches
    path.write_text(json.dumps(doc))
    assert bc.entry(key, compute)["scores"]["qa_acc"] == 0.5 and n["calls"] == 4


def test_model_identity_follows_the_weights(tiny) -> None:
    import copy

    import torch

    a = model_identity(tiny.model, tiny.facts)
    assert a == model_identity(tiny.model, tiny.facts) and a.startswith("tiny_random-float32-")
    other = copy.deepcopy(tiny.model)
    with torch.no_grad():
        other.get_input_embeddings().weight[7] += 0.5
    assert model_identity(other, tiny.facts) != a


def _background_texts(store: ConceptStore, starter: ConceptStore) -> set[str]:
    """Every text the factorization's background can take (neutral, other concepts, general)."""
    concepts = {s for name in store.concept_names for s in store.concept(name).sentences}
    return set(store.neutral) | concepts | set(starter.general_text) | set(starter.neutral)


def test_perplexity_reads_held_out_text_no_background_contains(store: ConceptStore, release_dir: Path) -> None:
    # Held out by construction: an EMBER edit changes only tokens absent from its background, so
    # perplexity on background text could not move under EMBER alone (the retention term would be vacuous).
    for s in (store, ConceptStore(release_dir)):
        texts, source = suite.perplexity_texts(s, _cfg(perplexity_n=0))
        assert source == "heldout_text" and len(texts) >= 60
        assert not set(texts) & _background_texts(s, store)
    texts, source = suite.perplexity_texts(store, _cfg(perplexity_source="general"))
    assert source == "general_text" and set(texts) <= set(store.general_text)


def test_perplexity_source_heldout_missing_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suite, "_starter", lambda: None)  # no starter set to fall back on either
    with pytest.raises(ValueError, match="heldout_text.json"):
        suite.perplexity_texts(ConceptStore(tmp_path), _cfg(perplexity_source="heldout"))


def test_data_settings_change_with_the_evaluation_data(tiny, store: ConceptStore) -> None:
    # the delta choice is cached under these: a different text or question set must give a different key
    concept = store.concept("Harry Potter")
    held = suite.data_settings(tiny.tokenizer, concept, store, _cfg(), "train")
    general = suite.data_settings(tiny.tokenizer, concept, store, _cfg(perplexity_source="general"), "train")
    test = suite.data_settings(tiny.tokenizer, concept, store, _cfg(), "test")
    assert held["ppl"] != general["ppl"] and held["qa"] == general["qa"]
    assert test["qa"] != held["qa"] and test["ppl"] == held["ppl"]
    assert "coherence" not in suite.data_settings(tiny.tokenizer, concept, store, _cfg(coherence=False), "train")


def test_an_open_answers_aliases_are_part_of_the_evaluation_data(tiny, store: ConceptStore) -> None:
    """An alias changes a verdict ("Padfoot" for "Sirius Black"), so a base scored without it must not be
    reused (nor a choice made from it) once it is added."""
    concept = store.concept("Harry Potter")
    first, *rest = concept.open["QA_test"]
    more = dataclasses.replace(concept, open={**concept.open,
                                              "QA_test": [dataclasses.replace(first, aliases=(*first.aliases, "x")), *rest]})
    before = suite.data_settings(tiny.tokenizer, concept, store, _cfg(open_qa=True), "test")
    after = suite.data_settings(tiny.tokenizer, more, store, _cfg(open_qa=True), "test")
    assert before["open_qa"] != after["open_qa"] and before["qa"] == after["qa"]


def test_a_store_without_instructions_says_it_uses_the_starter_sets(tmp_path, caplog) -> None:
    import logging
    import shutil

    from ember.data import ConceptStore
    from ember.evals.suite import instructions
    from ember.paths import STARTER_DIR

    shutil.copytree(STARTER_DIR, tmp_path / "data")
    (tmp_path / "data" / "instructions.json").unlink()
    own = ConceptStore(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="ember.evals.suite"):
        got = instructions(own)
        instructions(own)
    assert got == ConceptStore(STARTER_DIR).instructions and got
    said = [r.getMessage() for r in caplog.records if "has no instructions.json" in r.getMessage()]
    assert len(said) == 1 and str(STARTER_DIR) in said[0]  # once, naming where they come from
