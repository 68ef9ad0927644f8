"""Shared helpers for the training-based methods (GA, GradDiff, NPO, RMU) and the SNMF edit.

- parameter checks that raise ``ConfigError`` naming ``method.params.<key>``;
- layer specs relative to depth: an ``int`` is an absolute layer index, a ``float`` in [0, 1] is a
  fraction of depth mapped onto ``round_half_up(f * (n_layers - 1))`` (0.0 = first layer,
  1.0 = last), so one config works on 18-, 26-, 30- and 32-layer models;
- parameter selection by name (a regex over ``named_parameters()``, optionally with a ``{layers}``
  placeholder for a layer range), never by position;
- tokenised, fixed batches built once from a seeded shuffle (so per-batch quantities such as NPO's
  reference log-probabilities stay aligned), visited in a seeded order per epoch;
- token NLL / sequence log-probabilities with padding masked;
- one optimisation loop with the loss guard, tqdm progress and a diverged report instead of a raise.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ember.errors import ConfigError
from ember.master_weights import MasterWeights
from ember.methods.base import MethodReport, loss_guard

# --------------------------------------------------------------------------------------------------
# parameter checks


def plain_params(params: dict[str, Any]) -> dict[str, Any]:
    """Hydra hands ``ListConfig``/``DictConfig`` values; checks and code want plain lists and dicts."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
            for k, v in params.items()}


def bad_param(key: str, value: Any, fix: str) -> ConfigError:
    return ConfigError(f"method.params.{key}={value!r}: {fix}")


def require(cond: bool, key: str, value: Any, fix: str) -> None:
    if not cond:
        raise bad_param(key, value, fix)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_positive_int(params: dict[str, Any], key: str, allow_none: bool = False) -> None:
    v = params[key]
    if v is None and allow_none:
        return
    require(_is_int(v) and v >= 1, key, v, "use a positive integer" + (" (or null)" if allow_none else ""))


def check_positive(params: dict[str, Any], key: str, allow_none: bool = False) -> None:
    v = params[key]
    if v is None and allow_none:
        return
    require(_is_num(v) and math.isfinite(v) and v > 0, key, v, "use a positive number")


def check_non_negative(params: dict[str, Any], key: str) -> None:
    v = params[key]
    require(_is_num(v) and math.isfinite(v) and v >= 0, key, v, "use a non-negative number")


def check_layer_spec(key: str, v: Any) -> None:
    """A layer is an int (absolute index, >= 0) or a float fraction of depth in [0, 1]."""
    if _is_int(v):
        require(v >= 0, key, v, "an absolute layer index must be >= 0")
    elif isinstance(v, float):
        require(0.0 <= v <= 1.0, key, v, "a float is a fraction of depth and must lie in [0, 1]; "
                "write an integer (e.g. 7) for an absolute layer")
    else:
        raise bad_param(key, v, "use an integer layer index or a float fraction of depth in [0, 1]")


def check_layer_range(key: str, v: Any) -> None:
    """An inclusive range ``[lo, hi]`` of layer specs."""
    if not isinstance(v, Sequence) or isinstance(v, str) or len(v) != 2:
        raise bad_param(key, v, "use an inclusive range [first, last] of layers (ints or fractions of depth)")
    check_layer_spec(key, v[0])
    check_layer_spec(key, v[1])


# --------------------------------------------------------------------------------------------------
# layers relative to depth


def resolve_layer(spec: Any, n_layers: int, key: str) -> int:
    """Map a layer spec onto an index for a model with ``n_layers`` blocks (see the module docstring)."""
    check_layer_spec(key, spec)
    if _is_int(spec):
        idx = int(spec)
    else:
        idx = int(math.floor(float(spec) * (n_layers - 1) + 0.5))
    if not 0 <= idx < n_layers:
        raise bad_param(key, spec, f"layer {idx} does not exist: the model has {n_layers} layers (0..{n_layers - 1})")
    return idx


