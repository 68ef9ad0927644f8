"""The evaluation suite: every raw score of one model on one concept and split, and the paper's metrics.

:func:`evaluate` runs the enabled parts and returns a flat dict of raw scores plus ``rows`` (one
dict per question / instruction, for CSVs):

================  ==========================================================  =====================
part              raw scores                                                  data
================  ==========================================================  =====================
``qa``            qa_acc, qa_acc_norm, qa_p_correct, qa_invalid, qa_n         concept ``QA_<split>``
``simdom``        simdom_* (same fields)                                      ``SimdomQA_<split>``
``control``       control_* (same fields)                                     ``control_facts.json``
``open_qa``       open_qa_acc, open_qa_f1, open_qa_n                          open ``QA_<split>``
``ppl``           ppl, ppl_nll, ppl_tokens                                    held-out text
``coherence``     relevance, fluency (+ relevance_llm, fluency_llm)           ``instructions.json``
``lm_eval``       lmeval_<task>_<metric>                                      ``eval.lm_eval_tasks``
================  ==========================================================  =====================

plus ``time_<part>_s`` and provenance keys (``judge``, ``coherence_judge``, ``fluency_judge``,
``mc_mode``, ``ppl_source``...). ``store`` supplies the concept-independent data (control facts,
instructions, text); the pipeline passes the shipped starter set.

:func:`relative` turns raw scores and the base model's raw scores into kept fractions and the
paper's metrics (:mod:`ember.evals.metrics`). Multiple-choice fractions are chance-normalised on
``eval.frac_on`` (``acc`` as the paper, or the less noisy ``p_correct``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ember.data import ConceptData, ConceptStore, MCQuestion
from ember.evals.mc import MCResult
from ember.evals.metrics import loglik_frac, mc_frac, open_frac, paper_metrics, ratio_frac
from ember.evals.retention import lm_eval_chance, perplexity, run_lm_eval_tasks, score_mc

log = logging.getLogger(__name__)

SPLITS = {"train": ("QA_train", "SimdomQA_train"), "test": ("QA_test", "SimdomQA_test")}
#: kept fractions that are coherence terms in :func:`relative`'s output (the delta choice gates on them;
#: its retention gate covers every specificity term, ember.evals.metrics.retention_terms)
COHERENCE_KEYS = ("relevance_frac", "fluency_frac")
PART_ORDER = ("qa", "simdom", "control", "open_qa", "ppl", "coherence", "lm_eval")
_WARNED: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg)


@dataclass
class EvalContext:
    model: nn.Module
    tokenizer: Any
    concept: ConceptData
    store: ConceptStore
    cfg: Any
    split: str
    judge_model: nn.Module | None = None
    progress: bool = False

    @property
    def use_chat(self) -> bool:
        return bool(getattr(self.cfg, "use_chat", True)) and bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def n(self) -> int | None:
        return self.cfg.max_questions


@dataclass
class PartOutput:
    scores: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


def _cap(xs: Sequence[Any], n: int | None) -> list[Any]:
    return list(xs[:n]) if n else list(xs)


def _digest(items: Sequence[Any]) -> str:
    return hashlib.sha256("\x1e".join(map(str, items)).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# data for the concept-independent parts (the store, else the shipped starter set)


def _starter() -> ConceptStore | None:
    from ember.paths import STARTER_DIR

    return ConceptStore(STARTER_DIR, label="the starter set") if STARTER_DIR.is_dir() else None


_FALLBACKS_SAID: set[tuple[str, str]] = set()


def _from_store_or_starter(store: ConceptStore, attr: str, filename: str) -> list[Any]:
    """``store.<attr>``, else the packaged starter set's, which is said once per (store, file)."""
    items = getattr(store, attr)
    if not items and (s := _starter()) is not None:
        items = getattr(s, attr)
        if (str(store.root), filename) not in _FALLBACKS_SAID and store.root.resolve() != s.root.resolve():
            _FALLBACKS_SAID.add((str(store.root), filename))
            log.info("%s has no %s: using the packaged starter set's (%s)", store.root, filename, s.root)
    return list(items)


def control_facts(store: ConceptStore) -> list[MCQuestion]:
    return _from_store_or_starter(store, "control_facts", "control_facts.json")


def instructions(store: ConceptStore) -> list[str]:
    return _from_store_or_starter(store, "instructions", "instructions.json")


