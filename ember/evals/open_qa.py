"""Open-ended QA: greedy answers judged locally (default) or by an LLM on an OpenAI-compatible endpoint.

Prompt ``Question: {q}\\nAnswer:`` (in the chat template when the model has one and the config
asks for it), greedy decoding. The answer is the first non-empty line of the generation (small
base models continue with a new ``Question:``), with the list that follows when that line ends
with a colon.

The paper judges answers with Gemini. This project's default, offline **local judge** calls an
answer correct when, after SQuAD-style normalisation (lower case, no punctuation or articles,
single spaces), the gold answer appears in the attempt as a whole-word phrase, the attempt equals
it, or the token F1 between them reaches ``f1_threshold``; an item's ``aliases`` are tried as gold
answers too. ``open_judge=llm`` uses
:mod:`ember.evals.llm_judge` instead (binary verdict).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ember.data import OpenQuestion
from ember.evals.mc import build_chat_prompt, generate_greedy

OPEN_TEMPLATE = "Question: {q}\nAnswer:"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"\u2019", "\u2018", "\u201c", "\u201d", "\u2013", "\u2014"}


@dataclass
class OpenItem:
    qid: str
    question: str
    gold: str
    answer: str
    correct: bool
    f1: float
    judge_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class OpenResult:
    acc: float
    mean_f1: float
    n: int
    judge: str
    items: list[OpenItem]

    def summary(self) -> dict[str, Any]:
        return {"acc": self.acc, "f1": self.mean_f1, "n": self.n, "judge": self.judge}


# --------------------------------------------------------------------------------------------------
# the local judge


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, articles removed, whitespace collapsed (SQuAD's normalisation)."""
    text = "".join(" " if ch in _PUNCT else ch for ch in text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(pred: str, gold: str) -> float:
    """Token-overlap F1 between normalised answers (0 when either is empty)."""
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def contains_phrase(haystack: str, needle: str) -> bool:
    """Whole-word containment of normalised ``needle`` in normalised ``haystack``."""
    h, n = normalize_answer(haystack), normalize_answer(needle)
    return bool(n) and f" {n} " in f" {h} "


def one_side_contains_the_other(pred: str, gold: str) -> bool:
    """Every word of one answer is among the other's (a partial answer, "Snape" for "Severus Snape", or a
    wordier one in another order): what separates a near miss from a substitution that shares a word
    ("Regulus Black" for "Sirius Black", "World War I" for "World War II")."""
    p, g = Counter(normalize_answer(pred).split()), Counter(normalize_answer(gold).split())
    return bool(p) and bool(g) and (not p - g or not g - p)


def local_judge(pred: str, gold: str, f1_threshold: float = 0.5) -> tuple[bool, float, str]:
    """(correct, token F1, which rule decided): exact / contained / f1 / none. The F1 rule accepts only
    when one answer's words contain the other's (:func:`one_side_contains_the_other`)."""
    f1 = token_f1(pred, gold)
    if normalize_answer(pred) and normalize_answer(pred) == normalize_answer(gold):
        return True, f1, "exact"
    if contains_phrase(pred, gold):
        return True, f1, "contained"
    if f1 >= f1_threshold and one_side_contains_the_other(pred, gold):
        return True, f1, "f1"
    return False, f1, "none"


def judge_against_answers(pred: str, answers: Sequence[str], f1_threshold: float = 0.5) -> tuple[bool, float, str]:
    """:func:`local_judge` against every accepted answer (the gold one, then its aliases): correct when
    one accepts, with the best token F1 over them (SQuAD's max over references)."""
    verdicts = [local_judge(pred, gold, f1_threshold) for gold in answers]
    best_f1 = max(v[1] for v in verdicts)
    hit = next((v for v in verdicts if v[0]), None)
    return (True, best_f1, hit[2]) if hit else (False, best_f1, "none")


# --------------------------------------------------------------------------------------------------
# generation


def extract_answer(generation: str, max_lines: int = 5) -> str:
    """The first non-empty line; when it ends with ``:`` (a lead-in: "The answer is:", "**Answer:**", a
    list) the lines that follow it, blank lines between them and it skipped, up to the next blank one.

    Empty when the model skips the answer and starts a new ``Question:``."""
    lines = [ln.strip() for ln in full_answer(generation).splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    if not lines:
        return ""
    out = [lines[0]]
    if out[0].rstrip("*").endswith(":"):
        rest = lines[1:]
        while rest and not rest[0]:
            rest.pop(0)
        for ln in rest[:max_lines]:
            if not ln:
                break
            out.append(ln)
    return " ".join(out)


def full_answer(generation: str) -> str:
    """The generation up to a new ``Question:`` the model may start: what an LLM judge reads (the
    reference's judge gets the whole answer, reference-spec 5.4)."""
    kept = []
    for ln in generation.splitlines():
        if ln.strip().startswith("Question:"):
            break
        kept.append(ln)
    return "\n".join(kept).strip()


def answer_questions(
    model: nn.Module, tokenizer: Any, questions: Sequence[OpenQuestion], use_chat: bool = True,
    max_new_tokens: int = 24, batch_size: int = 16, progress: bool = False, template: str = OPEN_TEMPLATE,
) -> list[str]:
    """Greedy raw generations for each question."""
    prompts = [build_chat_prompt(tokenizer, template.format(q=q.q), use_chat) for q in questions]
    return generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, progress, desc="open-qa")


def reference_text(q: OpenQuestion) -> str:
    """The reference answer as the LLM judge reads it: the gold answer and any aliases."""
    return q.a + (f" (also accepted: {'; '.join(q.aliases)})" if q.aliases else "")


def judge_answers(
    questions: Sequence[OpenQuestion], answers: Sequence[str], judge: str = "local", f1_threshold: float = 0.5,
    client: Any = None, threads: int = 8, attempts: Sequence[str] | None = None,
) -> OpenResult:
    """Score extracted answers with the local judge or an :class:`~ember.evals.llm_judge.ChatClient`
    (which reads ``attempts``, the whole answers, when given)."""
    local = [judge_against_answers(a, q.answers, f1_threshold) for q, a in zip(questions, answers, strict=True)]
    f1s = [v[1] for v in local]
    if judge == "local":
        oks, notes = [v[0] for v in local], [v[2] for v in local]
    elif judge == "llm":
        from ember.evals.llm_judge import judge_open_answer, parallel_map

        if client is None:
            raise ValueError("open_judge='llm' needs a ChatClient")
        res = parallel_map(lambda qa: judge_open_answer(client, qa[0].q, reference_text(qa[0]), qa[1]),
                           list(zip(questions, attempts if attempts is not None else answers, strict=True)), threads)
        oks, notes = [r[0] for r in res], [r[1] for r in res]
    else:
        raise ValueError(f"unknown open-QA judge {judge!r}: use 'local' or 'llm'")
    items = [OpenItem(qid=q.qid, question=q.q, gold=q.a, answer=a, correct=ok, f1=f1, judge_note=note)
             for q, a, ok, f1, note in zip(questions, answers, oks, f1s, notes, strict=True)]
    n = len(items)
    acc = sum(i.correct for i in items) / n if n else float("nan")
    mean_f1 = sum(f1s) / n if n else float("nan")
    return OpenResult(acc=acc, mean_f1=mean_f1, n=n, judge=judge, items=items)


def evaluate_open(
    model: nn.Module, tokenizer: Any, questions: Sequence[OpenQuestion], cfg: Any, use_chat: bool = True,
    progress: bool = False, client: Any = None,
) -> OpenResult:
    """Generate, extract and judge; ``cfg`` is an ``EvalConfig`` (open_judge, f1_threshold, ...)."""
    raw = answer_questions(model, tokenizer, questions, use_chat, cfg.open_max_new_tokens, cfg.batch_size, progress)
    answers = [extract_answer(r) for r in raw]
    if cfg.open_judge == "llm" and client is None:
        from ember.evals.llm_judge import client_from_config

        client = client_from_config(cfg)
    return judge_answers(questions, answers, cfg.open_judge, cfg.f1_threshold, client,
                         int(getattr(cfg, "llm_threads", 8)), attempts=[full_answer(r) for r in raw])