def resolve_layer_range(spec: Sequence[Any], n_layers: int, key: str) -> list[int]:
    check_layer_range(key, spec)
    lo, hi = resolve_layer(spec[0], n_layers, key), resolve_layer(spec[1], n_layers, key)
    if lo > hi:
        raise bad_param(key, list(spec), f"the range resolves to layers {lo}..{hi} (first > last)")
    return list(range(lo, hi + 1))


# --------------------------------------------------------------------------------------------------
# parameters selected by name


def layer_alternation(layers: Sequence[int]) -> str:
    return "(?:" + "|".join(str(i) for i in sorted(set(layers))) + ")"


def select_by_regex(model: nn.Module, pattern: str, key: str = "trainable") -> list[tuple[str, nn.Parameter]]:
    """Parameters whose full name matches ``pattern`` (``re.fullmatch``), in model order."""
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise bad_param(key, pattern, f"not a valid regular expression ({exc})") from exc
    chosen = [(n, p) for n, p in model.named_parameters() if rx.fullmatch(n)]
    if not chosen:
        example = [n for n, _ in model.named_parameters()][:6]
        raise bad_param(key, pattern, f"matches no parameter name (full match); names look like {example}")
    return chosen


def named_in_layers(model: nn.Module, layers: Sequence[int], local_names: Sequence[str], key: str) -> list[tuple[str, nn.Parameter]]:
    """Parameters called ``local_names`` (e.g. ``mlp.down_proj.weight``) inside the given decoder layers."""
    from ember.models import decoder_layers

    blocks = decoder_layers(model)
    full = {id(p): n for n, p in model.named_parameters()}
    out = []
    for i in sorted(set(layers)):
        local = dict(blocks[i].named_parameters())
        for ln in local_names:
            if ln not in local:
                raise bad_param(key, list(local_names), f"layer {i} has no parameter '{ln}'; it has {sorted(local)}")
            out.append((full[id(local[ln])], local[ln]))
    return out


@contextmanager
def trainable(params: Sequence[tuple[str, nn.Parameter]]) -> Iterator[None]:
    """Enable gradients for exactly these parameters; restore every flag afterwards."""
    params = list(params)
    saved = [(p, p.requires_grad) for _, p in params]
    for _, p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None


# --------------------------------------------------------------------------------------------------
# data


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def seeded_shuffle(items: Sequence[Any], seed: int) -> list[Any]:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


@dataclass
class TokenBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # input_ids with padding set to -100

    @property
    def n_seqs(self) -> int:
        return int(self.input_ids.shape[0])