def perplexity_texts(store: ConceptStore, cfg: Any) -> tuple[list[str], str]:
    """(texts, source) for held-out perplexity.

    ``auto`` and ``heldout`` read ``heldout_text.json`` (the store's, else the starter set's): text that
    no factorization background contains. It must be held out: an EMBER edit changes only tokens absent
    from the background, so perplexity on background text cannot move under EMBER alone. ``general``
    and ``neutral`` are kept for comparison; the factorization's background may contain both."""
    source = getattr(cfg, "perplexity_source", "auto")
    n = cfg.perplexity_n
    if source in ("auto", "heldout"):
        texts = store.heldout_text or (s.heldout_text if (s := _starter()) is not None else [])
        if texts:
            return _cap(texts, n), "heldout_text"
        if source == "heldout":
            raise ValueError("eval.perplexity_source=heldout but neither the concept store nor the starter set has "
                             "heldout_text.json; add one (a JSON list of sentences) or set eval.perplexity_source=auto")
        _warn_once("heldout", "no heldout_text.json: perplexity falls back to text the factorization's background "
                   "may include, so it barely moves under an EMBER edit")
    if source in ("auto", "general") and store.general_text:
        return _cap(store.general_text, n), "general_text"
    if source == "general":
        raise ValueError("eval.perplexity_source=general but the store has no general_text.json")
    # the tail of the seeded permutation: the factorization uses the head when it uses fewer
    return list(store.neutral[-n:] if n else store.neutral), "neutral"


# --------------------------------------------------------------------------------------------------
# parts


def _mc_part(prefix: str, split_name: str, res: MCResult, questions: Sequence[MCQuestion]) -> PartOutput:
    scores = {f"{prefix}_{k}": v for k, v in res.summary().items()}
    scores[f"{prefix}_chance"] = (sum(1 / len(q.options) for q in questions) / len(questions)) if questions else 0.25
    by_id = {q.qid: q for q in questions}
    rows = []
    for it in res.items:
        q = by_id[it.qid]
        rows.append({"set": prefix, "split": split_name, "qid": it.qid, "question": q.q, "answer": q.correct_answer,
                     "pred": q.options[it.pred] if 0 <= it.pred < len(q.options) else None,
                     "correct": it.correct, "p_correct": it.p_correct, "invalid": it.invalid,
                     "generation": it.generation})
    return PartOutput(scores, rows)


def part_qa(ctx: EvalContext) -> PartOutput:
    name = SPLITS[ctx.split][0]
    qs = _cap(ctx.concept.mc[name], ctx.n)
    return _mc_part("qa", name, score_mc(ctx.model, ctx.tokenizer, qs, ctx.cfg, use_chat=ctx.use_chat,
                                         progress=ctx.progress), qs)


def part_simdom(ctx: EvalContext) -> PartOutput:
    name = SPLITS[ctx.split][1]
    qs = _cap(ctx.concept.mc[name], ctx.n)
    return _mc_part("simdom", name, score_mc(ctx.model, ctx.tokenizer, qs, ctx.cfg, use_chat=ctx.use_chat,
                                             progress=ctx.progress), qs)


def part_control(ctx: EvalContext) -> PartOutput:
    qs = _cap(control_facts(ctx.store), ctx.n)
    if not qs:
        return PartOutput({"control_skipped": "no control facts"})
    return _mc_part("control", "control", score_mc(ctx.model, ctx.tokenizer, qs, ctx.cfg, use_chat=ctx.use_chat,
                                                   progress=ctx.progress), qs)


def part_open_qa(ctx: EvalContext) -> PartOutput:
    from ember.evals.open_qa import evaluate_open

    name = SPLITS[ctx.split][0]
    qs = _cap(ctx.concept.open.get(name, []), ctx.n)
    if not qs:
        return PartOutput({"open_qa_skipped": f"no open questions for {name}"})
    res = evaluate_open(ctx.model, ctx.tokenizer, qs, ctx.cfg, ctx.use_chat, ctx.progress)
    rows = [{"set": "open_qa", "split": name, **it.to_dict()} for it in res.items]
    return PartOutput({"open_qa_acc": res.acc, "open_qa_f1": res.mean_f1, "open_qa_n": res.n}, rows)


