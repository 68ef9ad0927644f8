"""Concept features of the embedding factorization: token labels, statistics, selectors, report.

Token labels are decided by token id (never by decoded string): 1 = concept-only (seen in the
concept's sentences and never in the background), 0 = background-only, 2 = both. Per-feature
statistics follow reference-spec 2.2 (``ratio_abs`` = mean |G| over concept-only rows over mean
|G| over background-only rows, zeros included, "both" rows excluded). Selectors are registered by
name and combine with ``+`` (every part must pass).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from ember.cache import ArtifactCache
from ember.code_versions import factorization_code_version
from ember.config import resolve_device
from ember.errors import ConfigError
from ember.factorize import FactorizationResult, sparse_factorize

log = logging.getLogger(__name__)

CONCEPT_ONLY, BACKGROUND_ONLY, BOTH = 1, 0, 2
LABEL_NAMES = {CONCEPT_ONLY: "concept", BACKGROUND_ONLY: "neutral", BOTH: "both"}


def count_tokens(tokenizer: Any, sentences: Sequence[str], batch: int = 256) -> Counter[int]:
    counts: Counter[int] = Counter()
    for i in range(0, len(sentences), batch):
        for ids in tokenizer(list(sentences[i : i + batch]), add_special_tokens=False)["input_ids"]:
            counts.update(ids)
    return counts


@dataclass
class EmbeddingFeatures:
    """A cached factorization of the concept+background vocabulary and its token labels."""

    concept: str
    vprime: torch.Tensor  # (n,) token ids, sorted
    labels: torch.Tensor  # (n,) CONCEPT_ONLY / BACKGROUND_ONLY / BOTH
    exclusivity: torch.Tensor  # (n,) token-level concept exclusivity in [0, 1]
    F: torch.Tensor  # (d, K) in the effective (scaled) embedding space
    G: torch.Tensor  # (n, K)
    fit: dict[str, Any]  # loss curve, best iteration, seconds, ...
    embed_scale: float

    @property
    def rank(self) -> int:
        return int(self.F.shape[1])


def label_tokens(
    concept_counts: Counter[int], background_counts: Counter[int], special_ids: set[int]
) -> tuple[list[int], list[int], list[float]]:
    """V' (sorted unique non-special ids), their labels and token-level exclusivity.

    Exclusivity of a token: its concept frequency over the sum of its concept and background
    frequencies, each normalised by the corpus size (0.5 = equally common in both)."""
    vprime = sorted((set(concept_counts) | set(background_counts)) - special_ids)
    n_con = max(1, sum(concept_counts.values()))
    n_bg = max(1, sum(background_counts.values()))
    labels, excl = [], []
    for t in vprime:
        c, b = concept_counts.get(t, 0), background_counts.get(t, 0)
        labels.append(BOTH if c and b else CONCEPT_ONLY if c else BACKGROUND_ONLY)
        fc, fb = c / n_con, b / n_bg
        excl.append(fc / (fc + fb) if fc + fb > 0 else 0.0)
    return vprime, labels, excl


def effective_embeddings(model: torch.nn.Module, ids: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows of the input embedding as the first layer sees them (times the model's embedding scale)."""
    W = model.get_input_embeddings().weight
    return W[ids.to(W.device)].detach().float().cpu() * scale


