"""The key-term anchored selector, the key-term token rule, and the shipped general text."""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch

from ember.data import ConceptStore
from ember.features import (
    BACKGROUND_ONLY,
    CONCEPT_ONLY,
    EmbeddingFeatures,
    SelectionContext,
    key_term_token_ids,
    select_features,
)
from ember.paths import STARTER_DIR


def _id(tok, text: str) -> int:
    return tok(text, add_special_tokens=False)["input_ids"][0]


def _scfg(**kw):
    base = dict(name="anchor", ratio_thresh=2.0, purity_thresh=0.5, exclusivity_thresh=0.5, semantic_thresh=0.3,
                semantic_top_tokens=5, anchor_thresh=0.2, anchor_min_tokens=1)
    return SimpleNamespace(**(base | kw))


def test_key_term_tokens_keep_word_starts_and_drop_pieces(tiny) -> None:
    tok = tiny.tokenizer
    ids = key_term_token_ids(tok, ["Harry Potter", "Valley of the Kings"])
    texts = {tok.decode([i]) for i in ids}
    assert " Harry" in texts and " Potter" in texts
    assert " of" not in texts and " the" not in texts
    assert all(sum(c.isalnum() for c in t.strip()) >= 3 for t in texts)


def test_anchor_selects_only_features_carried_by_key_terms(tiny) -> None:
    tok = tiny.tokenizer
    anchored = [_id(tok, " Harry"), _id(tok, " wizard"), _id(tok, " spell")]  # concept-only, one key term
    generic = [_id(tok, " show"), _id(tok, " display"), _id(tok, " writing")]  # concept-only, no key term
    neutral = [_id(tok, " table"), _id(tok, " road")]
    ids = torch.tensor(anchored + generic + neutral)
    G = torch.zeros(len(ids), 2)
    G[:3, 0] = torch.tensor([3.0, 1.0, 1.0])
    G[3:6, 1] = torch.tensor([3.0, 2.0, 1.0])
    G[6:, :] = 0.5
    labels = torch.tensor([CONCEPT_ONLY] * 6 + [BACKGROUND_ONLY] * 2)
    feats = EmbeddingFeatures("Harry Potter", ids, labels, labels.float(), torch.randn(8, 2), G, {}, 1.0)
    ctx = SelectionContext(tok, "Harry Potter", ["Harry Potter", "Hogwarts"])
    rep = select_features(feats, _scfg(), ctx)
    assert rep.loc[0, "anchor"] == 0.6  # 3 of the 5 units of concept-only mass lie on ' Harry'
    assert rep.loc[1, "anchor"] == 0.0
    assert list(rep["selected"]) == [True, False]
    assert list(select_features(feats, _scfg(anchor_thresh=0.7), ctx)["selected"]) == [False, False]
    assert list(select_features(feats, _scfg(name="anchor+ratio", ratio_thresh=0.0), ctx)["selected"]) == [True, False]


def test_general_text_is_shipped_and_off_topic() -> None:
    store = ConceptStore(STARTER_DIR)
    text = store.general_text
    assert len(text) >= 300 and len(set(text)) == len(text)
    terms = [t.lower() for ts in store._key_terms.values() for t in ts]
    hits = [s for s in text for t in terms if re.search(rf"\b{re.escape(t)}\b", s.lower())]  # "Hogwarts," too
    assert not hits, hits