def part_ppl(ctx: EvalContext) -> PartOutput:
    texts, source = perplexity_texts(ctx.store, ctx.cfg)
    res = perplexity(ctx.model, ctx.tokenizer, texts, ctx.cfg.batch_size,
                     int(getattr(ctx.cfg, "perplexity_max_length", 256)))
    return PartOutput({"ppl": res.ppl, "ppl_nll": res.nll, "ppl_tokens": res.n_tokens, "ppl_source": source})


def part_coherence(ctx: EvalContext) -> PartOutput:
    from ember.evals.coherence import evaluate_coherence, split_instructions

    ins = split_instructions(instructions(ctx.store), ctx.split, ctx.cfg.coherence_n)
    if not ins:
        return PartOutput({"coherence_skipped": "no instructions"})
    if len(ins) < ctx.cfg.coherence_n:
        _warn_once(f"coherence_n_{ctx.split}", f"eval.coherence_n={ctx.cfg.coherence_n}, but the instructions file "
                   f"holds {len(ins)} for the {ctx.split} split (every other one): coherence uses those {len(ins)}")
    res = evaluate_coherence(ctx.model, ctx.tokenizer, ins, ctx.cfg, ctx.judge_model, ctx.use_chat, ctx.progress)
    scores = {**{k: v for k, v in res.summary().items() if k != "n"}, "coherence_n": res.n,
              "fluency_judge": "base model" if ctx.judge_model is not None else "self"}
    rows = [{"set": "coherence", "split": ctx.split, **it.to_dict()} for it in res.items]
    return PartOutput(scores, rows)


def part_lm_eval(ctx: EvalContext) -> PartOutput:
    tasks = list(ctx.cfg.lm_eval_tasks or [])
    res = run_lm_eval_tasks(ctx.model, ctx.tokenizer, tasks, ctx.cfg.lm_eval_limit, ctx.cfg.batch_size,
                            getattr(ctx.cfg, "lm_eval_include_path", None))
    scores: dict[str, Any] = {"lmeval_tasks": sorted(res)}
    for task, metrics in res.items():
        scores.update({f"lmeval_{task}_{m}": v for m, v in metrics.items()})
    return PartOutput(scores)


@dataclass(frozen=True)
class Part:
    fn: Callable[[EvalContext], PartOutput]
    per_concept: bool  # False: shared by every concept (one baseline entry per model)
    per_split: bool  # False: the same data for train and test
    settings: Callable[[EvalContext], dict[str, Any]]  # what the part's scores depend on (baseline cache key)
    mode: Callable[[EvalContext], str]


def _mc_settings(ctx: EvalContext, qs: Sequence[MCQuestion]) -> dict[str, Any]:
    c = ctx.cfg
    return {"template": c.prompt_template, "n": ctx.n, "chat": ctx.use_chat, "data": _digest(
        [(q.qid, q.q, q.options, q.answer) for q in qs])}


def _llm(ctx: EvalContext) -> dict[str, Any]:
    return {"llm_model": ctx.cfg.llm_model}


PARTS: dict[str, Part] = {
    "qa": Part(part_qa, True, True, lambda x: _mc_settings(x, x.concept.mc[SPLITS[x.split][0]]), lambda x: x.cfg.mc_mode),
    "simdom": Part(part_simdom, True, True, lambda x: _mc_settings(x, x.concept.mc[SPLITS[x.split][1]]),
                   lambda x: x.cfg.mc_mode),
    "control": Part(part_control, False, False, lambda x: _mc_settings(x, control_facts(x.store)), lambda x: x.cfg.mc_mode),
    "open_qa": Part(part_open_qa, True, True, lambda x: {
        "n": x.n, "chat": x.use_chat, "tokens": x.cfg.open_max_new_tokens, "f1": x.cfg.f1_threshold,
        "data": _digest([(q.qid, q.a, list(q.aliases)) for q in x.concept.open.get(SPLITS[x.split][0], [])]),
        **(_llm(x) if x.cfg.open_judge == "llm" else {})}, lambda x: x.cfg.open_judge),
    "ppl": Part(part_ppl, False, False, lambda x: {
        "max_length": getattr(x.cfg, "perplexity_max_length", 256),
        "data": _digest(perplexity_texts(x.store, x.cfg)[0])}, lambda x: "nll"),
    "coherence": Part(part_coherence, False, True, lambda x: {
        "n": x.cfg.coherence_n, "tokens": x.cfg.coherence_max_new_tokens, "chat": x.use_chat,
        "data": _digest(instructions(x.store)),
        **(_llm(x) if getattr(x.cfg, "coherence_judge", "local") == "llm" else {})},
        lambda x: getattr(x.cfg, "coherence_judge", "local")),
    "lm_eval": Part(part_lm_eval, False, False, lambda x: {
        "tasks": sorted(x.cfg.lm_eval_tasks or []), "limit": x.cfg.lm_eval_limit,
        "include": str(getattr(x.cfg, "lm_eval_include_path", None))}, lambda x: "lm_eval"),
}