def embedding_fingerprint(rows: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha1(rows.contiguous().numpy().tobytes()).hexdigest()[:16]


def compute_embedding_features(
    model: torch.nn.Module,
    tokenizer: Any,
    model_facts: Any,
    concept: str,
    concept_sentences: Sequence[str],
    background_sentences: Sequence[str],
    fcfg: Any,
    cache: ArtifactCache | None = None,
    progress: bool = False,
) -> EmbeddingFeatures:
    """Factorize the effective embeddings of V' (cached per model, concept, data and settings)."""
    con, bg = count_tokens(tokenizer, concept_sentences), count_tokens(tokenizer, background_sentences)
    vprime, labels, excl = label_tokens(con, bg, set(tokenizer.all_special_ids))
    ids = torch.tensor(vprime, dtype=torch.long)
    rows = effective_embeddings(model, ids, model_facts.embed_scale)
    settings = {k: getattr(fcfg, k) for k in (
        "rank", "sparsity", "reg", "reg_tries", "tol", "patience", "max_iter", "stopping",
        "plateau_rel_tol", "plateau_patience", "seed")}
    settings["dtype"] = getattr(fcfg, "dtype", "float64")  # the schema's default when a caller passes none
    # a CUDA fit rounds differently from a CPU one, and the top-k supports follow rounding (docs/design.md)
    settings["device"] = torch.device(resolve_device(fcfg.device)).type
    key = {
        "model": model_facts.name, "source": model_facts.source, "embeddings": embedding_fingerprint(rows),
        "concept": concept, "n_vprime": len(vprime), "vprime": embedding_fingerprint(ids.float()),
        "labels": embedding_fingerprint(torch.tensor(labels, dtype=torch.float32)), **settings,
        "code": factorization_code_version(),
    }

    def build() -> dict[str, Any]:
        log.info("factorizing %d x %d embeddings for %r (K=%d, sparsity=%g)", rows.shape[1], rows.shape[0],
                 concept, fcfg.rank, fcfg.sparsity)
        res: FactorizationResult = sparse_factorize(
            rows.T, fcfg.rank, fcfg.sparsity, fcfg.reg, fcfg.reg_tries, fcfg.tol, fcfg.patience, fcfg.max_iter,
            fcfg.stopping, fcfg.plateau_rel_tol, fcfg.plateau_patience, fcfg.seed, fcfg.device, progress,
            getattr(torch, settings["dtype"]))
        log.info("factorization: best loss %.6g at iteration %d of %d (%s), relative residual %.3f, %.1fs",
                 res.best_loss, res.best_iter, res.n_iter, res.stopped_by, res.relative_residual, res.seconds)
        return {"F": res.F, "G": res.G, "fit": {
            "loss_curve": res.loss_curve, "best_iter": res.best_iter, "n_iter": res.n_iter,
            "best_loss": res.best_loss, "reg_used": res.reg_used, "seconds": res.seconds,
            "stopped_by": res.stopped_by, "relative_residual": res.relative_residual, "attempts": res.attempts}}

    payload = cache.get_or_build("embedding_factors", f"{model_facts.name}/{_slug(concept)}", key, build) \
        if cache is not None else build()
    return EmbeddingFeatures(
        concept=concept, vprime=ids, labels=torch.tensor(labels), exclusivity=torch.tensor(excl),
        F=payload["F"], G=payload["G"], fit=payload["fit"], embed_scale=model_facts.embed_scale,
    )


def _slug(s: str) -> str:
    from ember.data import slugify

    return slugify(s)


# --------------------------------------------------------------------------------------------------
# statistics


def feature_stats(feats: EmbeddingFeatures) -> pd.DataFrame:
    """Per-feature statistics (reference-spec 2.2) plus purity and exclusivity."""
    g = feats.G.abs().double()
    lab = feats.labels
    con, neu, both = lab == CONCEPT_ONLY, lab == BACKGROUND_ONLY, lab == BOTH
    nz = g > 1e-12
    mean_con = g[con].mean(0) if con.any() else torch.zeros(g.shape[1], dtype=torch.float64)
    mean_neu = g[neu].mean(0) if neu.any() else torch.zeros(g.shape[1], dtype=torch.float64)
    sum_con, sum_neu = g[con].sum(0), g[neu].sum(0)
    n_act = nz.sum(0).clamp_min(1)
    excl = (g * feats.exclusivity[:, None].double()).sum(0) / g.sum(0).clamp_min(1e-12)
    return pd.DataFrame({
        "feature": range(g.shape[1]),
        "mean_abs_concept": mean_con.numpy(),
        "mean_abs_neutral": mean_neu.numpy(),
        "diff_abs": (mean_con - mean_neu).numpy(),
        "ratio_abs": (mean_con / (mean_neu + 1e-8)).numpy(),
        "sum_abs_concept": sum_con.numpy(),
        "sum_abs_neutral": sum_neu.numpy(),
        "sum_ratio_cn": ((sum_con + 1e-8) / (sum_neu + 1e-8)).numpy(),
        "num_concept": (nz & con[:, None]).sum(0).numpy(),
        "num_neutral": (nz & neu[:, None]).sum(0).numpy(),
        "num_both": (nz & both[:, None]).sum(0).numpy(),
        "num_active": nz.sum(0).numpy(),
        "purity": ((nz & con[:, None]).sum(0) / n_act).numpy(),
        "exclusivity": excl.numpy(),
    })


def top_tokens(feats: EmbeddingFeatures, tokenizer: Any, k: int, n: int = 20) -> list[tuple[str, int, float]]:
    """The feature's active tokens by |G| descending: (decoded string, label, G value)."""
    col = feats.G[:, k]
    nz = torch.nonzero(col).squeeze(1)
    order = nz[col[nz].abs().argsort(descending=True)][:n]
    return [(tokenizer.decode([int(feats.vprime[i])]), int(feats.labels[i]), float(col[i])) for i in order]


# --------------------------------------------------------------------------------------------------
# selectors

SelectorFn = Callable[[pd.DataFrame, EmbeddingFeatures, Any, Any], pd.Series]
SELECTORS: dict[str, SelectorFn] = {}


def register_selector(name: str) -> Callable[[SelectorFn], SelectorFn]:
    def deco(fn: SelectorFn) -> SelectorFn:
        SELECTORS[name] = fn
        return fn
    return deco


@register_selector("ratio")
def _select_ratio(stats: pd.DataFrame, feats: EmbeddingFeatures, scfg: Any, ctx: Any) -> pd.Series:
    return stats["ratio_abs"] >= scfg.ratio_thresh


@register_selector("purity")
def _select_purity(stats: pd.DataFrame, feats: EmbeddingFeatures, scfg: Any, ctx: Any) -> pd.Series:
    return stats["purity"] >= scfg.purity_thresh


@register_selector("exclusivity")
def _select_exclusivity(stats: pd.DataFrame, feats: EmbeddingFeatures, scfg: Any, ctx: Any) -> pd.Series:
    return stats["exclusivity"] >= scfg.exclusivity_thresh


@register_selector("semantic")
def _select_semantic(stats: pd.DataFrame, feats: EmbeddingFeatures, scfg: Any, ctx: Any) -> pd.Series:
    from ember.semantic import similarity_to_concept

    texts = [", ".join(t.strip() for t, _, _ in top_tokens(feats, ctx.tokenizer, k, scfg.semantic_top_tokens))
             for k in stats["feature"]]
    sims = similarity_to_concept(ctx.concept_terms, texts)
    stats["semantic"] = sims
    return stats["semantic"] >= scfg.semantic_thresh


#: words left out of key-term anchors (they are pieces of names such as "Valley of the Kings")
KEY_TERM_STOPWORDS = frozenset({"of", "the", "a", "an", "and", "in", "on", "to", "ii", "s"})


def key_term_token_ids(tokenizer: Any, terms: Sequence[str]) -> list[int]:
    """Token ids that stand for the concept's key terms (its name and main entities).

    Each term is split into words; each word is tokenized with a leading space (and the term's first
    word also without one, as at the start of a text). A word's *first* token is kept when it has at
    least 3 letters or digits and is no stopword; continuation pieces ('ore', 'us', 'in') and 1-2
    letter pieces ('H', ' D') are left out because they are shared by many unrelated words."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids: set[int] = set()
    for term in terms:
        for i, word in enumerate(term.split()):
            for variant in ((" " + word, word) if i == 0 else (" " + word,)):
                toks = tokenizer(variant, add_special_tokens=False)["input_ids"]
                if not toks or toks[0] in special:
                    continue
                text = tokenizer.decode([toks[0]]).strip()
                if text.lower() in KEY_TERM_STOPWORDS or sum(ch.isalnum() for ch in text) < 3:
                    continue
                ids.add(int(toks[0]))
    return sorted(ids)


@register_selector("anchor")
def _select_anchor(stats: pd.DataFrame, feats: EmbeddingFeatures, scfg: Any, ctx: Any) -> pd.Series:
    """Key-term anchored features: the concept's own tokens carry the feature.

    ``anchor`` = the share of a feature's |G| mass over concept-only tokens that lies on key-term
    tokens (:func:`key_term_token_ids` of ``ctx.concept_terms``); selected when it reaches
    ``anchor_thresh``. Generic clusters ({show, display}, {go, goes}) hold no key-term token and
    score 0, whatever their ratio. Features with fewer than ``anchor_min_tokens`` key-term tokens
    are not selected."""
    anchors = key_term_token_ids(ctx.tokenizer, ctx.concept_terms)
    is_anchor = torch.isin(feats.vprime, torch.tensor(anchors, dtype=feats.vprime.dtype))
    conly = feats.labels == CONCEPT_ONLY
    g = feats.G.abs().double()
    share = g[is_anchor & conly].sum(0) / g[conly].sum(0).clamp_min(1e-12)
    n_anchor = ((feats.G[is_anchor & conly] != 0).sum(0)).numpy()
    stats["anchor"] = share.numpy()
    stats["n_anchor"] = n_anchor
    thresh = float(getattr(scfg, "anchor_thresh", 0.05))
    min_tokens = int(getattr(scfg, "anchor_min_tokens", 1))
    return (stats["anchor"] >= thresh) & (stats["n_anchor"] >= min_tokens)


@register_selector("llm")
def _select_llm(stats: pd.DataFrame, feats: EmbeddingFeatures, scfg: Any, ctx: Any) -> pd.Series:
    from ember.llm_selector import judge_features

    return judge_features(stats, feats, scfg, ctx)


@dataclass
class SelectionContext:
    tokenizer: Any
    concept: str
    concept_terms: list[str]


def selector_parts(name: Any) -> list[str]:
    """The selectors an ``ember.selector.name`` combines with '+' (``ratio+anchor``); empty parts ignored."""
    return [p.strip() for p in str(name).split("+") if p.strip()]


def select_features(feats: EmbeddingFeatures, scfg: Any, ctx: SelectionContext) -> pd.DataFrame:
    """Statistics plus ``selected`` and ``reason`` columns for every feature."""
    stats = feature_stats(feats)
    parts = selector_parts(scfg.name)
    unknown = [p for p in parts if p not in SELECTORS]
    if not parts or unknown:
        raise ConfigError(f"ember.selector.name={scfg.name!r}: unknown selector {unknown}; "
                          f"choose from {sorted(SELECTORS)} (combine with '+')")
    selected = pd.Series(True, index=stats.index)
    reasons = [[] for _ in range(len(stats))]
    for p in parts:
        ok = SELECTORS[p](stats, feats, scfg, ctx).astype(bool)
        for i, v in enumerate(ok):
            reasons[i].append(f"{p}:{'pass' if v else 'fail'}")
        selected &= ok
    stats["selected"] = selected.values
    stats["reason"] = [" ".join(r) for r in reasons]
    stats["top_tokens"] = [
        " | ".join(f"{t!r}{'*' if lab == CONCEPT_ONLY else ''}" for t, lab, _ in top_tokens(feats, ctx.tokenizer, k, 20))
        for k in stats["feature"]]
    return stats


def eligible_tokens(feats: EmbeddingFeatures, selected: Sequence[int]) -> torch.Tensor:
    """Indices into V' of concept-only tokens with a non-zero G entry on a selected feature."""
    if len(selected) == 0:
        return torch.zeros(0, dtype=torch.long)
    active = (feats.G[:, list(selected)] != 0).any(1)
    return torch.nonzero(active & (feats.labels == CONCEPT_ONLY)).squeeze(1)
