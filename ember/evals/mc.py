"""Multiple-choice QA: log-likelihood scoring (default) and the paper's letter generation.

``loglik`` scores each option as a continuation of the question prompt (lm-eval's
multiple_choice convention: context + " " + option, argmax of the summed log-likelihood;
``acc_norm`` divides by the option's character length) and reports accuracy, length-normalised
accuracy and the mean probability of the correct option (softmax over the options' summed
log-likelihoods), a continuous measure with less noise than accuracy on small models.

Speed (``share_prefix``): the question prompt is shared by its options, so each question is
packed into one sequence as ``prompt, option 1, ..., option 4`` with position ids restarting
after the prompt for each option and a block attention mask that keeps the options apart; many
questions share one packed row, so there is no padding and the prompt is computed once. Only
the positions that predict option tokens are projected to the vocabulary, in chunks (Gemma-3 has
262,144 tokens). When every question's context starts with the same tokens (an attack template,
in-context paragraphs), that common prefix is encoded once and each packed row continues from a
copy of its keys and values. The result equals scoring each ``prompt + option`` alone (checked in
tests).

``letter`` is the paper's format (reference-spec 5.3): options labelled A-D in the chat template,
greedy generation of a few tokens, the first standalone letter A-D parsed, no letter = invalid.
"""

from __future__ import annotations

import copy
import math
import re
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ember.data import MCQuestion
from ember.evals.loglik import _base_model, _final_logits, encode_pair, score_continuations, wants_bos

LETTERS = string.ascii_uppercase  # option letters; the paper has four options (A-D)
#: float32 elements of vocabulary logits held at once (128 MB): rows per chunk = this / vocab size
LOGIT_BUDGET = 2**25


@dataclass
class MCItem:
    qid: str
    correct: bool
    correct_norm: bool
    p_correct: float
    pred: int
    answer: int
    invalid: bool = False
    generation: str | None = None

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


# --------------------------------------------------------------------------------------------------
# log-probabilities at selected positions