def enabled_parts(cfg: Any) -> list[str]:
    on = {"qa": True, "simdom": True, "control": True, "open_qa": bool(cfg.open_qa), "ppl": bool(cfg.perplexity),
          "coherence": bool(cfg.coherence), "lm_eval": bool(cfg.lm_eval_tasks)}
    return [p for p in PART_ORDER if on[p]]


@functools.cache
def scoring_code_version() -> str:
    """A digest of the scoring code's source (this module, the scorers and judges): part of the keys of
    cached baselines and of choices made from scores, so a scorer fix is never compared against
    numbers the old code produced."""
    import sys

    from ember import semantic
    from ember.cache import source_digest
    from ember.evals import coherence, llm_judge, lm_eval_tasks, loglik, mc, open_qa, retention

    return source_digest([sys.modules[__name__], mc, loglik, coherence, retention, open_qa, lm_eval_tasks,
                          llm_judge, semantic])


def data_settings(tokenizer: Any, concept: ConceptData, store: ConceptStore, cfg: Any, split: str) -> dict[str, Any]:
    """What every enabled part's scores depend on (settings, data digests and the scoring code): a cache
    key for anything chosen from evaluations, so a changed question, text or scorer invalidates the choice."""
    ctx = EvalContext(None, tokenizer, concept, store, cfg, split)  # type: ignore[arg-type]
    return {"code": scoring_code_version(), **{name: PARTS[name].settings(ctx) for name in enabled_parts(cfg)}}


def mc_scorer(cfg: Any, tokenizer: Any) -> Callable[[nn.Module, Any, Sequence[Any]], MCResult]:
    """Plain multiple choice exactly as :func:`evaluate` scores it (``cfg.mc_mode``, chat wrapping)."""
    use_chat = EvalContext(None, tokenizer, None, None, cfg, "test").use_chat  # type: ignore[arg-type]
    return lambda model, tok, qs: score_mc(model, tok, qs, cfg, use_chat=use_chat)


def provenance(cfg: Any) -> dict[str, Any]:
    """Which scorers and judges produced the numbers (written into every result)."""
    return {"mc_mode": cfg.mc_mode, "judge": cfg.open_judge,
            "coherence_judge": getattr(cfg, "coherence_judge", "local"),
            "frac_on": getattr(cfg, "frac_on", "acc"), "max_questions": cfg.max_questions}


def run_part(name: str, ctx: EvalContext) -> PartOutput:
    t0 = time.perf_counter()
    out = PARTS[name].fn(ctx)
    out.scores[f"time_{name}_s"] = round(time.perf_counter() - t0, 3)
    log.info("eval %s/%s: %s in %.1fs", ctx.concept.name, name,
             {k: round(v, 4) for k, v in out.scores.items() if isinstance(v, float) and not k.startswith("time")},
             out.scores[f"time_{name}_s"])
    return out


def check_settings(cfg: Any, split: str) -> None:
    """Fail early on a bad split or an LLM judge without an endpoint."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use 'train' or 'test'")
    if cfg.open_judge == "llm" or getattr(cfg, "coherence_judge", "local") == "llm":
        from ember.evals.llm_judge import client_from_config

        client_from_config(cfg)  # raises a ConfigError naming eval.llm_endpoint when it is missing


def evaluate(
    model: nn.Module, tokenizer: Any, concept: ConceptData, store: ConceptStore, cfg: Any, split: str,
    judge_model: nn.Module | None = None, progress: bool = False, parts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Raw scores (flat) and ``rows`` for ``model`` on ``concept``'s ``split`` ("train" | "test").

    ``judge_model`` scores the fluency of the completions; pass the unedited model when ``model`` is
    edited (None = ``model`` judges itself, right for the base model)."""
    check_settings(cfg, split)
    ctx = EvalContext(model, tokenizer, concept, store, cfg, split, judge_model, progress)
    scores: dict[str, Any] = {"split": split, "concept": concept.name, **provenance(cfg)}
    rows: list[dict[str, Any]] = []
    for name in parts or enabled_parts(cfg):
        out = run_part(name, ctx)
        scores.update(out.scores)
        rows += out.rows
    scores["rows"] = rows
    return scores


