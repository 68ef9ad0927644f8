"""The attack protocol: what an attack receives, what it returns, and how results are scored.

An attack is a function ``run(model, tok, concept, cfg, ctx) -> AttackResult``:

- ``model``/``tok``: the model under attack (the job's erased model, or the unedited model as a
  control). Attacks never modify it, except relearning when explicitly asked (``in_place``).
- ``concept``: :class:`ember.data.ConceptData` (questions, relearning paragraphs, key terms).
- ``cfg``: the attack's own settings (a dict or DictConfig); :func:`merge_settings` merges them onto
  the attack's defaults and rejects unknown keys, naming ``attacks.<name>.<key>``.
- ``ctx``: :class:`AttackContext`, what the job knows (the edited token ids, seed, template...).

Scoring is the common frame of unlearning robustness papers (ecosystem-notes 6): accuracy under
attack on the erased model, the same attack on the unedited model (a control for information the
attack brings in itself), and the recovered fraction of the base-to-erased gap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from ember.errors import ConfigError
from ember.evals.metrics import recovered_fraction  # noqa: F401  (re-exported: part of the attack protocol)


@dataclass
class AttackContext:
    """What a job passes to every attack."""

    edited_token_ids: list[int] = field(default_factory=list)  # tokens EMBER edited (may be empty)
    seed: int = 42
    progress: bool = False
    template: str = "Question: {q}\nAnswer:"  # the evaluation's prompt template
    batch_size: int = 16
    max_questions: int | None = None  # per split; None = all (CPU-sized runs may cap it)
    train_split: str = "QA_train"  # questions an attack may learn from (GCG, probes, in-context demos)
    eval_split: str = "QA_test"  # questions an attack is scored on
    retain_split: str = "SimdomQA_test"  # similar-domain questions (retention after relearning)
    extra: dict[str, Any] = field(default_factory=dict)
    master_weights: bool = False  # relearning: train bf16/fp16 weights through fp32 copies (model.master_weights)
    #: plain multiple choice as the job evaluates it (``eval.mc_mode``); None = log-likelihood with ``template``
    mc_scorer: Callable[[nn.Module, Any, list[Any]], Any] | None = None

    def score_plain(self, model: nn.Module, tok: Any, qs: list[Any]) -> Any:
        """Unattacked accuracy of ``model`` on ``qs`` with the job's scorer (relearning's curve uses it)."""
        if self.mc_scorer is not None:
            return self.mc_scorer(model, tok, qs)
        from ember.evals.mc import score_loglik

        return score_loglik(model, tok, qs, template=self.template, batch_size=self.batch_size)


@dataclass
class AttackResult:
    """One attack's outcome on one model and concept.

    ``accuracy`` is the attack's headline number (the max over its variants where it has several,
    e.g. jailbreak templates); ``per_variant`` holds every variant's accuracy; ``rows`` are
    per-question (or per-layer, per-epoch) dicts for a CSV; ``extra`` anything else (JSON-able).
    """

    name: str
    accuracy: float
    per_variant: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    n: int = 0
    seconds: float = 0.0
    status: str = "ok"  # ok | diverged | skipped
    reason: str = ""
    # False when ``accuracy`` is not read the way the plain accuracy is (a probe's readout of hidden
    # states, not the model's option log-likelihoods): no recovered fraction, which would mix scales
    comparable_to_plain: bool = True

    def summary(self) -> dict[str, Any]:
        """The scalar part (no rows), for logs and result tables."""
        return {"name": self.name, "accuracy": self.accuracy, "n": self.n, "seconds": round(self.seconds, 2),
                "status": self.status, "reason": self.reason, "per_variant": dict(self.per_variant)}

    def to_dict(self) -> dict[str, Any]:
        out = self.summary()
        out["extra"] = self.extra
        out["rows"] = self.rows
        return out


class AttackFn(Protocol):
    def __call__(self, model: nn.Module, tok: Any, concept: Any, cfg: Mapping[str, Any] | None,
                 ctx: AttackContext) -> AttackResult: ...


def attack_recovered(attacked: AttackResult, erased_acc: float | None, base_acc: float | None) -> float:
    """The attack's recovered fraction of the base-to-erased gap; NaN without reference accuracies or
    when the attack reads its accuracy another way than the plain accuracy (``comparable_to_plain``)."""
    if erased_acc is None or base_acc is None or not attacked.comparable_to_plain:
        return float("nan")
    return recovered_fraction(attacked.accuracy, erased_acc, base_acc)


def summary_row(attacked: AttackResult, control: AttackResult | None, erased_acc: float, base_acc: float,
                concept: str = "") -> dict[str, Any]:
    """One row of the attack table: accuracy under attack, control, and the recovered fraction.

    ``erased_acc``/``base_acc`` are the plain (unattacked) accuracies of the erased and the unedited
    model on the same split. ``control_gain`` is what the attack adds to the unedited model: a large
    gain there means the attack brings information in rather than recovering it.
    """
    ctrl = control.accuracy if control is not None else float("nan")
    return {
        "concept": concept,
        "attack": attacked.name,
        "status": attacked.status,
        "base_acc": base_acc,
        "erased_acc": erased_acc,
        "attacked_acc": attacked.accuracy,
        "control_acc": ctrl,
        "control_gain": ctrl - base_acc if math.isfinite(ctrl) else float("nan"),
        "recovered_fraction": attack_recovered(attacked, erased_acc, base_acc),
        "seconds": round(attacked.seconds, 2),
    }


def require_int(attack: str, key: str, value: Any, minimum: int = 1) -> None:
    """``attacks.<attack>.<key>`` is an integer >= ``minimum`` (a bool is no integer here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"attacks.{attack}.{key}={value!r}: use an integer >= {minimum}")


def merge_settings(name: str, defaults: Mapping[str, Any], cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The attack's defaults overridden by ``cfg``; an unknown key raises ConfigError naming it."""
    given: dict[str, Any] = {}
    if cfg is not None:
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                given = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
            else:
                given = dict(cfg)
        except ImportError:  # pragma: no cover
            given = dict(cfg)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"attacks.{name}: unknown key(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


def questions(concept: Any, split: str, limit: int | None) -> list[Any]:
    """A split's questions, capped at ``limit`` (in file order) when given."""
    if split not in concept.mc:
        raise ConfigError(f"split {split!r} not in concept {concept.name!r}; known: {sorted(concept.mc)}")
    qs = list(concept.mc[split])
    return qs[:limit] if limit else qs


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0


def item_rows(variant: str, qs: list[Any], items: list[Any], **extra: Any) -> list[dict[str, Any]]:
    """Per-question CSV rows from an :class:`ember.evals.mc.MCResult`'s items."""
    return [
        {"variant": variant, "qid": q.qid, "correct": bool(it.correct), "p_correct": float(it.p_correct),
         "pred": int(it.pred), "answer": int(it.answer), **extra}
        for q, it in zip(qs, items, strict=True)
    ]


AttackCallable = Callable[..., AttackResult]
