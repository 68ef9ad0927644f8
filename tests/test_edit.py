"""Token labels, feature statistics, selectors and the EMBER edit on tiny models."""

from __future__ import annotations

import copy
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from ember.cache import ArtifactCache
from ember.edit import EditPlan, EmbeddingEditor
from ember.errors import ConfigError
from ember.features import (
    BACKGROUND_ONLY,
    BOTH,
    CONCEPT_ONLY,
    EmbeddingFeatures,
    SelectionContext,
    compute_embedding_features,
    eligible_tokens,
    feature_stats,
    label_tokens,
    select_features,
)

CONCEPT = ["Harry Potter waved his wand at Hogwarts.", "Hermione cast a spell in the Great Hall.",
           "The wizard Dumbledore led the school of magic."] * 3
NEUTRAL = ["The bakery opened at seven in the morning.", "Rainfall was heavy in the valley last spring.",
           "The committee approved the new budget for roads."] * 3


def fcfg(**kw):
    base = dict(rank=6, sparsity=0.1, reg=1e-4, reg_tries=4, tol=1e-4, patience=50, max_iter=200,
                stopping="plateau", plateau_rel_tol=1e-4, plateau_patience=10, seed=0, device="cpu")
    return SimpleNamespace(**(base | kw))


def test_labels_by_id() -> None:
    con, bg = Counter({1: 3, 2: 1, 9: 1}), Counter({2: 5, 3: 2, 9: 1})
    v, lab, excl = label_tokens(con, bg, special_ids={9})
    assert v == [1, 2, 3]
    assert lab == [CONCEPT_ONLY, BOTH, BACKGROUND_ONLY]
    assert excl[0] == 1.0 and excl[2] == 0.0 and 0 < excl[1] < 1


def _feats(tiny, cache=None, **kw) -> EmbeddingFeatures:
    return compute_embedding_features(tiny.model, tiny.tokenizer, tiny.facts, "Harry Potter", CONCEPT, NEUTRAL,
                                      fcfg(**kw), cache=cache)


def test_stats_match_hand_computation() -> None:
    G = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 4.0]])
    feats = EmbeddingFeatures("c", torch.arange(4), torch.tensor([CONCEPT_ONLY, CONCEPT_ONLY, BACKGROUND_ONLY, BOTH]),
                              torch.tensor([1.0, 1.0, 0.0, 0.5]), torch.zeros(3, 2), G, {}, 1.0)
    s = feature_stats(feats)
    assert s.loc[0, "mean_abs_concept"] == pytest.approx(1.0) and s.loc[0, "mean_abs_neutral"] == pytest.approx(1.0)
    assert s.loc[1, "mean_abs_concept"] == pytest.approx(0.5) and s.loc[1, "ratio_abs"] == pytest.approx(0.5, rel=1e-6)
    assert s.loc[1, "num_both"] == 1 and s.loc[0, "num_concept"] == 1
    assert s.loc[0, "purity"] == pytest.approx(0.5)


def test_factorization_is_cached_and_reused(tiny, tmp_path) -> None:
    cache = ArtifactCache(tmp_path)
    a = _feats(tiny, cache)
    b = _feats(tiny, cache)
    assert cache.builds == 1 and cache.hits == 1
    assert torch.equal(a.G, b.G)
    c = _feats(tiny, cache, rank=5)
    assert cache.builds == 2 and c.rank == 5


def test_a_factorization_code_change_refits_instead_of_reading_the_old_fit(tiny, tmp_path, monkeypatch) -> None:
    import ember.features

    cache = ArtifactCache(tmp_path)
    _feats(tiny, cache)
    monkeypatch.setattr(ember.features, "factorization_code_version", lambda: "a fixed factorization")
    _feats(tiny, cache)
    assert cache.builds == 2 and cache.hits == 0


def test_corrupt_cache_entry_is_rebuilt(tiny, tmp_path) -> None:
    cache = ArtifactCache(tmp_path)
    a = _feats(tiny, cache)
    payload = next(tmp_path.rglob("payload.pt"))
    payload.write_bytes(payload.read_bytes()[:100])  # truncated by a crash
    b = _feats(tiny, cache)
    assert cache.builds == 2 and torch.equal(a.G, b.G)


def test_unknown_selector_is_named(tiny) -> None:
    feats = _feats(tiny)
    ctx = SelectionContext(tiny.tokenizer, "Harry Potter", ["Harry Potter"])
    with pytest.raises(ConfigError, match="ember.selector.name"):
        select_features(feats, SimpleNamespace(name="ratio+vibes"), ctx)
    rep = select_features(feats, SimpleNamespace(name="ratio+purity", ratio_thresh=2.0, purity_thresh=0.5), ctx)
    assert set(rep.columns) >= {"selected", "reason", "top_tokens", "ratio_abs"}
    assert (rep["selected"] == ((rep["ratio_abs"] >= 2.0) & (rep["purity"] >= 0.5))).all()


def _edited_model(lm):
    m = copy.deepcopy(lm.model)
    return m


@pytest.mark.parametrize("fixture", ["tiny", "tiny_gemma"])
def test_edit_touches_only_eligible_rows_and_restores_exactly(fixture, request) -> None:
    lm = request.getfixturevalue(fixture)
    model = _edited_model(lm)
    feats = _feats(lm)
    selected = list(range(feats.rank))
    plan = EditPlan.from_features(feats, selected)
    assert len(plan) > 0
    expected_ids = set(feats.vprime[eligible_tokens(feats, selected)].tolist())
    assert set(plan.token_ids.tolist()) == expected_ids
    W0 = model.get_input_embeddings().weight.detach().clone()
    ed = EmbeddingEditor(model, lm.facts.embed_scale)
    rep = ed.apply(plan, 0.0)
    assert torch.equal(model.get_input_embeddings().weight, W0), "delta = 0 changes nothing"
    rep = ed.apply(plan, 3.0, lm.tokenizer)
    W1 = model.get_input_embeddings().weight.detach()
    changed = set(torch.nonzero((W1 != W0).any(1)).squeeze(1).tolist())
    assert changed == expected_ids
    assert rep.n_tokens == len(expected_ids) and rep.n_features == len(selected)
    ed.restore()
    assert torch.equal(model.get_input_embeddings().weight, W0), "restore is bit-exact"


def test_scaled_model_first_layer_sees_e_minus_delta_c(tiny_gemma) -> None:
    lm = tiny_gemma
    model = _edited_model(lm)
    feats = _feats(lm)
    plan = EditPlan.from_features(feats, list(range(feats.rank)))
    t = int(plan.token_ids[0])
    scale = lm.facts.embed_scale
    assert scale == pytest.approx(8.0)
    e = model.get_input_embeddings().weight[t].detach().float() * scale
    lm_head_before = model.get_output_embeddings().weight.detach().clone()
    EmbeddingEditor(model, scale).apply(plan, 2.5)
    seen = {}
    from ember.models import decoder_layers

    def grab(mod, args, kwargs) -> None:
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()

    h = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(torch.tensor([[t]]))
    h.remove()
    torch.testing.assert_close(seen["x"][0, 0].float(), e - 2.5 * plan.direction[0], rtol=1e-5, atol=1e-4)
    assert torch.equal(model.get_output_embeddings().weight, lm_head_before), "lm_head is untouched"
