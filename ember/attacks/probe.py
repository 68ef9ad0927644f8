"""White-box reads of residual knowledge: a logit lens and linear probes, per layer.

- **Logit lens** (Łucki et al.): the question prompt's last-position residual state after block ``l``
  is decoded through the final norm and the unembedding; the question counts as right when the
  correct option's first token has the highest logit among the four options' first tokens
  (options sharing a first token split the credit, so chance stays 1/4). The last layer reproduces
  the model's own first-token preference.
- **Linear probe** (ELM, Lynch et al.): for every (question, option), the residual state at the last
  token of ``prompt + " " + option``; a linear scorer ``w . h`` with a softmax over the four options
  (a conditional logistic regression, torch LBFGS, L2 penalty) is trained on the train questions
  and tested on the test questions. States are centred per question (the softmax ignores what the
  options share) and standardised with train statistics.

Layer 0 is the embedding output, layer ``l`` the output of block ``l``. The headline numbers use a
layer chosen on the train split only (lens: best train accuracy; probe: best k-fold
cross-validated train accuracy), so they are not inflated by picking the best of many layers on
the test questions; the max over layers is reported too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ember.attacks import register_attack
from ember.attacks._lm import device_of, final_norm, lm_logits
from ember.attacks.base import AttackContext, AttackResult, Timer, merge_settings, questions, require_int
from ember.errors import ConfigError
from ember.evals.loglik import encode_pair, wants_bos
from ember.models import decoder_layers

PROBE_DEFAULTS: dict[str, Any] = {
    "l2": 0.1,  # L2 penalty on the probe weights (features are standardised)
    "folds": 5,  # k-fold cross-validation on the train split to choose the probe's layer
    "max_iter": 100,  # LBFGS iterations per fit
    "batch_size": 16,  # sequences per forward pass
    "layers": None,  # None = every layer (0 = embeddings .. n_layers); or a list of layer indices
}


@torch.no_grad()
def layer_states(model: nn.Module, seqs: Sequence[list[int]], batch_size: int = 16) -> torch.Tensor:
    """Last-position residual states, (n_layers + 1, n_seqs, d): embeddings, then every block output."""
    dev = device_of(model)
    captured: list[torch.Tensor] = []

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
        captured.append(out[0] if isinstance(out, tuple) else out)

    handles = [model.get_input_embeddings().register_forward_hook(hook)]
    handles += [layer.register_forward_hook(hook) for layer in decoder_layers(model)]
    out: list[torch.Tensor] = []
    try:
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i : i + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, s in enumerate(chunk):
                ids[r, : len(s)] = torch.tensor(s)
                attn[r, : len(s)] = 1
            captured.clear()
            model(input_ids=ids.to(dev), attention_mask=attn.to(dev), use_cache=False, logits_to_keep=1)
            last = torch.tensor([len(s) - 1 for s in chunk], device=dev)
            rows = torch.arange(len(chunk), device=dev)
            out.append(torch.stack([h[rows, last].float() for h in captured]).cpu())
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out, dim=1)


def _prompt_ids(model: nn.Module, tok: Any, qs: Sequence[Any], template: str) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Per question: the prompt ids, and per option the continuation ids (as the loglik scorer)."""
    bos = wants_bos(model, tok)
    prompts, conts = [], []
    for q in qs:
        ctx = template.format(q=q.q)
        pairs = [encode_pair(tok, ctx, " " + o, bos) for o in q.options]
        prompts.append(pairs[0][0])
        conts.append([c for _, c in pairs])
    return prompts, conts


@torch.no_grad()
def logit_lens_correct(model: nn.Module, states: torch.Tensor, first_ids: list[list[int]],
                       answers: list[int]) -> torch.Tensor:
    """(n_layers + 1, n_questions) credit in [0, 1]: does the right first token win at each layer?"""
    dev = device_of(model)
    norm = final_norm(model)
    out = torch.zeros(states.shape[0], states.shape[1])
    idx = torch.tensor(first_ids, device=dev)  # (n, 4)
    for layer in range(states.shape[0]):
        h = states[layer].to(dev, dtype=next(model.parameters()).dtype)
        logits = lm_logits(model, norm(h)).float()  # (n, vocab)
        opt = logits.gather(1, idx)  # (n, 4)
        out[layer] = first_token_credit(opt, answers)
    return out


