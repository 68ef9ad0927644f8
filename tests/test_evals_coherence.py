"""Coherence: relevance (MiniLM) and fluency (base-model log-likelihood) drop for garbled output, not otherwise."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf

from ember.config import EvalConfig
from ember.evals.coherence import (
    evaluate_coherence,
    fluency_scores,
    relevance_scores,
    sentence_encoder,
    split_instructions,
)
from ember.evals.suite import relative

INSTRUCTIONS = [
    "Give three tips for staying healthy.", "Explain why the sky is blue.", "Write a short poem about autumn.",
    "Describe how to make a cup of tea.", "What are the benefits of reading books?", "List some uses of a computer.",
]


def _cfg(**kw) -> EvalConfig:
    return OmegaConf.structured(EvalConfig(**{"coherence_max_new_tokens": 16, "batch_size": 8, **kw}))


def _fracs(res, base) -> dict:
    s = {"relevance": res.relevance, "fluency": res.fluency}
    b = {"relevance": base.relevance, "fluency": base.fluency}
    return relative(s, b)


def test_encoder_is_cached_and_relevance_ranks_related_text_higher() -> None:
    assert sentence_encoder() is sentence_encoder()
    rel = relevance_scores(["Explain how to bake bread."] * 3,
                           ["Mix flour, water and yeast, let the dough rise, then bake it in a hot oven.",
                            "The stock market closed lower on Tuesday.", ""])
    assert rel[0] > 0.5 > rel[1] and rel[2] == 0.0


def test_fluency_floors_an_empty_completion_at_the_uniform_score(tiny) -> None:
    prompts = ["Question: What colour is the sky?\nAnswer:"] * 2
    flu = fluency_scores(tiny.model, tiny.tokenizer, prompts, ["blue", ""])
    assert flu[1] == pytest.approx(-math.log(tiny.model.get_output_embeddings().weight.shape[0]))
    assert math.isfinite(flu[0])


def test_fluency_prefers_real_text_to_the_same_words_shuffled(smollm2) -> None:
    """On a real model (a random one has no preference): the same words, in order and scrambled."""
    prompt = "Question: What colour is the sky on a clear day?\nAnswer:"
    real = ["The sky is blue on a clear day.", "Bread is made from flour, water and yeast."]
    shuffled = ["day clear blue The on is sky a.", "yeast flour from and made Bread water is."]
    flu = fluency_scores(smollm2.model, smollm2.tokenizer, [prompt] * 4, real + shuffled)
    assert flu[0] > flu[2] and flu[1] > flu[3], flu


def test_fluency_scores_the_completion_after_the_prompt_the_model_was_given(tiny) -> None:
    """SmolLM2's BOS text is its turn marker <|im_start|>: the chat prompt keeps it (it used to be cut off),
    and the completion is scored on its own tokens (the prompt's trailing newline is not scored)."""
    from ember.evals.mc import build_chat_prompt, generate_greedy

    tok = tiny.tokenizer
    prompt = build_chat_prompt(tok, INSTRUCTIONS[0], use_chat=True)
    assert prompt.startswith(tok.bos_token) and prompt.endswith("\n")
    completion = generate_greedy(tiny.model, tok, [prompt], max_new_tokens=6)[0]
    ctx = tok(prompt, add_special_tokens=False)["input_ids"]
    cont = tok(completion, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(tiny.model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    expected = float(sum(logp[len(ctx) + j - 1, t] for j, t in enumerate(cont))) / len(cont)
    (got,) = fluency_scores(tiny.model, tok, [prompt], [completion])
    assert got == pytest.approx(expected, abs=1e-4)


def test_bos_follows_lm_evals_rule(tiny, tiny_gemma) -> None:
    """Gemma always; otherwise where the tokenizer adds BOS by default (Llama-3), never for SmolLM2's."""
    from tokenizers.processors import TemplateProcessing

    from ember.evals.loglik import wants_bos

    assert not wants_bos(tiny.model, tiny.tokenizer) and wants_bos(tiny_gemma.model, tiny_gemma.tokenizer)
    llama_like = copy.deepcopy(tiny.tokenizer)
    bos = (llama_like.bos_token, llama_like.bos_token_id)
    llama_like._tokenizer.post_processor = TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos])
    assert llama_like("x")["input_ids"][0] == bos[1]
    assert wants_bos(tiny.model, llama_like)


def test_split_instructions_are_disjoint() -> None:
    tr, te = split_instructions(INSTRUCTIONS, "train", None), split_instructions(INSTRUCTIONS, "test", 2)
    assert tr == INSTRUCTIONS[0::2] and te == INSTRUCTIONS[1::2][:2] and not set(tr) & set(te)


def test_unchanged_model_keeps_full_coherence(tiny) -> None:
    cfg = _cfg(coherence_max_new_tokens=8)
    base = evaluate_coherence(tiny.model, tiny.tokenizer, INSTRUCTIONS[:3], cfg)
    again = evaluate_coherence(tiny.model, tiny.tokenizer, INSTRUCTIONS[:3], cfg, judge_model=tiny.model)
    assert [i.completion for i in again.items] == [i.completion for i in base.items]
    r = _fracs(again, base)
    assert r["relevance_frac"] == pytest.approx(1.0) and r["fluency_frac"] == pytest.approx(1.0)
    assert r["coherence"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def smol_base(smollm2):
    torch.set_num_threads(1)
    cfg = _cfg(coherence_max_new_tokens=12)
    return cfg, evaluate_coherence(smollm2.model, smollm2.tokenizer, INSTRUCTIONS[:4], cfg)


@pytest.mark.slow
@pytest.mark.parametrize("garble", ["none", "permute", "zero"])
def test_coherence_drops_for_garbled_output_on_smollm2(smollm2, smol_base, garble: str) -> None:
    model, tok = smollm2.model, smollm2.tokenizer
    cfg, base = smol_base
    assert base.relevance > 0.3 and base.fluency > -3.0  # a working model answers on topic, fluently
    edited = copy.deepcopy(model)
    with torch.no_grad():
        w = edited.get_input_embeddings().weight
        if garble == "zero":
            w.zero_()
        elif garble == "permute":
            w.copy_(w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))])
    r = _fracs(evaluate_coherence(edited, tok, INSTRUCTIONS[:4], cfg, judge_model=model), base)
    if garble == "none":
        assert r["relevance_frac"] == pytest.approx(1.0) and r["fluency_frac"] == pytest.approx(1.0)
    else:
        assert r["relevance_frac"] < 0.5 and r["fluency_frac"] < 0.1 and r["coherence"] < 0.2, r
