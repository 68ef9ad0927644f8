"""The model zoo: packaged models load, the float cache is faithful and fast, facts are read right."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from ember.config import model_preset
from ember.errors import ModelUnavailableError
from ember.models import embeddings_tied, load_gguf_direct, load_model, untie_embeddings

PROBE = "The capital of France is Paris, and Harry Potter studies at"


def _logits(model, tok) -> torch.Tensor:
    ids = tok(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits[0, -3:].float()


@pytest.mark.slow
@pytest.mark.parametrize("name, family, scaled, tied", [
    ("smollm2_135m", "llama", False, True),  # SmolLM2 ties lm_head to the input embeddings too
    ("gemma3_270m", "gemma3_text", True, True),
])
def test_packaged_model_cache_is_faithful_and_faster(name, family, scaled, tied, cache_dir: Path, tmp_path: Path):
    cfg = model_preset(name)
    cfg.untie_embeddings = False
    t0 = time.perf_counter()
    direct, tok = load_gguf_direct(cfg)
    gguf_s = time.perf_counter() - t0
    load_model(cfg, cache_root=cache_dir)  # builds the cache if absent
    lm2 = load_model(cfg, cache_root=cache_dir)
    assert lm2.facts.from_cache
    assert lm2.facts.load_seconds * 2 < gguf_s, (lm2.facts.load_seconds, gguf_s)
    torch.testing.assert_close(_logits(lm2.model, lm2.tokenizer), _logits(direct, tok), rtol=0, atol=1e-4)
    f = lm2.facts
    assert f.family == family
    assert f.tied_embeddings is tied
    if scaled:
        assert f.embed_scale == pytest.approx(f.d_model**0.5)
    else:
        assert f.embed_scale == 1.0


def test_tiny_random_facts(tiny, tiny_gemma) -> None:
    assert tiny.facts.family == "llama" and tiny.facts.embed_scale == 1.0
    assert not tiny.facts.tied_embeddings
    g = tiny_gemma.facts
    assert g.embed_scale == pytest.approx(64**0.5)
    assert not g.tied_embeddings, "untie_embeddings is on by default"


def test_untie_keeps_lm_head_values(cache_dir: Path) -> None:
    cfg = model_preset("tiny_random_gemma")
    cfg.untie_embeddings = False
    lm = load_model(cfg, cache_root=cache_dir)
    assert lm.facts.tied_embeddings and embeddings_tied(lm.model)
    before = lm.model.get_output_embeddings().weight.detach().clone()
    assert untie_embeddings(lm.model)
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[5] += 1.0
    torch.testing.assert_close(lm.model.get_output_embeddings().weight, before, rtol=0, atol=0)
    assert not untie_embeddings(lm.model)


def test_missing_hub_model_says_what_to_do(cache_dir: Path) -> None:
    cfg = model_preset("gemma2_2b_it")
    with pytest.raises(ModelUnavailableError, match="hub_id.*google/gemma-2-2b-it.*local"):
        load_model(cfg, cache_root=cache_dir)


def test_missing_package_says_what_to_do(cache_dir: Path) -> None:
    cfg = model_preset("smollm2_135m")
    cfg.package = "no_such_model_pkg"
    cfg.name = "x"
    with pytest.raises(ModelUnavailableError, match="make install"):
        load_model(cfg, cache_root=cache_dir / "fresh")