def first_token_credit(option_logits: torch.Tensor, answers: list[int]) -> torch.Tensor:
    """(n,) credit per question from its options' first-token logits (n, n_options): 1/k when the correct
    option is among the k options with the highest logit, else 0. Options that share a first token share
    its logit, so they tie: four options all starting with " The" earn 1/4 (chance), not full credit."""
    best = option_logits.max(dim=1, keepdim=True).values
    tied = option_logits == best  # (n, n_options)
    right = tied[torch.arange(len(answers)), torch.tensor(answers)]
    return right.float() / tied.sum(dim=1).float()


def _prep(x_train: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre every question's option states, standardise with train statistics."""
    x_train = x_train - x_train.mean(dim=1, keepdim=True)
    x_test = x_test - x_test.mean(dim=1, keepdim=True)
    flat = x_train.reshape(-1, x_train.shape[-1])
    mu, sd = flat.mean(0), flat.std(0).clamp_min(1e-6)
    return (x_train - mu) / sd, (x_test - mu) / sd


def fit_option_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                     l2: float = 0.1, max_iter: int = 100) -> tuple[float, float, torch.Tensor]:
    """Conditional logistic regression over options: x is (n, n_options, d), y the right option.

    Returns (train accuracy, test accuracy, weights). Deterministic (zero init, full-batch LBFGS).
    """
    xtr, xte = _prep(x_train.double(), x_test.double())
    w = torch.zeros(xtr.shape[-1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(xtr @ w, y_train) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w = w.detach()
    acc = lambda x, y: float(((x @ w).argmax(-1) == y).double().mean()) if len(y) else float("nan")  # noqa: E731
    return acc(xtr, y_train), acc(xte, y_test), w


def cv_accuracy(x: torch.Tensor, y: torch.Tensor, folds: int, l2: float, max_iter: int) -> float:
    """k-fold cross-validated accuracy (contiguous folds, deterministic)."""
    n = len(y)
    folds = max(2, min(folds, n))
    bounds = [round(i * n / folds) for i in range(folds + 1)]
    correct = 0.0
    for f in range(folds):
        lo, hi = bounds[f], bounds[f + 1]
        mask = torch.ones(n, dtype=torch.bool)
        mask[lo:hi] = False
        _, te, _ = fit_option_probe(x[mask], y[mask], x[~mask], y[~mask], l2, max_iter)
        correct += te * (hi - lo)
    return correct / n


def option_states(model: nn.Module, tok: Any, qs: Sequence[Any], template: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Question-prompt states (L+1, n, d) and option states (L+1, n, n_options, d)."""
    prompts, conts = _prompt_ids(model, tok, qs, template)
    n_opt = len(conts[0])
    q_states = layer_states(model, prompts, batch_size)
    o_seqs = [p + c for p, cs in zip(prompts, conts, strict=True) for c in cs]
    o_states = layer_states(model, o_seqs, batch_size)
    return q_states, o_states.reshape(o_states.shape[0], len(qs), n_opt, -1)


def check_probe(cfg: Mapping[str, Any] | None, concepts: Sequence[Any] = ()) -> dict[str, Any]:
    s = merge_settings("probe", PROBE_DEFAULTS, cfg)
    for key in ("max_iter", "batch_size"):
        require_int("probe", key, s[key])
    require_int("probe", "folds", s["folds"], minimum=2)  # cross-validation needs two folds
    if not isinstance(s["l2"], (int, float)) or isinstance(s["l2"], bool) or s["l2"] < 0:
        raise ConfigError(f"attacks.probe.l2={s['l2']!r}: use a penalty >= 0")
    layers = s["layers"]
    if layers is not None:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise ConfigError(f"attacks.probe.layers={layers!r}: use null (every layer) or a list of layer indices "
                              "(0 = the embeddings, i = the output of block i), e.g. [4,8,12]")
        s["layers"] = [int(i) for i in layers]
    return s


def check_probe_layers(layers: Sequence[int] | None, n_layers: int) -> None:
    """Every probed layer exists: 0 (the embeddings) to ``n_layers`` (the last block's output)."""
    missing = [i for i in layers or () if i > n_layers]
    if missing:
        raise ConfigError(f"attacks.probe.layers: {missing} do not exist; the model has {n_layers} layers, so the "
                          f"probe reads 0..{n_layers} (0 = the embeddings, i = block i's output)")


@register_attack("probe", check=check_probe)
def run_probe(model: Any, tok: Any, concept: Any, cfg: Mapping[str, Any] | None, ctx: AttackContext) -> AttackResult:
    s = check_probe(cfg)
    train_qs = questions(concept, ctx.train_split, ctx.max_questions)
    test_qs = questions(concept, ctx.eval_split, ctx.max_questions)
    with Timer() as t:
        tr_q, tr_o = option_states(model, tok, train_qs, ctx.template, s["batch_size"])
        te_q, te_o = option_states(model, tok, test_qs, ctx.template, s["batch_size"])
        _, tr_conts = _prompt_ids(model, tok, train_qs, ctx.template)
        _, te_conts = _prompt_ids(model, tok, test_qs, ctx.template)
        y_tr = torch.tensor([q.answer for q in train_qs])
        y_te = torch.tensor([q.answer for q in test_qs])
        lens_tr = logit_lens_correct(model, tr_q, [[c[0] for c in cs] for cs in tr_conts], y_tr.tolist())
        lens_te = logit_lens_correct(model, te_q, [[c[0] for c in cs] for cs in te_conts], y_te.tolist())
        n_layers = tr_o.shape[0]
        check_probe_layers(s["layers"], n_layers - 1)
        layers = list(range(n_layers)) if s["layers"] is None else s["layers"]
        rows = []
        for layer in layers:
            cv = cv_accuracy(tr_o[layer], y_tr, s["folds"], s["l2"], s["max_iter"])
            tr_acc, te_acc, _ = fit_option_probe(tr_o[layer], y_tr, te_o[layer], y_te, s["l2"], s["max_iter"])
            rows.append({"layer": layer, "lens_train_acc": float(lens_tr[layer].mean()),
                         "lens_test_acc": float(lens_te[layer].mean()), "probe_cv_acc": cv,
                         "probe_train_acc": tr_acc, "probe_test_acc": te_acc})
    # choose layers on the train split only (ties: the later layer)
    lens_row = max(rows, key=lambda r: (r["lens_train_acc"], r["layer"]))
    probe_row = max(rows, key=lambda r: (r["probe_cv_acc"], r["layer"]))
    per = {"logit_lens": lens_row["lens_test_acc"], "linear_probe": probe_row["probe_test_acc"]}
    n_amb = sum(len(set(c[0] for c in cs)) < len(cs) for cs in te_conts)
    return AttackResult(
        name="probe", accuracy=max(per.values()), per_variant=per, rows=rows, n=len(test_qs), seconds=t.seconds,
        comparable_to_plain=False,  # a readout of hidden states: compare with the control, not the plain gap
        extra={"lens_layer": lens_row["layer"], "probe_layer": probe_row["layer"],
               "lens_max_over_layers": max(r["lens_test_acc"] for r in rows),
               "probe_max_over_layers": max(r["probe_test_acc"] for r in rows),
               "final_layer_lens": float(lens_te[-1].mean()), "n_layers": n_layers - 1,
               "test_questions_with_shared_first_tokens": n_amb, "settings": s, "chance": 0.25},
    )