# --------------------------------------------------------------------------------------------------
# relative scores and the paper's metrics


def _num(d: dict[str, Any], k: str) -> float | None:
    v = d.get(k)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _mc_fracs(scores: dict[str, Any], base: dict[str, Any], measure: str) -> dict[str, float]:
    out = {}
    for part in ("qa", "simdom", "control"):
        s, b = _num(scores, f"{part}_{measure}"), _num(base, f"{part}_{measure}")
        if s is not None and b is not None:
            out[f"{part}_frac"] = mc_frac(s, b, _num(base, f"{part}_chance") or 0.25)
    return out


def _lm_eval_fracs(scores: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    out = {}
    for task in scores.get("lmeval_tasks", []) or []:
        s, b = _num(scores, f"lmeval_{task}_acc"), _num(base, f"lmeval_{task}_acc")
        if s is None or b is None:
            continue
        chance = lm_eval_chance(task)
        out[f"lmeval_{task}_frac"] = mc_frac(s, b, chance) if chance is not None else ratio_frac(s, b)
    return out


def _coherence_fracs(scores: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    out = {}
    rel, brel = _num(scores, "relevance"), _num(base, "relevance")
    flu, bflu = _num(scores, "fluency"), _num(base, "fluency")
    if rel is not None and brel is not None:
        out["relevance_frac"] = ratio_frac(rel, brel)
    if flu is not None and bflu is not None:
        out["fluency_frac"] = loglik_frac(flu, bflu)
    if scores.get("coherence_judge") == "llm":  # the paper's 0-2 ratings decide; local ones kept beside
        for k in ("relevance", "fluency"):
            s, b = _num(scores, f"{k}_llm"), _num(base, f"{k}_llm")
            if s is not None and b is not None:
                if f"{k}_frac" in out:
                    out[f"{k}_local_frac"] = out[f"{k}_frac"]
                out[f"{k}_frac"] = ratio_frac(s, b)
    return out


def relative(
    scores: dict[str, Any], base_scores: dict[str, Any], measure: str | None = None,
    min_coherence: float | None = None,
) -> dict[str, Any]:
    """Kept fractions (``*_frac``) and efficacy, specificity, coherence, harmonic, harmonic_alpaca.

    ``measure`` picks the multiple-choice score the fractions use (default: the ``frac_on`` the
    scores were made with, else ``acc``)."""
    measure = measure or scores.get("frac_on") or "acc"
    fr: dict[str, float] = _mc_fracs(scores, base_scores, measure)
    o, bo = _num(scores, "open_qa_acc"), _num(base_scores, "open_qa_acc")
    if o is not None and bo is not None:
        fr["open_qa_frac"] = open_frac(o, bo)
    p, bp = _num(scores, "ppl"), _num(base_scores, "ppl")
    if p is not None and bp is not None:
        fr["ppl_frac"] = ratio_frac(p, bp, higher_is_better=False)
    fr.update(_lm_eval_fracs(scores, base_scores))
    fr.update(_coherence_fracs(scores, base_scores))
    out: dict[str, Any] = {**fr, **paper_metrics(fr, min_coherence)}
    if "open_qa_frac" in fr:
        of = fr["open_qa_frac"]
        out["efficacy_open"] = 1.0 - of if math.isfinite(of) else float("nan")
    if not math.isfinite(out["efficacy"]):
        _warn_once("qa_frac", "qa_frac is undefined (base QA score at or below chance): efficacy is NaN, "
                   "harmonic means 0")
    for k in out.get("undefined_terms", []):
        _warn_once(k, f"{k} is undefined (base score at or below chance): left out of specificity")
    out.update({k: scores.get(k) for k in ("judge", "coherence_judge", "fluency_judge", "mc_mode", "ppl_source")
                if k in scores})
    out["frac_on"] = measure
    return out
