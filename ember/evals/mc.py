"""Multiple-choice QA: log-likelihood scoring (default) and the paper's letter generation.

``loglik`` scores each option as a continuation of the question prompt (lm-eval's
multiple_choice convention) and reports accuracy, length-normalised accuracy and the mean
probability of the correct option (softmax over the options' summed log-likelihoods), a
continuous measure with less noise than accuracy on small models. ``letter`` is the paper's
format: options labelled A-D in the chat template, greedy generation, first standalone letter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ember.data import MCQuestion
from ember.evals.loglik import score_continuations

LETTERS = "ABCD"


@dataclass
class MCItem:
    qid: str
    correct: bool
    correct_norm: bool
    p_correct: float
    pred: int
    answer: int
    invalid: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MCResult:
    acc: float
    acc_norm: float
    p_correct: float
    invalid: float
    n: int
    items: list[MCItem]

    def summary(self) -> dict[str, float]:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "p_correct": self.p_correct,
                "invalid": self.invalid, "n": self.n}


def _aggregate(items: list[MCItem]) -> MCResult:
    n = len(items)
    if n == 0:
        return MCResult(float("nan"), float("nan"), float("nan"), float("nan"), 0, [])
    return MCResult(
        acc=sum(i.correct for i in items) / n,
        acc_norm=sum(i.correct_norm for i in items) / n,
        p_correct=sum(i.p_correct for i in items) / n,
        invalid=sum(i.invalid for i in items) / n,
        n=n,
        items=items,
    )


def score_loglik(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    template: str = "Question: {q}\nAnswer:",
    batch_size: int = 16,
    progress: bool = False,
    prefix: str = "",
    suffix: str = "",
) -> MCResult:
    """Score options by summed log-likelihood; ``prefix``/``suffix`` wrap the prompt (attacks use them)."""
    pairs: list[tuple[str, str]] = []
    for q in questions:
        ctx = prefix + template.format(q=q.q) + suffix
        pairs.extend((ctx, " " + opt) for opt in q.options)
    scored = score_continuations(model, tokenizer, pairs, batch_size=batch_size * 4, progress=progress, desc="mc")
    items = []
    for k, q in enumerate(questions):
        s = scored[4 * k : 4 * k + 4]
        ll = [x.loglik for x in s]
        lln = [x.loglik / max(1, x.n_chars) for x in s]
        m = max(ll)
        probs = [math.exp(v - m) for v in ll]
        z = sum(probs)
        pred = max(range(len(ll)), key=lambda j: ll[j])
        pred_n = max(range(len(lln)), key=lambda j: lln[j])
        items.append(MCItem(qid=q.qid, correct=pred == q.answer, correct_norm=pred_n == q.answer,
                            p_correct=probs[q.answer] / z, pred=pred, answer=q.answer))
    return _aggregate(items)


def letter_prompt(q: MCQuestion) -> str:
    opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(q.options))
    return (
        "Answer the following multiple choice question. Reply with only the letter (A, B, C, or D) "
        f"of the correct answer.\n\nQuestion: {q.q}\n{opts}\nAnswer:"
    )


_LETTER_RE = re.compile(r"\b([ABCD])\b")


def parse_letter(text: str) -> int | None:
    """The first standalone A-D letter in a generation, as an option index (None if there is none)."""
    m = _LETTER_RE.search(text)
    return LETTERS.index(m.group(1)) if m else None


def build_chat_prompt(tokenizer: Any, text: str, use_chat: bool) -> str:
    if use_chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text


@torch.no_grad()
def generate_greedy(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 8,
    progress: bool = False, desc: str = "generate",
) -> list[str]:
    """Greedy generation, left-padded batches; returns only the new text."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = list(prompts[i : i + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                temperature=None, top_p=None, top_k=None,
            )
            out.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return out


def score_letter(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    use_chat: bool = True,
    max_new_tokens: int = 4,
    batch_size: int = 1,
    progress: bool = False,
) -> MCResult:
    """The paper's way: generate a letter per question (one at a time by default, as the reference)."""
    prompts = [build_chat_prompt(tokenizer, letter_prompt(q), use_chat) for q in questions]
    texts = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, progress, desc="mc-letter")
    items = []
    for q, t in zip(questions, texts, strict=True):
        pred = parse_letter(t)
        ok = pred == q.answer
        items.append(MCItem(qid=q.qid, correct=ok, correct_norm=ok, p_correct=float(ok),
                            pred=-1 if pred is None else pred, answer=q.answer, invalid=pred is None))
    return _aggregate(items)


MC_SCORERS = {"loglik": score_loglik, "letter": score_letter}
