"""Batched log-likelihood of continuations given contexts, computed only where it is needed.

The vocabulary projection is applied only at continuation positions: Gemma-3's 262,144-token
vocabulary makes full-sequence logits about 1 GB per batch, while the positions that matter are a
handful per question. Tokenisation follows lm-eval's convention (encode context+continuation
whole, the continuation is what follows the encoded context; a BOS token is prepended for Gemma
families and where the tokenizer adds one by default, as Llama-3's), so the scores agree with
lm-eval's multiple_choice on the same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class Scored:
    loglik: float  # summed log-probability of the continuation
    n_tokens: int
    n_chars: int
    greedy: bool  # every continuation token is the argmax


def wants_bos(model: nn.Module, tokenizer: Any) -> bool:
    """Whether a scored sequence starts with the BOS id, by lm-eval's rule: always for Gemma families,
    otherwise when the tokenizer adds BOS by default (Llama-3's ``<|begin_of_text|>``; SmolLM2 adds none)."""
    if tokenizer.bos_token_id is None:
        return False
    family = str(getattr(getattr(model, "config", None), "model_type", ""))
    if family.startswith("gemma"):
        return True
    ids = tokenizer("x")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def encode_pair(tokenizer: Any, context: str, continuation: str, bos: bool,
                as_generated: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation). lm-eval's convention by default: the context's trailing
    whitespace moves to the continuation and the pair is encoded whole. ``as_generated``: the context
    exactly as a model was prompted with it and the continuation it generated, encoded apart."""
    if as_generated:
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return ([tokenizer.bos_token_id] + ctx if bos else ctx), cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    if not cont:  # tokenizer merged the boundary: fall back to separate encodings
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        ctx = whole[: len(whole) - len(cont)] if len(whole) > len(cont) else ctx
    if bos:
        ctx = [tokenizer.bos_token_id] + ctx
    return ctx, cont


def right_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as a right-padded ``(input_ids, attention_mask)`` pair of long tensors."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        attn[r, : len(seq)] = 1
    return ids, attn


def _final_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", None)
    if base is None:
        raise RuntimeError(f"{type(model).__name__} has no .model backbone")
    return base


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "loglik",
    as_generated: bool = False,
) -> list[Scored]:
    """Score each (context, continuation) pair (``as_generated``: see :func:`encode_pair`); batches are
    sorted by length for little padding."""
    bos = wants_bos(model, tokenizer)
    encoded = [encode_pair(tokenizer, c, x, bos, as_generated) for c, x in pairs]
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    results: list[Scored | None] = [None] * len(encoded)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    base = _base_model(model)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        ids, attn = right_pad([encoded[i][0] + encoded[i][1] for i in batch], pad)
        hidden = base(input_ids=ids.to(device), attention_mask=attn.to(device)).last_hidden_state
        # gather the hidden states that predict each continuation token
        rows, cols, targets, owners = [], [], [], []
        for r, i in enumerate(batch):
            ctx, cont = encoded[i]
            for j, tok in enumerate(cont):
                rows.append(r)
                cols.append(len(ctx) + j - 1)
                targets.append(tok)
                owners.append(r)
        h = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        logp = torch.log_softmax(_final_logits(model, h).float(), dim=-1)
        tgt = torch.tensor(targets, device=device)
        tok_lp = logp.gather(1, tgt[:, None]).squeeze(1)
        is_greedy = logp.argmax(-1) == tgt
        owner_t = torch.tensor(owners, device=device)
        sums = torch.zeros(len(batch), device=device).index_add_(0, owner_t, tok_lp)
        greedy_counts = torch.zeros(len(batch), device=device).index_add_(0, owner_t, is_greedy.float())
        sums_l, greedy_l = sums.tolist(), greedy_counts.tolist()  # one device transfer per batch, not per item
        for r, i in enumerate(batch):
            n_tok = len(encoded[i][1])
            results[i] = Scored(
                loglik=sums_l[r],
                n_tokens=n_tok,
                n_chars=len(pairs[i][1]),
                greedy=greedy_l[r] == n_tok,
            )
    return [r for r in results if r is not None]
