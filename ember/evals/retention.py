"""Retention (specificity): similar-domain QA, control facts, perplexity on held-out text, lm-eval tasks.

- Similar-domain QA (``SimdomQA_*``) and the control facts are multiple choice, scored with the
  configured mode (:func:`score_mc`: ``loglik`` or the paper's ``letter``).
- Perplexity is token-weighted over texts the factorization did not see; only real (non-pad)
  positions are projected to the vocabulary, in chunks (:func:`ember.evals.mc.token_logprobs`).
  Its kept fraction is ``min(1, base_ppl / ppl)``.
- Any lm-eval task names from the config (e.g. ``mmlu`` where the dataset is available) run on the
  in-memory model (:func:`run_lm_eval_tasks`); each is normalised against the base model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ember.data import MCQuestion
from ember.evals.lm_eval_tasks import run_lm_eval_tasks
from ember.evals.loglik import _base_model, right_pad, wants_bos
from ember.evals.mc import MCResult, score_letter, score_loglik, token_logprobs

__all__ = ["PerplexityResult", "perplexity", "run_lm_eval_tasks", "score_mc", "lm_eval_chance"]


def score_mc(
    model: nn.Module, tokenizer: Any, questions: Sequence[MCQuestion], cfg: Any, template: str | None = None,
    use_chat: bool = True, progress: bool = False,
) -> MCResult:
    """Multiple choice in the configured mode (``cfg.mc_mode``: loglik | letter)."""
    if cfg.mc_mode == "loglik":
        return score_loglik(model, tokenizer, questions, template or cfg.prompt_template, cfg.batch_size, progress,
                            share_prefix=bool(getattr(cfg, "share_prefix", True)))
    if cfg.mc_mode == "letter":
        return score_letter(model, tokenizer, questions, use_chat=use_chat,
                            batch_size=int(getattr(cfg, "letter_batch_size", 1)), progress=progress)
    raise ValueError(f"eval.mc_mode={cfg.mc_mode!r}: use 'loglik' or 'letter'")


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token
    n_tokens: int
    per_text_nll: list[float] = field(default_factory=list)


def _encode_texts(tokenizer: Any, texts: Sequence[str], bos: bool, max_length: int) -> list[list[int]]:
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if bos:
            ids = [tokenizer.bos_token_id] + ids
        out.append(ids[:max_length])
    return out


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 16, max_length: int = 256,
) -> PerplexityResult:
    """Token-weighted perplexity of ``texts``; with a BOS (Gemma) every text token is scored, else from the 2nd."""
    enc = _encode_texts(tokenizer, texts, wants_bos(model, tokenizer), max_length)
    keep = [i for i, e in enumerate(enc) if len(e) >= 2]
    order = sorted(keep, key=lambda i: -len(enc[i]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    base = _base_model(model)
    sums = [0.0] * len(enc)
    counts = [0] * len(enc)
    for s in range(0, len(order), batch_size):
        batch = order[s : s + batch_size]
        ids, mask = right_pad([enc[i] for i in batch], pad)
        hidden = base(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        pred_mask = mask[:, 1:].bool().to(device)  # position p predicts token p + 1
        h = hidden[:, :-1][pred_mask]
        tgt = ids[:, 1:].to(device)[pred_mask]
        lp, _ = token_logprobs(model, h, tgt)
        owner = torch.arange(len(batch), device=device)[:, None].expand(-1, ids.shape[1] - 1)[pred_mask]
        per = torch.zeros(len(batch), device=device).index_add_(0, owner, lp)
        for i, per_i in zip(batch, per.tolist(), strict=True):  # one device transfer per batch
            sums[i] = -per_i
            counts[i] = len(enc[i]) - 1
    n = sum(counts)
    nll = sum(sums) / n if n else float("nan")
    return PerplexityResult(
        ppl=math.exp(nll) if n else float("nan"), nll=nll, n_tokens=n,
        per_text_nll=[sums[i] / counts[i] if counts[i] else float("nan") for i in range(len(enc))],
    )


def lm_eval_chance(task: str) -> float | None:
    """Chance accuracy used to normalise an lm-eval task (MMLU-style 4-way tasks: 0.25), else None (ratio)."""
    return 0.25 if task.lower().startswith("mmlu") else None

