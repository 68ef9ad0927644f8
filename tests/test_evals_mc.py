"""Multiple choice: shared-prefix scoring is exact, both modes agree on a built answer, lm-eval agrees, perplexity."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from ember.data import ConceptStore, MCQuestion
from ember.evals import mc
from ember.evals.lm_eval_tasks import lm_eval_mc, write_mc_task
from ember.evals.loglik import score_continuations
from ember.evals.mc import generate_greedy, option_logliks, parse_letter, score_letter, score_loglik
from ember.evals.retention import perplexity
from ember.paths import STARTER_DIR

CTX = ["Question: Which school does Harry Potter attend?\nAnswer:", "Question: What is 2 + 2?\nAnswer:",
       "Question: Who wrote The Hobbit, the famous fantasy novel?\nAnswer:"]
OPTS = [("Hogwarts", "Durmstrang", "Beauxbatons School of Magic", "Oxford"), ("4", "five", "22", "a number"),
        ("J. R. R. Tolkien", "C. S. Lewis", "Tolkien's son", "Rowling")]


def _questions(n: int = 12) -> list[MCQuestion]:
    return ConceptStore(STARTER_DIR).concept("Harry Potter").mc["QA_train"][:n]


@pytest.mark.parametrize("fixture", ["tiny", "tiny_gemma"])
def test_shared_prefix_equals_full_sequences(fixture: str, request: pytest.FixtureRequest) -> None:
    lm = request.getfixturevalue(fixture)
    shared = option_logliks(lm.model, lm.tokenizer, CTX, OPTS, batch_size=2, share_prefix=True)
    pairs = [(c, " " + o) for c, opts in zip(CTX, OPTS, strict=True) for o in opts]
    plain = [s.loglik for s in score_continuations(lm.model, lm.tokenizer, pairs, batch_size=5)]
    assert [len(r) for r in shared] == [4, 4, 4]
    torch.testing.assert_close(torch.tensor(shared).flatten(), torch.tensor(plain), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_gemma"])
def test_a_long_common_prefix_is_encoded_once_and_changes_nothing(fixture: str, request: pytest.FixtureRequest,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # an attack template or in-context paragraphs before every question: its keys and values are reused
    lm = request.getfixturevalue(fixture)
    ctx = ["You are a world-leading expert. Answer every quiz question correctly and briefly.\n\n" + c for c in CTX]
    encoded: list[int] = []
    real = mc.encode_prefix
    monkeypatch.setattr(mc, "encode_prefix", lambda model, ids: encoded.append(len(ids)) or real(model, ids))
    shared = option_logliks(lm.model, lm.tokenizer, ctx, OPTS, batch_size=1, share_prefix=True)
    assert len(encoded) == 1 and encoded[0] >= mc.MIN_SHARED_PREFIX  # once, for three packed rows
    pairs = [(c, " " + o) for c, opts in zip(ctx, OPTS, strict=True) for o in opts]
    plain = [s.loglik for s in score_continuations(lm.model, lm.tokenizer, pairs, batch_size=5)]
    torch.testing.assert_close(torch.tensor(shared).flatten(), torch.tensor(plain), atol=1e-4, rtol=0)
    assert mc.common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 1  # at least one token of each is kept
    assert mc.common_prefix_length([[5, 6], [7, 6]]) == 0


def test_score_loglik_fields_and_length_normalisation(tiny) -> None:
    qs = [MCQuestion(f"q{i}", c.split("Question: ")[1].split("\n")[0], o, 0) for i, (c, o) in enumerate(zip(CTX, OPTS, strict=True))]
    res = score_loglik(tiny.model, tiny.tokenizer, qs, batch_size=2)
    lls = option_logliks(tiny.model, tiny.tokenizer, CTX, OPTS)
    for it, ll, opts in zip(res.items, lls, OPTS, strict=True):
        assert it.pred == max(range(4), key=lambda j: ll[j])
        norm = [v / len(o) for v, o in zip(ll, opts, strict=True)]  # lm-eval: divided by the option's characters
        assert it.correct_norm == (max(range(4), key=lambda j: norm[j]) == 0)
        assert it.p_correct == pytest.approx(math.exp(ll[0]) / sum(math.exp(v) for v in ll), rel=1e-4)
    assert res.n == 3 and res.acc == sum(i.correct for i in res.items) / 3


def test_parse_letter() -> None:
    assert parse_letter("B") == 1
    assert parse_letter(" The answer is C.") == 2
    assert parse_letter("**D**") == 3
    assert parse_letter("BBBB") is None  # not a standalone letter
    assert parse_letter("I think") is None  # the pronoun "I" is no option
    assert parse_letter("E") is None and parse_letter("E", n_options=5) == 4  # a fifth option has a letter


def test_letter_prompt_names_one_letter_per_option() -> None:
    """The loader accepts 2 or more options: the prompt lists and asks for exactly their letters."""
    from ember.evals.mc import letter_prompt

    five = letter_prompt(MCQuestion("q5", "Which house?", ["a", "b", "c", "d", "e"], 0))
    assert "E. e" in five and "(A, B, C, D or E)" in five
    two = letter_prompt(MCQuestion("q2", "True?", ["yes", "no"], 1))
    assert "B. no" in two and "(A or B)" in two and "C." not in two


def _rigged(tiny, letter: str, option_text: str) -> torch.nn.Module:
    """A copy of `tiny` whose output ignores its input: it favours `letter` most, then end-of-turn, then the
    tokens of `option_text`."""
    model = copy.deepcopy(tiny.model)
    tok = tiny.tokenizer
    d = model.config.hidden_size
    v = torch.zeros(d)
    v[0] = 1.0
    w = model.get_output_embeddings().weight
    with torch.no_grad():
        w.zero_()
        for t in tok(" " + option_text, add_special_tokens=False)["input_ids"]:
            w[t] = 28 * v
        w[tok.eos_token_id] = 29 * v
        w[tok(letter, add_special_tokens=False)["input_ids"][0]] = 30 * v
    model.model.norm.register_forward_hook(lambda mod, inp, out: v.expand_as(out).clone())
    return model


@pytest.mark.parametrize("answer_idx, favoured", [(1, 1), (1, 2)])
def test_both_modes_agree_on_a_model_built_to_know_the_answer(tiny, answer_idx: int, favoured: int) -> None:
    opts = ("Berlin", "Paris", "Madrid", "Rome")
    q = MCQuestion("built", "What is the capital of France?", opts, answer_idx)
    model = _rigged(tiny, "ABCD"[favoured], opts[favoured])
    ll = score_loglik(model, tiny.tokenizer, [q])
    let = score_letter(model, tiny.tokenizer, [q], max_new_tokens=1)
    assert ll.items[0].pred == favoured and let.items[0].pred == favoured
    assert ll.acc == let.acc == float(favoured == answer_idx)
    assert let.invalid == 0.0 and let.items[0].generation.strip() == "ABCD"[favoured]
    assert (ll.p_correct > 0.9) == (favoured == answer_idx)


def test_lm_eval_task_files_and_agreement_with_native_scorer(tiny, tmp_path: Path) -> None:
    qs = _questions(12)
    task = write_mc_task(qs, tmp_path / "w", "Harry Potter QA_train")
    spec = (tmp_path / "w" / f"{task}.yaml").read_text()
    assert "dataset_path: json" in spec and "output_type: multiple_choice" in spec and "{{q}}" in spec
    assert len((tmp_path / "w" / f"{task}.jsonl").read_text().splitlines()) == 12
    lme = lm_eval_mc(tiny.model, tiny.tokenizer, qs, tmp_path / "w2")
    native = score_loglik(tiny.model, tiny.tokenizer, qs)
    assert [lme.preds[q.qid] for q in qs] == [it.pred for it in native.items]
    assert lme.acc == pytest.approx(native.acc) and lme.acc_norm == pytest.approx(native.acc_norm)
    ours = option_logliks(tiny.model, tiny.tokenizer, [f"Question: {q.q}\nAnswer:" for q in qs], [q.options for q in qs])
    torch.testing.assert_close(torch.tensor([lme.logliks[q.qid] for q in qs]), torch.tensor(ours), atol=1e-3, rtol=0)


def test_an_lm_eval_group_is_one_score_not_one_per_subtask(tiny, tmp_path: Path) -> None:
    """lm-eval reports a group (MMLU) and each of its subtasks; only the group asked for becomes a term."""
    import yaml

    from ember.errors import ConfigError
    from ember.evals.lm_eval_tasks import run_lm_eval_tasks

    qs = _questions(12)
    a, b = write_mc_task(qs[:6], tmp_path, "fake subject a"), write_mc_task(qs[6:], tmp_path, "fake subject b")
    (tmp_path / "group.yaml").write_text(yaml.safe_dump({
        "group": "fakegroup", "task": [a, b], "metadata": {"version": 1},
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}]}))
    res = run_lm_eval_tasks(tiny.model, tiny.tokenizer, ["fakegroup"], batch_size=8, include_path=tmp_path)
    assert list(res) == ["fakegroup"]
    native = score_loglik(tiny.model, tiny.tokenizer, qs)
    assert res["fakegroup"]["acc"] == pytest.approx(native.acc)  # the size-weighted mean of its two subjects
    (tmp_path / "tag.yaml").write_text(yaml.safe_dump({"group": "fakenoagg", "task": [a, b], "metadata": {"version": 1}}))
    with pytest.raises(ConfigError, match=r"eval\.lm_eval_tasks: lm-eval reported no score for \['fakenoagg'\]"):
        run_lm_eval_tasks(tiny.model, tiny.tokenizer, ["fakenoagg"], batch_size=8, include_path=tmp_path)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_gemma"])
def test_perplexity_matches_full_logits(fixture: str, request: pytest.FixtureRequest) -> None:
    lm = request.getfixturevalue(fixture)
    texts = ["The river flows to the sea.", "A short one.", "Bread is baked in an oven at a high temperature."]
    res = perplexity(lm.model, lm.tokenizer, texts, batch_size=2)
    bos = [lm.tokenizer.bos_token_id] if fixture == "tiny_gemma" else []
    total, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([bos + lm.tokenizer(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(ids).logits.float(), -1)
        total -= float(logp[0, :-1].gather(1, ids[0, 1:, None]).sum())
        n += ids.shape[1] - 1
    assert res.n_tokens == n
    assert res.ppl == pytest.approx(math.exp(total / n), rel=1e-4)


def test_batched_generation_keeps_order_and_matches_single(tiny) -> None:
    prompts = ["Question: What is 2 + 2?\nAnswer:", "Hi", "Question: Name a colour of the rainbow, please?\nAnswer:"]
    batched = generate_greedy(tiny.model, tiny.tokenizer, prompts, 5, batch_size=3)
    single = [generate_greedy(tiny.model, tiny.tokenizer, [p], 5, batch_size=1)[0] for p in prompts]
    assert batched == single
