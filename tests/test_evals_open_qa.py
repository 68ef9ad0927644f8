"""Open QA: the local judge on hand-made pairs, answer extraction, and the LLM judge against a local HTTP server."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from omegaconf import OmegaConf

from ember.config import EvalConfig
from ember.data import OpenQuestion
from ember.errors import ConfigError
from ember.evals.llm_judge import ChatClient, JudgeError, parse_correct, parse_rating, rate_coherence
from ember.evals.open_qa import (
    extract_answer,
    full_answer,
    judge_answers,
    local_judge,
    normalize_answer,
    token_f1,
)

# --------------------------------------------------------------------------------------------------
# the local judge


@pytest.mark.parametrize("pred, gold, ok, rule", [
    ("Hedwig", "Hedwig", True, "exact"),
    ("hedwig.", "Hedwig", True, "exact"),
    ("The answer is Hedwig, a snowy owl.", "Hedwig", True, "contained"),
    ("J.K. Rowling wrote them", "J. K. Rowling", True, "contained"),  # both normalise to "j k rowling"
    ("Rowling", "J. K. Rowling", False, "none"),  # P = 1, R = 1/3: F1 = 0.5 < 0.6
    ("Severus Snape", "Snape", True, "contained"),
    ("Expecto Patronum charm", "Expecto Patronum", True, "contained"),
    ("Errol", "Hedwig", False, "none"),
    ("", "Hedwig", False, "none"),
    ("Hedwigs", "Hedwig", False, "none"),  # containment is whole-word
    ("1945", "In 1945", True, "f1"),  # "1945" vs "in 1945": P = 1, R = 1/2, F1 = 0.67
    ("the Ministry of Magic building", "Ministry of Magic", True, "contained"),
])
def test_local_judge_pairs(pred: str, gold: str, ok: bool, rule: str) -> None:
    got_ok, f1, got_rule = local_judge(pred, gold, f1_threshold=0.6)
    assert got_ok is ok, (pred, gold, f1, got_rule)
    assert got_rule == rule


def test_aliases_are_accepted_answers() -> None:
    """An item's aliases count as the gold answer for the local judge (F1: the best over them, as SQuAD's
    max over references); the LLM judge is told them."""
    from ember.evals.open_qa import judge_against_answers, reference_text

    q = OpenQuestion("s", "Which god murdered Osiris?", "Set", aliases=("Seth", "Sutekh"))
    assert q.answers == ("Set", "Seth", "Sutekh")
    assert judge_against_answers("It was Seth, his brother.", q.answers) == (True, pytest.approx(2 / 6), "contained")
    assert judge_against_answers("Seth", q.answers)[1:] == (1.0, "exact")
    assert judge_against_answers("Horus", q.answers) == (False, 0.0, "none")
    assert not local_judge("It was Seth, his brother.", "Set")[0]  # without the alias: wrong
    res = judge_answers([q], ["Seth"], judge="local")
    assert res.acc == 1.0 and res.mean_f1 == 1.0 and res.items[0].gold == "Set"
    assert reference_text(q) == "Set (also accepted: Seth; Sutekh)"
    assert reference_text(OpenQuestion("h", "Owl?", "Hedwig")) == "Hedwig"


def test_local_judge_f1_rule_and_threshold() -> None:
    # "harry and ron" vs "harry ron and hermione": common 3 tokens, P = 1, R = 3/4 -> F1 = 6/7
    assert token_f1("Harry and Ron", "Harry, Ron and Hermione") == pytest.approx(6 / 7)
    ok, f1, rule = local_judge("Harry and Ron", "Harry, Ron and Hermione", f1_threshold=0.5)
    assert ok and rule == "f1"
    assert not local_judge("Harry and Ron", "Harry, Ron and Hermione", f1_threshold=0.9)[0]


@pytest.mark.parametrize("pred, gold", [
    ("Regulus Black", "Sirius Black"),  # F1 0.5: another member of the family
    ("James Potter", "Harry Potter"),
    ("World War I", "World War II"),  # F1 0.67
    ("Han Solo's father", "Luke Skywalker's father"),
])
def test_an_answer_that_swaps_a_word_for_another_is_not_a_near_miss(pred: str, gold: str) -> None:
    """Token F1 >= 0.5 alone took a different entity sharing a word with the gold for right; the F1 rule
    now needs one answer's words to contain the other's."""
    assert token_f1(pred, gold) >= 0.5
    assert local_judge(pred, gold) == (False, pytest.approx(token_f1(pred, gold)), "none")


def test_a_partial_or_reordered_answer_still_passes_the_f1_rule() -> None:
    assert local_judge("Snape", "Severus Snape") == (True, pytest.approx(2 / 3), "f1")  # P 1, R 1/2
    assert local_judge("Granger, Hermione", "Hermione Granger") == (True, 1.0, "f1")  # not contiguous


def test_normalisation_and_f1_hand_computed() -> None:
    assert normalize_answer("  The Boy-Who-Lived!  ") == "boy who lived"
    assert token_f1("boy who lived", "the boy who lived") == 1.0
    assert token_f1("x y z w", "x y") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("a cat", "the cat") == 1.0  # articles are dropped
    assert token_f1("", "x") == 0.0


def test_extract_answer() -> None:
    assert extract_answer(" Hedwig\nQuestion: What is...") == "Hedwig"
    assert extract_answer("\n\n  Hogwarts School  \nmore") == "Hogwarts School"
    assert extract_answer("\nQuestion: Who?") == ""
    assert extract_answer("   ") == ""
    assert extract_answer("Ron's twin brothers are:\n- Fred\n- George\n\nMore text") == (
        "Ron's twin brothers are: - Fred - George")
    # a lead-in line, then a blank line, then the answer (instruct models format answers so)
    assert extract_answer("The answer is:\n\n**Hagrid**") == "The answer is: **Hagrid**"
    assert extract_answer("**Answer:**\nHagrid\n\nHe is the keeper of keys.") == "**Answer:** Hagrid"
    assert full_answer("Hagrid, the keeper of keys.\n\nHe lives in a hut.\nQuestion: Who?") == (
        "Hagrid, the keeper of keys.\n\nHe lives in a hut.")


# --------------------------------------------------------------------------------------------------
# the LLM judge on an OpenAI-style server


class _Judge(BaseHTTPRequestHandler):
    """Grades by substring: correct iff the reference answer appears in the attempt; 0-2 ratings fixed."""

    fail_first = 0
    rate_up_to: int | None = None  # rate only texts of at most this many characters (else no rating)
    seen: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        text = body["messages"][-1]["content"]
        if "Reference answer:" in text:
            gold = re.search(r"Reference answer: (.*)", text).group(1).strip().lower()
            pred = re.search(r"Attempted answer: (.*?)(?:\n\nThe attempt counts|$)", text, re.S).group(1).strip().lower()
            reply = f"The attempt {'matches' if gold in pred else 'differs'}.\nCorrect: {int(gold in pred)}"
        elif (cap := type(self).rate_up_to) is not None and len(_rated_text(text)) > cap:
            reply = "I cannot rate this."
        elif "Rate only the fluency" in text:
            reply = "Readable.\nRating: [[1]]"
        else:
            reply = "On topic.\nRating: [[2]]"
        out = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"], "choices": [
            {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


def _rated_text(prompt: str) -> str:
    """The completion inside a coherence prompt (after ``Response:`` or ``Text:``, up to the blank line)."""
    return re.search(r"(?:Response|Text): (.*?)\n\n", prompt, re.S).group(1)


@pytest.fixture
def judge_url() -> Iterator[str]:
    _Judge.seen = []
    _Judge.fail_first = 0
    _Judge.rate_up_to = None
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


QS = [OpenQuestion("a", "What is the name of Harry's owl?", "Hedwig"),
      OpenQuestion("b", "Who is the headmaster of Hogwarts?", "Dumbledore"),
      OpenQuestion("c", "What sport is played on broomsticks?", "Quidditch")]


def test_llm_judge_verdicts_from_server(judge_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_TEST_KEY", "secret-token")
    client = ChatClient(judge_url, "judge-model", api_key_env="EMBER_TEST_KEY", backoff_s=0.01)
    res = judge_answers(QS, ["It is Hedwig.", "Snape", ""], judge="llm", client=client, threads=3)
    assert [i.correct for i in res.items] == [True, False, False]
    assert res.acc == pytest.approx(1 / 3) and res.judge == "llm"
    assert len(_Judge.seen) == 2  # the empty answer is wrong without a call
    assert all(s["path"] == "/v1/chat/completions" for s in _Judge.seen)
    assert all(s["auth"] == "Bearer secret-token" for s in _Judge.seen)
    assert _Judge.seen[0]["body"]["model"] == "judge-model"


def test_llm_judge_reads_the_whole_answer(judge_url: str) -> None:
    """The local judge reads the extracted answer; the LLM judge the whole one (reference-spec 5.4)."""
    client = ChatClient(judge_url, "judge-model", backoff_s=0.01)
    raw = "Her name is given later:\n\nThe owl belongs to Harry.\n\nIt is Hedwig, a snowy owl."
    answer = extract_answer(raw)
    assert "Hedwig" not in answer
    res = judge_answers(QS[:1], [answer], judge="llm", client=client, attempts=[full_answer(raw)])
    assert res.items[0].correct and res.items[0].answer == answer


def test_llm_judge_retries_transient_errors(judge_url: str) -> None:
    _Judge.fail_first = 2
    client = ChatClient(judge_url, "m", api_key_env=None, backoff_s=0.01, max_retries=3)
    assert client.chat([{"role": "user", "content": "Reference answer: x\nAttempted answer: x"}]).endswith("Correct: 1")
    assert client.calls == 3
    _Judge.fail_first = 5
    with pytest.raises(JudgeError, match="no usable answer"):
        client.chat([{"role": "user", "content": "hi"}])


def test_coherence_ratings_from_server(judge_url: str) -> None:
    client = ChatClient(judge_url, "m", backoff_s=0.01)
    assert rate_coherence(client, "Describe autumn.", "Leaves fall and turn red.") == (2, 1, False)
    assert rate_coherence(client, "Describe autumn.", "  ") == (0, 0, False)
    fluency_texts = [_rated_text(s["body"]["messages"][-1]["content"]) for s in _Judge.seen
                     if "Rate only the fluency" in s["body"]["messages"][-1]["content"]]
    assert fluency_texts == ["Leaves fall and turn red.."]  # the reference appends a full stop


def test_coherence_ratings_retry_with_the_completion_cut_to_150_then_50_characters(judge_url: str) -> None:
    """Reference-spec 5.5: a rating that fails is retried on the completion's first 150, then 50
    characters; after that it counts 0 and the item is a judge failure."""
    client = ChatClient(judge_url, "m", backoff_s=0.01)
    completion = "Autumn leaves drift down. " * 12  # 312 characters
    _Judge.rate_up_to = 60
    assert rate_coherence(client, "Describe autumn.", completion) == (2, 1, False)
    lengths = [len(_rated_text(s["body"]["messages"][-1]["content"])) for s in _Judge.seen]
    stripped = len(completion.strip())
    assert lengths == [stripped, 150, 50, stripped + 1, 151, 51]  # relevance tries, then fluency's (with ".")
    _Judge.seen, _Judge.rate_up_to = [], 10
    assert rate_coherence(client, "Describe autumn.", completion) == (0, 0, True)
    assert len(_Judge.seen) == 6
    _Judge.seen = []
    assert rate_coherence(client, "Describe autumn.", "Leaves fall, turn red and gather.") == (0, 0, True)
    assert len(_Judge.seen) == 2  # a completion shorter than 50 characters has nothing to cut


def test_parsers() -> None:
    assert parse_correct("Matches the reference.\nCorrect: 1") is True
    assert parse_correct("Correct: 0 because it is wrong\n(no more)") is False  # fallback anywhere
    assert parse_correct("**Correct:** 1") is True
    assert parse_correct("no verdict") is None
    assert parse_rating("Fine.\nRating: [[2]]") == 2 and parse_rating("Rating: 3") is None


def test_suite_uses_the_llm_judge_from_config(tiny, judge_url: str) -> None:
    from ember.data import ConceptStore
    from ember.evals.suite import evaluate
    from ember.paths import STARTER_DIR

    store = ConceptStore(STARTER_DIR)
    concept = store.concept("Harry Potter")
    cfg = OmegaConf.structured(EvalConfig(open_judge="llm", llm_endpoint=judge_url, max_questions=3,
                                          open_max_new_tokens=4))
    scores = evaluate(tiny.model, tiny.tokenizer, concept, store, cfg, "train", parts=["open_qa"])
    assert scores["judge"] == "llm" and scores["open_qa_n"] == 3
    assert [r["set"] for r in scores["rows"]] == ["open_qa"] * 3
    assert 0 < len(_Judge.seen) <= 3  # one call per non-empty answer
    cfg.llm_endpoint = None
    with pytest.raises(ConfigError, match="llm_endpoint"):
        evaluate(tiny.model, tiny.tokenizer, concept, store, cfg, "train", parts=["open_qa"])