def token_logprobs(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``targets`` and whether each is the argmax, from final hidden rows (N, d).

    The vocabulary projection is done in chunks so at most :data:`LOGIT_BUDGET` logits exist at once.
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    chunk = max(1, LOGIT_BUDGET // vocab)
    lps, greedy = [], []
    for s in range(0, hidden.shape[0], chunk):
        logp = torch.log_softmax(_final_logits(model, hidden[s : s + chunk]).float(), dim=-1)
        tgt = targets[s : s + chunk]
        lps.append(logp.gather(1, tgt[:, None]).squeeze(1))
        greedy.append(logp.argmax(-1) == tgt)
    if not lps:
        return torch.zeros(0, device=hidden.device), torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return torch.cat(lps), torch.cat(greedy)


def _sliding_window(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "sliding_window", None)


def _block_mask(question: torch.Tensor, branch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (1, 1, T, T) mask: a token sees earlier tokens of its own question's prompt and of its own option."""
    t = question.shape[0]
    ar = torch.arange(t)
    allow = (question[:, None] == question[None, :]) & (ar[None, :] <= ar[:, None])
    allow &= (branch[None, :] == -1) | (branch[None, :] == branch[:, None])
    return torch.zeros((t, t), dtype=dtype).masked_fill(~allow, torch.finfo(dtype).min)[None, None]


#: a token prefix that every question's context shares is encoded once (its keys and values reused
#: by every packed row) when it is at least this long: attack templates and in-context paragraphs
MIN_SHARED_PREFIX = 8


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all ``seqs`` share, leaving at least one token of each."""
    if not seqs:
        return 0
    limit = min(len(x) for x in seqs) - 1
    n = 0
    while n < limit and all(x[n] == seqs[0][n] for x in seqs):
        n += 1
    return n


@torch.no_grad()
def encode_prefix(model: nn.Module, ids: Sequence[int]) -> Any:
    """The key/value cache of ``ids`` (one sequence), for :func:`_packed_row` to continue from."""
    device = next(model.parameters()).device
    return _base_model(model)(input_ids=torch.tensor([list(ids)], device=device), use_cache=True).past_key_values


@torch.no_grad()
def _packed_row(model: nn.Module, items: list[tuple[list[int], list[list[int]]]],
                prefix: tuple[Any, int] | None = None) -> list[list[float]]:
    """Summed log-likelihood of each continuation of each context, all packed in one sequence.

    The row holds, per question, its context once and then every option; position ids restart
    after the context for each option and a block mask keeps options from seeing each other, so
    each option is scored exactly as ``context + option`` alone, with no padding. With ``prefix``
    = (cache, length), every context continues a shared prefix whose keys and values are in the
    cache (a copy is used: the row must not grow the shared cache)."""
    device = next(model.parameters()).device
    cache, offset = (copy.deepcopy(prefix[0]), prefix[1]) if prefix else (None, 0)
    ids: list[int] = []
    pos: list[int] = []
    question: list[int] = []
    branch: list[int] = []
    predictor: list[int] = []  # index of the hidden state that predicts each option token
    targets: list[int] = []
    owner: list[int] = []  # flat option index of each option token
    n_opt = 0
    for qi, (ctx, conts) in enumerate(items):
        ctx_last = len(ids) + len(ctx) - 1
        ids += ctx
        pos += list(range(offset, offset + len(ctx)))
        question += [qi] * len(ctx)
        branch += [-1] * len(ctx)
        for k, cont in enumerate(conts):
            start = len(ids)
            ids += cont
            pos += list(range(offset + len(ctx), offset + len(ctx) + len(cont)))
            question += [qi] * len(cont)
            branch += [k] * len(cont)
            predictor += [ctx_last] + list(range(start, start + len(cont) - 1))
            targets += cont
            owner += [n_opt] * len(cont)
            n_opt += 1
    dtype = next(model.parameters()).dtype
    mask = _block_mask(torch.tensor(question), torch.tensor(branch), dtype)
    if offset:  # every token sees the whole shared prefix
        mask = torch.cat([torch.zeros((*mask.shape[:3], offset), dtype=dtype), mask], dim=-1)
    hidden = _base_model(model)(
        input_ids=torch.tensor([ids], device=device), attention_mask=mask.to(device),
        position_ids=torch.tensor([pos], device=device),
        **({"past_key_values": cache, "use_cache": True} if cache is not None else {}),
    ).last_hidden_state[0]
    lp, _ = token_logprobs(model, hidden[torch.tensor(predictor, device=device)], torch.tensor(targets, device=device))
    sums = torch.zeros(n_opt, device=device).index_add_(0, torch.tensor(owner, device=device), lp).tolist()
    out, k = [], 0
    for _, conts in items:
        out.append(sums[k : k + len(conts)])
        k += len(conts)
    return out


def _pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bins of item indices whose lengths sum to at most ``capacity`` (or one item)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r in range(len(rows)):
            if room[r] >= lengths[i]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


#: packed tokens per forward pass for each question of ``batch_size`` (16 questions -> 256 tokens: shorter rows waste less on attention)
TOKENS_PER_QUESTION = 16


def option_logliks(
    model: nn.Module,
    tokenizer: Any,
    contexts: Sequence[str],
    options: Sequence[Sequence[str]],
    batch_size: int = 16,
    share_prefix: bool = True,
    progress: bool = False,
) -> list[list[float]]:
    """Summed log-likelihood of ``" " + option`` after each context (lm-eval's multiple_choice request)."""
    bos = wants_bos(model, tokenizer)
    enc = [[encode_pair(tokenizer, c, " " + o, bos) for o in opts] for c, opts in zip(contexts, options, strict=True)]
    window = _sliding_window(model)
    shareable = [
        share_prefix and all(e[0] == es[0][0] for e in es)
        and (window is None or len(es[0][0]) + max(len(e[1]) for e in es) < window)
        for es in enc
    ]
    result: list[list[float] | None] = [None] * len(enc)
    plain = [i for i, s in enumerate(shareable) if not s]
    if plain:
        pairs = [(contexts[i], " " + o) for i in plain for o in options[i]]
        scored = score_continuations(model, tokenizer, pairs, batch_size=batch_size * 4, progress=progress, desc="mc")
        k = 0
        for i in plain:
            result[i] = [s.loglik for s in scored[k : k + len(options[i])]]
            k += len(options[i])
    shared = [i for i, s in enumerate(shareable) if s]
    cut = common_prefix_length([enc[i][0][0] for i in shared]) if len(shared) > 1 else 0
    prefix = (encode_prefix(model, enc[shared[0]][0][0][:cut]), cut) if cut >= MIN_SHARED_PREFIX else None
    cut = cut if prefix else 0
    seg = [len(enc[i][0][0]) - cut + sum(len(e[1]) for e in enc[i]) for i in shared]
    rows = _pack(seg, max(batch_size * TOKENS_PER_QUESTION, max(seg, default=0)))
    from tqdm.auto import tqdm

    for row in tqdm(rows, desc="mc", disable=not progress, leave=False):
        qs = [shared[j] for j in row]
        lls = _packed_row(model, [(enc[i][0][0][cut:], [e[1] for e in enc[i]]) for i in qs], prefix)
        for i, ll in zip(qs, lls, strict=True):
            result[i] = ll
    return [r for r in result if r is not None]


def _softmax(xs: Sequence[float]) -> list[float]:
    m = max(xs)
    ps = [math.exp(v - m) for v in xs]
    z = sum(ps)
    return [p / z for p in ps]


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda j: xs[j])  # first maximum, as numpy's argmax


def score_loglik(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    template: str = "Question: {q}\nAnswer:",
    batch_size: int = 16,
    progress: bool = False,
    prefix: str = "",
    suffix: str = "",
    share_prefix: bool = True,
) -> MCResult:
    """Score options by summed log-likelihood; ``prefix``/``suffix`` wrap the prompt (attacks use them).

    ``batch_size`` counts questions (each carries its options)."""
    contexts = [prefix + template.format(q=q.q) + suffix for q in questions]
    lls = option_logliks(model, tokenizer, contexts, [q.options for q in questions], batch_size, share_prefix, progress)
    items = []
    for q, ll in zip(questions, lls, strict=True):
        lln = [v / max(1, len(o)) for v, o in zip(ll, q.options, strict=True)]
        pred = _argmax(ll)
        items.append(MCItem(qid=q.qid, correct=pred == q.answer, correct_norm=_argmax(lln) == q.answer,
                            p_correct=_softmax(ll)[q.answer], pred=pred, answer=q.answer))
    return _aggregate(items)


# --------------------------------------------------------------------------------------------------
# letter generation (the paper's way)


def letter_prompt(q: MCQuestion) -> str:
    """The paper's prompt layout (reference-spec 5.3), in this project's words; one letter per option
    (A-D for the paper's four)."""
    letters = LETTERS[: len(q.options)]
    opts = "\n".join(f"{letter}. {o}" for letter, o in zip(letters, q.options, strict=True))
    choice = f"{', '.join(letters[:-1])} or {letters[-1]}"
    return (
        "Choose the single best answer to the multiple-choice question below.\n\n"
        f"Question: {q.q}\n\nChoices:\n{opts}\n\n"
        f"Reply with only the letter of your answer ({choice}), with no other text or formatting."
    )


def parse_letter(text: str, n_options: int = 4) -> int | None:
    """The first standalone option letter (A-D for four options) in a generation, as an option index
    (None if there is none)."""
    m = re.search(rf"\b([{LETTERS[:n_options]}])\b", text)
    return LETTERS.index(m.group(1)) if m else None


def build_chat_prompt(tokenizer: Any, text: str, use_chat: bool) -> str:
    if use_chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text


def with_bos(model: nn.Module, tokenizer: Any, prompt: str) -> str:
    """Prefix the BOS token text for models that need it (Gemma), once."""
    bos = tokenizer.bos_token
    if wants_bos(model, tokenizer) and bos and not prompt.startswith(bos):
        return bos + prompt
    return prompt


def strip_bos(tokenizer: Any, prompt: str) -> str:
    """Remove a leading BOS text (chat templates write it; the scorers add it themselves)."""
    bos = tokenizer.bos_token
    return prompt[len(bos):] if bos and prompt.startswith(bos) else prompt


@torch.no_grad()
def generate_greedy(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 8,
    progress: bool = False, desc: str = "generate",
) -> list[str]:
    """Greedy generation, left-padded batches sorted by length; returns only the new text, in input order.

    Models that want a BOS (:func:`~ember.evals.loglik.wants_bos`) get it once, as lm-eval and the reference do."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    texts = [with_bos(model, tokenizer, p) for p in prompts]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    out: list[str] = [""] * len(texts)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            idx = order[s : s + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                temperature=None, top_p=None, top_k=None,
            )
            decoded = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, d in zip(idx, decoded, strict=True):
                out[i] = d
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
        pred = parse_letter(t, len(q.options))
        ok = pred == q.answer
        items.append(MCItem(qid=q.qid, correct=ok, correct_norm=ok, p_correct=float(ok),
                            pred=-1 if pred is None else pred, answer=q.answer, invalid=pred is None,
                            generation=t))
    return _aggregate(items)


MC_SCORERS = {"loglik": score_loglik, "letter": score_letter}
