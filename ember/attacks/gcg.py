"""GCG (greedy coordinate gradient, Zou et al. 2023): one universal adversarial suffix.

The suffix (``suffix_len`` tokens) is optimised on ``n_train_questions`` train questions so that the
model prefers their correct options, then appended to every test question and scored by
log-likelihood like the plain evaluation. ``placement: suffix`` puts it right after the question
text (``"Question: <q> <suffix>\\nAnswer:"``); ``placement: prefix`` before the whole prompt.

One step: the gradient of the loss with respect to the one-hot suffix gives, per position, the
``topk`` most promising token swaps; ``n_candidates`` single-token swaps are sampled from them
(seeded), each is scored exactly, and the best one is kept if it lowers the loss (so the loss
never rises). The loss is the cross-entropy of the correct option under the softmax of the four
options' summed log-likelihoods (``loss: ce``, the multiple-choice objective), or the correct
option's mean token negative log-likelihood (``loss: nll``).

Candidates whose decoded text does not re-encode to the same tokens, alone and inside each train
prompt (a boundary token can merge with the text beside it), are dropped, so the suffix the
evaluation sees as text is the one that was optimised. Tokens outside printable ASCII and
special tokens are never proposed (``allow_non_ascii``).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ember.attacks import register_attack
from ember.attacks._lm import backbone, device_of, lm_logits
from ember.attacks.base import (
    AttackContext,
    AttackResult,
    Timer,
    item_rows,
    merge_settings,
    questions,
    require_int,
)
from ember.errors import ConfigError
from ember.evals.loglik import encode_pair, wants_bos
from ember.evals.mc import score_loglik
from ember.models import measure_embed_scale

GCG_DEFAULTS: dict[str, Any] = {
    # CPU-sized for SmolLM2-135M (a few minutes); the GCG paper uses 500 steps, 20 tokens, top-k 256,
    # 512 candidates.
    "steps": 10,
    "suffix_len": 10,
    "topk": 64,
    "n_candidates": 32,
    "n_train_questions": 4,
    "placement": "suffix",  # suffix (after the question text) | prefix (before the prompt)
    "loss": "ce",  # ce (softmax over the options) | nll (correct option's tokens)
    "init": "!",  # the initial suffix is this token repeated (with a leading space)
    "allow_non_ascii": False,
    "filter_retokenize": True,
    "eval_batch": 32,  # (suffix, question) items per forward pass when scoring candidates
    "packed": True,  # encode each context once with its options side by side (tree attention mask)
    "train_offset": 0,  # train questions used: train split [offset : offset + n_train_questions]
}


@dataclass
class _Problem:
    """Token segments of the train questions: seq = a + suffix + b + option."""

    a: list[list[int]]  # per question
    b: list[list[int]]
    conts: list[list[list[int]]]  # per question, per option
    answers: list[int]
    a_text: list[str]  # the text of a (without BOS) and of b, per question: the suffix goes between them
    b_text: list[str]
    n_bos: int  # 1 when a starts with the BOS id


def _split_template(template: str) -> tuple[str, str]:
    if template.count("{q}") != 1:
        raise ConfigError(f"eval.prompt_template={template!r}: GCG needs exactly one '{{q}}'")
    before, after = template.split("{q}")
    return before, after


def _build_problem(tok: Any, qs: Sequence[Any], template: str, placement: str, bos: bool) -> _Problem:
    before, after = _split_template(template)
    a, b, conts, a_text, b_text = [], [], [], [], []
    for q in qs:
        full = before + q.q + after
        at, bt = (before + q.q, after) if placement == "suffix" else ("", full)
        ai = tok(at, add_special_tokens=False)["input_ids"] if at else []
        bi = tok(bt, add_special_tokens=False)["input_ids"]
        if bos:
            ai = [tok.bos_token_id] + ai
        a.append(ai)
        b.append(bi)
        a_text.append(at)
        b_text.append(bt)
        conts.append([encode_pair(tok, full, " " + o, False)[1] for o in q.options])
    return _Problem(a, b, conts, [q.answer for q in qs], a_text, b_text, int(bos))


_MASKS: weakref.WeakKeyDictionary[Any, dict[tuple[int, bool], torch.Tensor]] = weakref.WeakKeyDictionary()


def allowed_token_mask(tok: Any, vocab_size: int, allow_non_ascii: bool) -> torch.Tensor:
    """True for tokens GCG may propose: decodable, non-special, printable ASCII unless allowed."""
    try:
        cache = _MASKS.setdefault(tok, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced
        cache = {}
    key = (vocab_size, allow_non_ascii)
    if key not in cache:
        cache[key] = _allowed_token_mask(tok, vocab_size, allow_non_ascii)
    return cache[key].clone()


def _allowed_token_mask(tok: Any, vocab_size: int, allow_non_ascii: bool) -> torch.Tensor:
    special = set(tok.all_special_ids or [])
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(min(vocab_size, len(tok))):
        if i in special:
            continue
        s = tok.decode([i])
        if not s or not s.strip():
            continue
        if not allow_non_ascii and not (s.isascii() and s.isprintable()):
            continue
        mask[i] = True
    return mask


@dataclass
class _Batch:
    """Sequences for a set of (suffix, question) items; each option's log-lik lands in ``n_out`` slots.

    Unpacked: one row per (suffix, question, option). Packed: one row per (suffix, question) holding
    the context then every option side by side, with a tree attention mask (each option sees the
    context and itself) and position ids restarting after the context for each option, which
    computes the same numbers with the context encoded once instead of once per option.
    """

    ids: torch.Tensor
    attn: torch.Tensor  # (R, W) padding mask, or (R, 1, W, W) additive float mask when packed
    pos: torch.Tensor | None
    rows: list[int]
    cols: list[int]
    targets: list[int]
    owners: list[int]
    suffix_at: list[int]  # per row: index of the first suffix token
    n_out: int


def _build_batch(prob: _Problem, items: list[tuple[list[int], int]], packed: bool, dtype: torch.dtype) -> _Batch:
    seqs: list[list[int]] = []
    poss: list[list[int]] = []
    allowed: list[list[tuple[int, int]]] = []  # packed: per row, per token, the [lo, hi) it may attend + ctx len
    rows, cols, targets, owners, suffix_at = [], [], [], [], []
    out = 0
    for suffix, qi in items:
        ctx = prob.a[qi] + suffix + prob.b[qi]
        n_c = len(ctx)
        if packed:
            seq, pos, spans = list(ctx), list(range(n_c)), [(0, k + 1) for k in range(n_c)]
            r = len(seqs)
            for c in prob.conts[qi]:
                start = len(seq)
                for k, t in enumerate(c):
                    rows.append(r)
                    cols.append(n_c - 1 if k == 0 else start + k - 1)
                    targets.append(t)
                    owners.append(out)
                    spans.append((start, start + k + 1))
                seq += c
                pos += list(range(n_c, n_c + len(c)))
                out += 1
            seqs.append(seq)
            poss.append(pos)
            allowed.append(spans)
            suffix_at.append(len(prob.a[qi]))
        else:
            for c in prob.conts[qi]:
                r = len(seqs)
                for k, t in enumerate(c):
                    rows.append(r)
                    cols.append(n_c + k - 1)
                    targets.append(t)
                    owners.append(out)
                seqs.append(ctx + c)
                suffix_at.append(len(prob.a[qi]))
                out += 1
    width = max(len(x) for x in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, : len(x)] = torch.tensor(x)
    if not packed:
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, x in enumerate(seqs):
            attn[r, : len(x)] = 1
        return _Batch(ids, attn, None, rows, cols, targets, owners, suffix_at, out)
    ok = torch.zeros((len(seqs), width, width), dtype=torch.bool)
    pos_t = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (x, spans) in enumerate(zip(seqs, allowed, strict=True)):
        n_c = len(prob.a[items[r][1]]) + len(items[r][0]) + len(prob.b[items[r][1]])
        for p, (lo, hi) in enumerate(spans):
            ok[r, p, :n_c] = True  # the context (causal within it: hi <= n_c there)
            ok[r, p, lo:hi] = True
            if p < n_c:
                ok[r, p, p + 1 : n_c] = False
        ok[r, len(x):, :] = False
        idx = torch.arange(len(x), width)
        ok[r, idx, idx] = True  # padding attends to itself only (no empty rows)
        pos_t[r, : len(x)] = torch.tensor(poss[r])
    attn = torch.zeros(ok.shape, dtype=dtype).masked_fill(~ok, torch.finfo(dtype).min)[:, None]
    return _Batch(ids, attn, pos_t, rows, cols, targets, owners, suffix_at, out)


def _batch_logliks(model: nn.Module, batch: _Batch, embeds: torch.Tensor) -> torch.Tensor:
    """Summed continuation log-prob per slot; only continuation positions are unembedded."""
    dev = embeds.device
    kw: dict[str, Any] = {"inputs_embeds": embeds, "attention_mask": batch.attn.to(dev)}
    if batch.pos is not None:
        kw["position_ids"] = batch.pos.to(dev)
    hidden = backbone(model)(**kw).last_hidden_state
    h = hidden[torch.tensor(batch.rows, device=dev), torch.tensor(batch.cols, device=dev)]
    logp = torch.log_softmax(lm_logits(model, h).float(), dim=-1)
    tok_lp = logp.gather(1, torch.tensor(batch.targets, device=dev)[:, None]).squeeze(1)
    return torch.zeros(batch.n_out, device=dev).index_add(0, torch.tensor(batch.owners, device=dev), tok_lp)


def _loss_from_ll(ll: torch.Tensor, prob: _Problem, loss: str) -> torch.Tensor:
    """Per-question losses averaged: ``ll`` is (n_questions * n_options,) in problem order."""
    out, k = [], 0
    for cs, ans in zip(prob.conts, prob.answers, strict=True):
        q_ll = ll[k : k + len(cs)]
        k += len(cs)
        if loss == "ce":
            out.append(-torch.log_softmax(q_ll, dim=0)[ans])
        else:
            out.append(-q_ll[ans] / len(cs[ans]))
    return torch.stack(out).mean()


def suffix_gradient(model: nn.Module, prob: _Problem, suffix: list[int], loss: str, embed_scale: float,
                    packed: bool = True) -> tuple[torch.Tensor, float]:
    """d loss / d one-hot(suffix): (suffix_len, vocab), and the loss value."""
    dev = device_of(model)
    emb = model.get_input_embeddings()
    w = emb.weight
    one_hot = torch.zeros(len(suffix), w.shape[0], device=dev, dtype=w.dtype)
    one_hot[torch.arange(len(suffix), device=dev), torch.tensor(suffix, device=dev)] = 1.0
    one_hot.requires_grad_(True)
    suf_emb = (one_hot @ w) * embed_scale
    batch = _build_batch(prob, [(suffix, i) for i in range(len(prob.a))], packed, w.dtype)
    with torch.no_grad():
        base = emb(batch.ids.to(dev))
    L = len(suffix)
    embeds = torch.stack([torch.cat([base[r, :s], suf_emb, base[r, s + L :]], dim=0)
                          for r, s in enumerate(batch.suffix_at)])
    val = _loss_from_ll(_batch_logliks(model, batch, embeds), prob, loss)
    (grad,) = torch.autograd.grad(val, one_hot)
    return grad.detach(), float(val.detach())


@torch.no_grad()
def candidate_losses(model: nn.Module, prob: _Problem, cands: list[list[int]], loss: str,
                     eval_batch: int, packed: bool = True) -> list[float]:
    """The exact loss of every candidate suffix (``eval_batch`` (suffix, question) items per pass)."""
    dev = device_of(model)
    emb = model.get_input_embeddings()
    items = [(c, i) for c in cands for i in range(len(prob.a))]
    lls = []
    for k in range(0, len(items), eval_batch):
        batch = _build_batch(prob, items[k : k + eval_batch], packed, emb.weight.dtype)
        lls.append(_batch_logliks(model, batch, emb(batch.ids.to(dev))))
    ll = torch.cat(lls)
    per = sum(len(cs) for cs in prob.conts)
    return [float(_loss_from_ll(ll[j * per : (j + 1) * per], prob, loss)) for j in range(len(cands))]


def retokenizes_in_context(tok: Any, prob: _Problem, ids: list[int]) -> bool:
    """Whether the suffix's text, placed in each train prompt, encodes to exactly the optimised tokens:
    the suffix alone re-encoding is not enough, since its first or last token can merge with the text
    beside it (the evaluation sees the prompt as text)."""
    text = tok.decode(ids)
    if tok(text, add_special_tokens=False)["input_ids"] != ids:
        return False
    return all(tok(at + text + bt, add_special_tokens=False)["input_ids"] == a[prob.n_bos:] + ids + b
               for a, b, at, bt in zip(prob.a, prob.b, prob.a_text, prob.b_text, strict=True))


def _init_suffix(tok: Any, init: str, n: int) -> list[int]:
    ids = tok(" " + init, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        ids = tok(init, add_special_tokens=False)["input_ids"][:1]
    return ids * n


def check_gcg(cfg: Mapping[str, Any] | None, concepts: Sequence[Any] = ()) -> dict[str, Any]:
    s = merge_settings("gcg", GCG_DEFAULTS, cfg)
    if s["placement"] not in ("suffix", "prefix"):
        raise ConfigError(f"attacks.gcg.placement={s['placement']!r}: use 'suffix' or 'prefix'")
    if s["loss"] not in ("ce", "nll"):
        raise ConfigError(f"attacks.gcg.loss={s['loss']!r}: use 'ce' or 'nll'")
    for key in ("steps", "suffix_len", "topk", "n_candidates", "eval_batch", "n_train_questions"):
        require_int("gcg", key, s[key])
    off, n = s["train_offset"], s["n_train_questions"]
    require_int("gcg", "train_offset", off, minimum=0)
    for c in concepts:
        if not c.mc.get("QA_train", [])[off : off + n]:
            raise ConfigError(f"attacks.gcg.train_offset={off}: concept {c.name!r} has no train questions there "
                              f"({len(c.mc.get('QA_train', []))} in QA_train)")
    return s


def optimise_suffix(model: nn.Module, tok: Any, train_qs: Sequence[Any], template: str,
                    settings: Mapping[str, Any], seed: int, progress: bool = False) -> dict[str, Any]:
    """Run GCG; returns the suffix ids and text, the loss after every step, the candidates tried."""
    s = check_gcg(settings)
    prob = _build_problem(tok, train_qs, template, s["placement"], wants_bos(model, tok))
    vocab = model.get_input_embeddings().weight.shape[0]
    allowed = allowed_token_mask(tok, vocab, s["allow_non_ascii"]).to(device_of(model))
    scale = measure_embed_scale(model)
    gen = torch.Generator().manual_seed(int(seed))
    suffix = _init_suffix(tok, s["init"], int(s["suffix_len"]))
    packed = bool(s["packed"])
    cur = candidate_losses(model, prob, [suffix], s["loss"], s["eval_batch"], packed)[0]
    history = [cur]
    n_tried = 0
    from tqdm.auto import tqdm

    for _ in tqdm(range(int(s["steps"])), desc="gcg", disable=not progress, leave=False):
        grad, _val = suffix_gradient(model, prob, suffix, s["loss"], scale, packed)
        grad = grad.float()
        grad[:, ~allowed] = float("inf")
        top = (-grad).topk(min(int(s["topk"]), int(allowed.sum())), dim=1).indices.cpu()  # (L, topk)
        L, k = top.shape
        pos = torch.randint(0, L, (int(s["n_candidates"]),), generator=gen)
        val = top[pos, torch.randint(0, k, (int(s["n_candidates"]),), generator=gen)]
        cands, seen = [], {tuple(suffix)}
        for p, v in zip(pos.tolist(), val.tolist(), strict=True):
            c = list(suffix)
            c[p] = v
            if tuple(c) in seen or (s["filter_retokenize"] and not retokenizes_in_context(tok, prob, c)):
                continue
            seen.add(tuple(c))
            cands.append(c)
        if cands:
            n_tried += len(cands)
            losses = candidate_losses(model, prob, cands, s["loss"], s["eval_batch"], packed)
            j = min(range(len(cands)), key=lambda i: losses[i])
            if losses[j] < cur:
                suffix, cur = cands[j], losses[j]
        history.append(cur)
    return {"suffix_ids": suffix, "suffix": tok.decode(suffix), "losses": history, "n_candidates_tried": n_tried}


def gcg_template(template: str, suffix_text: str, placement: str) -> tuple[str, str]:
    """The (template, prefix) that puts ``suffix_text`` where it was optimised."""
    if placement == "prefix":
        return template, suffix_text
    before, after = _split_template(template)
    esc = suffix_text.replace("{", "{{").replace("}", "}}")
    return before.replace("{", "{{").replace("}", "}}") + "{q}" + esc + after.replace("{", "{{").replace("}", "}}"), ""


@register_attack("gcg", check=check_gcg)
def run_gcg(model: Any, tok: Any, concept: Any, cfg: Mapping[str, Any] | None, ctx: AttackContext) -> AttackResult:
    s = check_gcg(cfg)
    train_all = questions(concept, ctx.train_split, None)
    off, n = int(s["train_offset"]), int(s["n_train_questions"])
    train_qs = train_all[off : off + n]
    if not train_qs:
        raise ConfigError(f"attacks.gcg.n_train_questions={n}: no train questions at offset {off}")
    test_qs = questions(concept, ctx.eval_split, ctx.max_questions)
    with Timer() as t:
        opt = optimise_suffix(model, tok, train_qs, ctx.template, s, ctx.seed, ctx.progress)
        tmpl, prefix = gcg_template(ctx.template, opt["suffix"], s["placement"])
        plain = score_loglik(model, tok, test_qs, template=ctx.template, batch_size=ctx.batch_size)
        att = score_loglik(model, tok, test_qs, template=tmpl, batch_size=ctx.batch_size, prefix=prefix,
                           progress=ctx.progress)
        tr_plain = score_loglik(model, tok, train_qs, template=ctx.template, batch_size=ctx.batch_size)
        tr_att = score_loglik(model, tok, train_qs, template=tmpl, batch_size=ctx.batch_size, prefix=prefix)
    return AttackResult(
        name="gcg", accuracy=att.acc, per_variant={"gcg": att.acc}, rows=item_rows("gcg", test_qs, att.items),
        n=len(test_qs), seconds=t.seconds,
        extra={**opt, "plain_accuracy": plain.acc, "p_correct": att.p_correct, "plain_p_correct": plain.p_correct,
               "train_accuracy": tr_att.acc, "train_plain_accuracy": tr_plain.acc,
               "train_qids": [q.qid for q in train_qs], "settings": s},
    )


__all__ = ["GCG_DEFAULTS", "optimise_suffix", "run_gcg", "suffix_gradient", "candidate_losses", "gcg_template"]