def make_batches(tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int,
                 device: torch.device | str = "cpu", padding_side: str = "right") -> list[TokenBatch]:
    """Fixed batches of ``batch_size`` texts, padded on ``padding_side`` and right truncated to
    ``max_length`` tokens."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length, padding_side=padding_side)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        out.append(TokenBatch(ids, mask, ids.masked_fill(mask == 0, -100)))
    return out


class BatchCycler:
    """Visits fixed batches in a seeded order, reshuffling the order at every pass.

    The order of pass ``e`` is a pure function of ``(seed, e)``, so :meth:`schedule` can tell in
    advance which batches a run of ``steps`` steps will visit (NPO uses it to compute reference
    log-probabilities for exactly those batches before the first update). ``in_order=True`` makes
    the first pass visit the batches in the order given (the reference RMU's single pass)."""

    def __init__(self, batches: Sequence[TokenBatch], seed: int, in_order: bool = False):
        if not batches:
            raise ValueError("no batches to cycle over (empty text list)")
        self.batches, self.seed, self.in_order = list(batches), seed, in_order
        self.position = 0

    def _pass_order(self, epoch: int) -> list[int]:
        if epoch == 0 and self.in_order:
            return list(range(len(self.batches)))
        return seeded_shuffle(range(len(self.batches)), self.seed + 1000 * epoch)

    def schedule(self, steps: int, start: int = 0) -> list[int]:
        n = len(self.batches)
        out: list[int] = []
        for pos in range(start, start + steps):
            epoch, k = divmod(pos, n)
            if k == 0 or not out:
                order = self._pass_order(epoch)
            out.append(order[k])
        return out

    def next(self) -> tuple[int, TokenBatch]:
        i = self.schedule(1, self.position)[0]
        self.position += 1
        return i, self.batches[i]


# --------------------------------------------------------------------------------------------------
# losses


def token_logprobs(model: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token (B x T-1) and the mask of positions that count."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logits = logits[:, :-1]
    target = batch.labels[:, 1:]
    mask = target != -100
    flat = logits.reshape(-1, logits.shape[-1]).float()  # (B*T, V): far faster than the (B, V, T) layout
    lp = -F.cross_entropy(flat, target.reshape(-1).clamp_min(0), reduction="none").view_as(target)
    return lp * mask, mask


def mean_nll(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Mean next-token NLL over the batch's non-padding tokens (the usual LM loss)."""
    lp, mask = token_logprobs(model, batch)
    return -lp.sum() / mask.sum().clamp_min(1)


def sequence_logprob(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Summed log-probability of each sequence (B,), padding excluded."""
    lp, _ = token_logprobs(model, batch)
    return lp.sum(1)


# --------------------------------------------------------------------------------------------------
# the loop


@dataclass
class StepOutput:
    loss: torch.Tensor
    parts: dict[str, float]


def train_loop(
    name: str,
    params: dict[str, Any],
    trainable_params: Sequence[tuple[str, nn.Parameter]],
    steps: int,
    step_fn: Callable[[int], StepOutput],
    lr: float,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    max_grad_norm: float | None = None,
    progress: bool = False,
    guard_factor: float = 50.0,
    extra: dict[str, Any] | None = None,
    master_weights: bool = False,
) -> MethodReport:
    """AdamW on ``trainable_params`` for ``steps`` steps of ``step_fn``; stops on a NaN/exploding loss.

    ``master_weights``: step float32 copies of bf16/fp16 parameters (ember/master_weights.py).
    A diverged run returns ``status="diverged"`` with the reason (the caller discards the model)."""
    start = time.perf_counter()
    names = [n for n, _ in trainable_params]
    report = MethodReport(name=name, params=dict(params), changed_parameters=names, extra=dict(extra or {}))
    plist = [p for _, p in trainable_params]
    guard = loss_guard(guard_factor)
    first: float | None = None
    parts_log: list[dict[str, float]] = []
    with trainable(trainable_params):
        mw = MasterWeights(plist, master_weights)
        opt = torch.optim.AdamW(mw.tensors, lr=lr, weight_decay=weight_decay, eps=eps)
        bar = tqdm(range(steps), desc=name, disable=not progress, leave=False)
        step_seconds: list[float] = []
        for step in bar:
            t_step = time.perf_counter()
            out = step_fn(step)
            value = float(out.loss.detach())
            reason = guard(value, first)
            if reason is None:
                bad = [k for k, v in out.parts.items() if not math.isfinite(v)]
                reason = f"loss part {bad[0]} became {out.parts[bad[0]]}" if bad else None
            if reason is not None:
                report.status, report.reason = "diverged", f"step {step}: {reason}"
                report.losses.append(value)
                break
            if first is None:
                first = value
            mw.zero_grad()
            out.loss.backward()
            mw.before_step()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(mw.tensors, max_grad_norm)
            opt.step()
            mw.after_step()
            report.losses.append(value)
            parts_log.append(out.parts)
            report.steps = step + 1
            step_seconds.append(time.perf_counter() - t_step)
            bar.set_postfix(loss=f"{value:.4g}")
        bar.close()
        mw.zero_grad()
    if report.status == "ok":
        bad_params = [n for n, p in trainable_params if not torch.isfinite(p).all()]
        if bad_params:
            report.status, report.reason = "diverged", f"parameters became non-finite: {bad_params[:3]}"
    report.extra["loss_parts"] = parts_log
    report.extra["step_seconds"] = step_seconds
    report.seconds = time.perf_counter() - start
    return report


def diverged(name: str, params: dict[str, Any], reason: str, start: float, **extra: Any) -> MethodReport:
    return MethodReport(name=name, params=dict(params), status="diverged", reason=reason,
                        seconds=time.perf_counter() - start, extra=dict(extra))


# --------------------------------------------------------------------------------------------------
# hooks


class StopForward(Exception):
    """Raised from a hook once the activation a method needs has been captured (skips later layers)."""


def block_output(out: Any) -> torch.Tensor:
    """A decoder block's residual-stream output (transformers 5 returns a tensor; older, a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def layer_output(model: nn.Module, layer: int, batch: TokenBatch, stop: bool = True,
                 forward: Callable[..., Any] | None = None) -> torch.Tensor:
    """The residual stream after decoder layer ``layer`` (B x T x d), stopping the forward there.

    ``forward`` replaces ``model(**inputs)`` (e.g. a ``functional_call`` with swapped tensors)."""
    from ember.models import decoder_layers

    box: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        box["h"] = block_output(out)
        if stop:
            raise StopForward

    h = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        (forward or model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except StopForward:
        pass
    finally:
        h.remove()
    return box["h"]


# --------------------------------------------------------------------------------------------------
# the shared shape of the language-model-loss methods (GA, GradDiff, NPO)

LM_DEFAULTS: dict[str, Any] = {
    "steps": 20,  # optimizer steps; batches cycle (reshuffled order each pass) when steps > #batches
    "lr": 3e-5,
    "batch_size": 8,
    "max_length": 128,  # tokens, right truncation
    "layers": [0.0, 1.0],  # inclusive range substituted for {layers} in `trainable`
    "trainable": r".*layers\.{layers}\.mlp\.(gate|up|down)_proj\.weight",
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,  # null = no clipping
}


class LMUnlearningMethod:
    """Mixin for GA/GradDiff/NPO: parameter checks, trainable-parameter selection, forget batches."""

    params: dict[str, Any]

    def check_lm_params(self) -> None:
        self.params = p = plain_params(self.params)
        for k in ("steps", "batch_size", "max_length"):
            check_positive_int(p, k)
        check_positive(p, "lr")
        check_non_negative(p, "weight_decay")
        check_positive(p, "max_grad_norm", allow_none=True)
        check_layer_range("layers", p["layers"])
        require(isinstance(p["trainable"], str) and p["trainable"] != "", "trainable", p["trainable"],
                "use a regular expression over parameter names (full match), optionally with {layers}")
        try:
            re.compile(p["trainable"].replace("{layers}", "(?:0)"))
        except re.error as exc:
            raise bad_param("trainable", p["trainable"], f"not a valid regular expression ({exc})") from exc

    def check_against_model(self, n_layers: int, d_mlp: int | None = None) -> None:
        resolve_layer_range(self.params["layers"], n_layers, "layers")

    def trainable_params(self, model: nn.Module, n_layers: int) -> list[tuple[str, nn.Parameter]]:
        layers = resolve_layer_range(self.params["layers"], n_layers, "layers")
        pattern = self.params["trainable"].replace("{layers}", layer_alternation(layers))
        return select_by_regex(model, pattern, "trainable")

    def batches(self, ctx: Any, texts: Sequence[str], seed: int, what: str) -> list[TokenBatch]:
        if not texts:
            raise ConfigError(f"method '{getattr(self, 'name', '?')}' needs {what} texts, and none were given")
        return make_batches(ctx.tokenizer, seeded_shuffle(texts, seed), self.params["batch_size"],
                            self.params["max_length"], model_device(ctx.model))

    def run(self, ctx: Any, trainable_params: Sequence[tuple[str, nn.Parameter]], step_fn: Callable[[int], StepOutput],
            extra: dict[str, Any] | None = None) -> MethodReport:
        p = self.params
        return train_loop(getattr(self, "name", "?"), p, trainable_params, p["steps"], step_fn, p["lr"],
                          weight_decay=p["weight_decay"], max_grad_norm=p["max_grad_norm"],
                          progress=ctx.progress, extra=extra, master_weights=getattr(ctx, "master_weights", False))
