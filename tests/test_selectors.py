"""The semantic and LLM selectors (the LLM one against a chat server on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest
import torch

from ember.features import BACKGROUND_ONLY, CONCEPT_ONLY, EmbeddingFeatures, SelectionContext, select_features
from ember.llm_selector import parse_verdict


def planted_feats(tok) -> EmbeddingFeatures:
    """Two features: one over wizard words (concept-only), one over generic words (background)."""
    wiz = [tok(" wizard", add_special_tokens=False)["input_ids"][0], tok(" wand", add_special_tokens=False)["input_ids"][0],
           tok(" spell", add_special_tokens=False)["input_ids"][0]]
    gen = [tok(" table", add_special_tokens=False)["input_ids"][0], tok(" road", add_special_tokens=False)["input_ids"][0],
           tok(" budget", add_special_tokens=False)["input_ids"][0]]
    ids = torch.tensor(wiz + gen)
    G = torch.zeros(6, 2)
    G[:3, 0] = torch.tensor([3.0, 2.0, 1.0])
    G[3:, 1] = torch.tensor([3.0, 2.0, 1.0])
    labels = torch.tensor([CONCEPT_ONLY] * 3 + [BACKGROUND_ONLY] * 3)
    return EmbeddingFeatures("Harry Potter", ids, labels, labels.float(), torch.randn(8, 2), G, {}, 1.0)


def scfg(**kw):
    base = dict(name="semantic", ratio_thresh=0.0, purity_thresh=0.5, exclusivity_thresh=0.5, semantic_thresh=0.3,
                semantic_top_tokens=5, llm_endpoint=None, llm_model="m", llm_confidence=0.85, llm_top_tokens=5)
    return SimpleNamespace(**(base | kw))


@pytest.mark.slow
def test_semantic_selector_prefers_the_concept_feature(tiny) -> None:
    feats = planted_feats(tiny.tokenizer)
    ctx = SelectionContext(tiny.tokenizer, "Harry Potter", ["Harry Potter", "wizard magic"])
    rep = select_features(feats, scfg(), ctx)
    assert rep.loc[0, "semantic"] > rep.loc[1, "semantic"]
    assert bool(rep.loc[0, "selected"]) and not bool(rep.loc[1, "selected"])


class _Chat(BaseHTTPRequestHandler):
    calls: list[str] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        _Chat.calls.append(user)
        if user.startswith("Tokens:"):
            text = "Wizards and magic." if ("wiz" in user or "wand" in user) else "Everyday objects and money."
        else:
            text = json.dumps({"is_member": "Wizards" in user, "confidence": 0.9 if "Wizards" in user else 0.95})
        out = json.dumps({"choices": [{"message": {"content": text}, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a) -> None:
        pass


def test_llm_selector_against_a_local_server(tiny) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Chat)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        feats = planted_feats(tiny.tokenizer)
        ctx = SelectionContext(tiny.tokenizer, "Harry Potter", ["Harry Potter"])
        rep = select_features(feats, scfg(name="llm", llm_endpoint=f"http://127.0.0.1:{server.server_port}/v1"), ctx)
    finally:
        server.shutdown()
    assert list(rep["selected"]) == [True, False]
    assert rep.loc[0, "llm_description"] == "Wizards and magic."
    assert len(_Chat.calls) == 4  # description + membership for each of the two candidates


def test_llm_selector_needs_an_endpoint(tiny) -> None:
    from ember.errors import ConfigError

    with pytest.raises(ConfigError, match="ember.selector.llm_endpoint"):
        select_features(planted_feats(tiny.tokenizer), scfg(name="llm"), SelectionContext(tiny.tokenizer, "c", ["c"]))


def test_parse_verdict() -> None:
    assert parse_verdict('Sure: {"is_member": true, "confidence": 0.9}') == (True, 0.9)
    assert parse_verdict("no json here") is None
