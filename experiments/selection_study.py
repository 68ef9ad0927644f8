"""EMBER selection study: efficacy vs specificity of EMBER alone on the packaged models.

One command (resumable; every measured point is appended to ``outputs/study/points.jsonl`` and
skipped when it is already there, measured on the same data: each point carries the tag of the data it
read, and a point whose concept data, backgrounds, control facts or held-out text changed since is
measured again and left out of the report)::

    OMP_NUM_THREADS=1 .venv/bin/python experiments/selection_study.py            # both models
    OMP_NUM_THREADS=1 .venv/bin/python experiments/selection_study.py --model smollm2_135m --quick
    OMP_NUM_THREADS=1 .venv/bin/python experiments/selection_study.py --report-only  # tables + plots

What one point is: a model, a concept, an edit (EMBER under one setting and one delta, or the naive
key-token baseline), and its scores on
- efficacy: QA_train (used for choosing) and QA_test (reported) accuracy and mean p(correct);
- specificity: SimdomQA_test, the starter control facts, and perplexity on held-out neutral text
  (the release neutral sentences for starter concepts and the starter neutral sentences for release
  concepts, so the factorization never saw it).

Speed: an input-embedding edit changes the output only for sequences containing an edited token id,
so each point re-scores only the questions (prompt + options) and texts that contain one; every other
item keeps its base score, which is exact. Base scores are computed once per (model, concept) and
cached under ``outputs/study/base/``; factorizations are cached in the project's ArtifactCache.
Settings vary one factor at a time around the paper's base (K=100, sparsity 1%, background=neutral,
selector ratio >= 2); identical edits (same token ids, directions and delta) are measured once.

Derived measures (``--report-only`` recomputes them from the raw scores):
- kept(acc) = clip((acc - 0.25) / (acc_base - 0.25), 0, 1), used only where acc_base >= 0.35
  (else the split is at chance and only p(correct) is used); kept(p) = min(1, p / p_base);
- efficacy = 1 - mean(kept(acc), kept(p)) on the concept's QA split;
- specificity = mean(kept(SimdomQA_test), kept(control facts), min(1, ppl_base / ppl)),
  each MC kept = mean(kept(acc), kept(p));
- harmonic = 2 E S / (E + S).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ember.cache import ArtifactCache  # noqa: E402
from ember.config import FactorizationConfig, SelectorConfig, model_preset  # noqa: E402
from ember.data import ConceptData, ConceptStore, MCQuestion  # noqa: E402
from ember.edit import EditPlan, EmbeddingEditor  # noqa: E402
from ember.evals.loglik import encode_pair, wants_bos  # noqa: E402
from ember.evals.mc import score_loglik  # noqa: E402
from ember.evals.retention import _encode_texts, perplexity  # noqa: E402
from ember.features import (  # noqa: E402
    CONCEPT_ONLY,
    EmbeddingFeatures,
    SelectionContext,
    compute_embedding_features,
    key_term_token_ids,
    select_features,
)
from ember.paths import SCRIPT_RELEASE_DIR, require_script_release  # noqa: E402

log = logging.getLogger("selection_study")

STARTER = ROOT / "ember" / "data" / "starter"
RELEASE = SCRIPT_RELEASE_DIR
OUT = ROOT / "outputs" / "study"
DOCS = ROOT / "docs" / "study"
TEMPLATE = "Question: {q}\nAnswer:"
CHANCE = 0.25
PAPER_DELTAS = [0.5, 1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 200.0]
PPL_N = 24  # held-out neutral sentences for perplexity

# Key terms for the release concepts (the release ships none; the starter set has key_terms.json).
# Written by this project: the concept's name and its main entities.
RELEASE_KEY_TERMS: dict[str, list[str]] = {
    "Harry Potter": ["Harry Potter", "Hogwarts", "Dumbledore", "Voldemort", "Hermione Granger", "Ron Weasley",
                     "Severus Snape", "Hagrid", "Gryffindor", "Slytherin", "Quidditch", "Horcrux", "Muggle"],
    "World War II": ["World War II", "Hitler", "Nazi", "Churchill", "Stalin", "Roosevelt", "Normandy", "D-Day",
                     "Pearl Harbor", "Holocaust", "Luftwaffe", "Wehrmacht", "Stalingrad", "Axis", "Allies",
                     "Blitzkrieg"],
    "Baseball": ["Baseball", "pitcher", "inning", "home run", "shortstop", "Yankees", "World Series", "batter",
                 "strikeout", "MLB", "dugout", "Babe Ruth", "catcher"],
    "Artificial intelligence": ["Artificial intelligence", "AI", "machine learning", "neural network",
                                "deep learning", "algorithm", "Turing", "chatbot", "GPT", "robot",
                                "reinforcement learning", "transformer"],
}

# (source, concept) per model; the full study runs these
CONCEPTS = {
    "smollm2_135m": [("starter", "Harry Potter"), ("starter", "Star Wars"), ("starter", "Ancient Egypt"),
                     ("release", "Harry Potter"), ("release", "World War II"), ("release", "Baseball"),
                     ("release", "Artificial intelligence")],
    "gemma3_270m": [("starter", "Harry Potter"), ("release", "World War II")],
}

BASE = {"rank": 100, "sparsity": 0.01, "background": "neutral", "selector": "ratio"}


# --------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class Setting:
    factor: str  # base | rank | sparsity | background | selector
    level: str
    rank: int = 100
    sparsity: float = 0.01
    background: str = "neutral"  # neutral | neutral+other | neutral+other+general
    selector: str = "ratio"
    thresholds: tuple[tuple[str, float], ...] = ()

    @property
    def sid(self) -> str:
        th = ",".join(f"{k}={v:g}" for k, v in self.thresholds)
        return f"K{self.rank}_s{self.sparsity:g}_bg[{self.background}]_sel[{self.selector}{(':' + th) if th else ''}]"

    def selector_cfg(self) -> SimpleNamespace:
        base = SelectorConfig()
        ns = SimpleNamespace(**{k: getattr(base, k) for k in base.__dataclass_fields__})
        ns.name = self.selector
        for k, v in self.thresholds:
            setattr(ns, k, int(v) if k.endswith("top_tokens") else v)
        return ns

    def fact_cfg(self) -> SimpleNamespace:
        base = FactorizationConfig(rank=self.rank, sparsity=self.sparsity, device="cpu")
        return SimpleNamespace(**{k: getattr(base, k) for k in base.__dataclass_fields__})


def tier_of(model: str, ref_label: str, quick: bool) -> str:
    """How much of the study a (model, concept) gets (compute budget ~35-45 min on 2 shared cores).

    full: SmolLM2 / starter Harry Potter (every factor level); starter: SmolLM2 / the other starter
    concepts; release: SmolLM2 / release Harry Potter and World War II (paper base, the combined
    recommendation, naive baselines); release-lite: the other release concepts (paper base, naive
    baselines); reduced: Gemma-3 (paper base, K=400, the combination, naive baselines)."""
    if quick:
        return "quick"
    if model == "smollm2_135m" and ref_label == "starter:Harry Potter":
        return "full"
    if model == "smollm2_135m" and ref_label.startswith("starter:"):
        return "starter"
    if model == "smollm2_135m":
        # the K=400 factorization over the release vocabulary with every other concept's sentences
        # (|V'| ~ 16k) takes ~2.5 min on one core: run the combination on two release concepts only
        return "release" if ref_label in ("release:Harry Potter", "release:World War II") else "release-lite"
    return "reduced"


BIG_BG = "neutral+other+general"


def settings_for(model: str, tier: str) -> list[Setting]:
    """One factor at a time around the paper's base, then the anchor selector and the combination."""
    def combined(k: int, th: float) -> Setting:
        return Setting("combined", f"anchor>={th:g}, K={k}, bg={BIG_BG}", rank=k, background=BIG_BG,
                       selector="anchor", thresholds=(("anchor_thresh", th),))

    out = [Setting("base", "paper base")]
    if tier not in ("release", "release-lite"):
        out.append(Setting("rank", "K=400", rank=400))
    if tier == "full":
        out.insert(1, Setting("rank", "K=200", rank=200))
        out += [Setting("sparsity", "0.5%", sparsity=0.005)]
    if tier in ("full", "starter"):
        out += [Setting("sparsity", "2%", sparsity=0.02)]
        if tier == "full":
            out += [Setting("background", "neutral+other", background="neutral+other")]
        out += [Setting("background", BIG_BG, background=BIG_BG)]
        sels = [("purity", (("purity_thresh", 0.5),)),
                ("exclusivity", (("exclusivity_thresh", 0.7),)),
                ("semantic", (("semantic_thresh", 0.35),)),
                ("semantic+exclusivity", (("semantic_thresh", 0.3), ("exclusivity_thresh", 0.6)))]
        if tier == "starter":
            sels = sels[3:]
        out += [Setting("selector", name, selector=name, thresholds=th) for name, th in sels]
        if tier == "full":  # the anchor selector alone on the paper's factorization (K=100, neutral)
            out += [Setting("selector", f"anchor>={th:g}", selector="anchor", thresholds=(("anchor_thresh", th),))
                    for th in (0.1, 0.3)]
    # the combination: anchor selector + K=400 + the large background; its threshold is chosen on
    # QA_train on starter Harry Potter (full tier: 0.05 wins) and used elsewhere
    if tier == "full":
        out += [combined(100, 0.1)] + [combined(400, th) for th in (0.05, 0.1, 0.2, 0.3)]
    elif tier != "release-lite":
        out += [combined(400, 0.05)]  # threshold chosen on QA_train (starter HP, full tier)
    return out


def deltas_for(setting: Setting, tier: str) -> list[float]:
    """Ascending; the paper grid {0.5, ..., 200} is subsampled for cost, its range kept on starter HP."""
    if tier == "quick":
        return [10.0, 50.0]
    if tier == "full":
        return [0.5, 2.0, 10.0, 50.0, 200.0] if setting.factor in ("base", "combined") else [2.0, 10.0, 50.0]
    if setting.factor == "combined":
        return [10.0, 50.0] if tier == "release" else [2.0, 10.0, 50.0]
    if tier == "starter" and setting.factor == "base":
        return [2.0, 10.0, 50.0]
    if tier == "reduced" and setting.factor == "base":
        return [2.0, 10.0]  # Gemma-3: delta 10 already costs most of the perplexity
    return [10.0]


#: a delta whose edit keeps less specificity than this ends the setting's delta sweep (larger deltas
#: only damage more); the skipped deltas are recorded as such
STOP_SPECIFICITY = 0.5


# --------------------------------------------------------------------------------------------------
# data


@dataclass
class ConceptRef:
    source: str
    name: str
    store: ConceptStore
    data: ConceptData
    key_terms: list[str]
    starter: ConceptStore
    release: ConceptStore

    @property
    def label(self) -> str:
        return f"{self.source}:{self.name}"

    def background(self, spec: str) -> list[str]:
        out: list[str] = []
        for part in spec.split("+"):
            if part == "neutral":
                out += self.store.neutral
            elif part == "other":
                out += self.store.all_sentences_except(self.name)
            elif part == "general":
                if not self.starter.general_text:
                    raise SystemExit(f"{STARTER}/general_text.json is missing: the general background needs it")
                out += self.starter.general_text
            else:
                raise ValueError(part)
        return out

    def ppl_texts(self) -> list[str]:
        """Held-out neutral text: the other data set's neutral sentences."""
        other = self.release if self.source == "starter" else self.starter
        return other.neutral[:PPL_N]

    def data_tag(self) -> str:
        """A digest of every text a point of this concept reads: the concept (questions, sentences, key
        terms), each background a setting may use, the control facts and the held-out text."""
        parts = [self.data.fingerprint(), self.key_terms, self.store.neutral, self.store.all_sentences_except(self.name),
                 self.starter.general_text, list(self.starter.control_facts), self.ppl_texts()]
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def concept_ref(source: str, name: str, starter: ConceptStore, release: ConceptStore) -> ConceptRef:
    store = starter if source == "starter" else release
    data = store.concept(name)
    terms = list(data.key_terms) if source == "starter" else RELEASE_KEY_TERMS.get(name, [name])
    return ConceptRef(source, name, store, data, terms, starter, release)


def key_token_ids(tokenizer: Any, terms: Sequence[str]) -> list[int]:
    """The naive baseline's tokens (:func:`ember.features.key_term_token_ids`): the first token of each
    word of each key term with a leading space (a term's first word also without one), when it has >= 3
    letters and is no stopword;
    continuation pieces of multi-token words are left out."""
    return key_term_token_ids(tokenizer, terms)


# --------------------------------------------------------------------------------------------------
# evaluation with per-item reuse


@dataclass
class MCBase:
    questions: list[MCQuestion]
    tokens: list[set[int]]
    correct: list[bool]
    p: list[float]


@dataclass
class PPLBase:
    texts: list[str]
    tokens: list[set[int]]
    nll_sum: list[float]
    count: list[int]


@dataclass
class Evaluator:
    model: Any
    tokenizer: Any
    mc: dict[str, MCBase] = field(default_factory=dict)
    ppl: PPLBase | None = None
    n_rescored: dict[str, int] = field(default_factory=dict)

    def _mc_tokens(self, q: MCQuestion) -> set[int]:
        bos = wants_bos(self.model, self.tokenizer)
        out: set[int] = set()
        for o in q.options:
            ctx, cont = encode_pair(self.tokenizer, TEMPLATE.format(q=q.q), " " + o, bos)
            out.update(ctx)
            out.update(cont)
        return out

    def _score_mc(self, qs: list[MCQuestion]) -> tuple[list[bool], list[float]]:
        if not qs:
            return [], []
        res = score_loglik(self.model, self.tokenizer, qs, TEMPLATE)
        return [i.correct for i in res.items], [i.p_correct for i in res.items]

    def _score_ppl(self, texts: list[str]) -> tuple[list[float], list[int]]:
        if not texts:
            return [], []
        res = perplexity(self.model, self.tokenizer, texts)
        enc = _encode_texts(self.tokenizer, texts, wants_bos(self.model, self.tokenizer), 256)
        counts = [max(0, len(e) - 1) for e in enc]
        return [n * c for n, c in zip(res.per_text_nll, counts, strict=True)], counts

    def setup(self, splits: dict[str, list[MCQuestion]], ppl_texts: list[str], cache_file: Path) -> None:
        cached = json.loads(cache_file.read_text()) if cache_file.exists() else {}
        changed = False
        for name, qs in splits.items():
            ids = [q.qid for q in qs]
            entry = cached.get(name)
            if entry is None or entry["qids"] != ids:
                t0 = time.perf_counter()
                corr, p = self._score_mc(qs)
                entry = {"qids": ids, "correct": corr, "p": p}
                cached[name] = entry
                changed = True
                log.info("base %s: %d questions in %.1fs", name, len(qs), time.perf_counter() - t0)
            self.mc[name] = MCBase(qs, [self._mc_tokens(q) for q in qs], entry["correct"], entry["p"])
        h = hashlib.sha1("\x1f".join(ppl_texts).encode()).hexdigest()[:12]
        entry = cached.get("ppl")
        if entry is None or entry["hash"] != h:
            nll, cnt = self._score_ppl(ppl_texts)
            entry = {"hash": h, "nll_sum": nll, "count": cnt}
            cached["ppl"] = entry
            changed = True
        enc = _encode_texts(self.tokenizer, ppl_texts, wants_bos(self.model, self.tokenizer), 256)
        self.ppl = PPLBase(ppl_texts, [set(e) for e in enc], entry["nll_sum"], entry["count"])
        if changed:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(cached))

    def base_scores(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, b in self.mc.items():
            out[f"{name}_acc"] = sum(b.correct) / len(b.correct)
            out[f"{name}_p"] = sum(b.p) / len(b.p)
        assert self.ppl is not None
        out["ppl"] = math.exp(sum(self.ppl.nll_sum) / max(1, sum(self.ppl.count)))
        return out

    def scores(self, edited: set[int]) -> dict[str, float]:
        """Scores of the current (edited) model; items without an edited token keep their base score."""
        out: dict[str, float] = {}
        self.n_rescored = {}
        for name, b in self.mc.items():
            idx = [i for i, t in enumerate(b.tokens) if t & edited]
            corr, p = list(b.correct), list(b.p)
            c2, p2 = self._score_mc([b.questions[i] for i in idx])
            for j, i in enumerate(idx):
                corr[i], p[i] = c2[j], p2[j]
            out[f"{name}_acc"] = sum(corr) / len(corr)
            out[f"{name}_p"] = sum(p) / len(p)
            self.n_rescored[name] = len(idx)
        assert self.ppl is not None
        idx = [i for i, t in enumerate(self.ppl.tokens) if t & edited]
        nll = list(self.ppl.nll_sum)
        n2, _ = self._score_ppl([self.ppl.texts[i] for i in idx])
        for j, i in enumerate(idx):
            nll[i] = n2[j]
        out["ppl"] = math.exp(sum(nll) / max(1, sum(self.ppl.count)))
        self.n_rescored["ppl"] = len(idx)
        return out


# --------------------------------------------------------------------------------------------------
# derived measures


def kept_acc(a: float, a0: float) -> float:
    if a0 - CHANCE < 0.10:
        return float("nan")
    return min(1.0, max(0.0, (a - CHANCE) / (a0 - CHANCE)))


def kept_p(p: float, p0: float) -> float:
    return min(1.0, max(0.0, p / p0)) if p0 > 0 else float("nan")


def _nanmean(xs: Sequence[float]) -> float:
    v = [x for x in xs if x == x]
    return sum(v) / len(v) if v else float("nan")


def derive(s: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    out = {}
    for split, tag in (("QA_train", "train"), ("QA_test", "test")):
        ka, kp = kept_acc(s[f"{split}_acc"], b[f"{split}_acc"]), kept_p(s[f"{split}_p"], b[f"{split}_p"])
        out[f"eff_acc_{tag}"] = 1 - ka if ka == ka else float("nan")
        out[f"eff_p_{tag}"] = 1 - kp
        out[f"efficacy_{tag}"] = 1 - _nanmean([ka, kp])
    sim = _nanmean([kept_acc(s["SimdomQA_test_acc"], b["SimdomQA_test_acc"]),
                    kept_p(s["SimdomQA_test_p"], b["SimdomQA_test_p"])])
    ctrl = _nanmean([kept_acc(s["control_acc"], b["control_acc"]), kept_p(s["control_p"], b["control_p"])])
    ppl = min(1.0, b["ppl"] / s["ppl"])
    out.update({"simdom_kept": sim, "control_kept": ctrl, "ppl_kept": ppl})
    out["specificity"] = (sim + ctrl + ppl) / 3
    for tag in ("train", "test"):
        e, sp = out[f"efficacy_{tag}"], out["specificity"]
        out[f"harmonic_{tag}"] = 2 * e * sp / (e + sp) if e + sp > 0 else 0.0
    return out


# --------------------------------------------------------------------------------------------------
# the run


class Points:
    """The measured points, appended one JSON line each. A point counts for the data it was measured on
    (its ``data`` tag, :meth:`ConceptRef.data_tag`); a key measured again on new data keeps its newest row."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    self.rows.append(json.loads(line))
        self.latest = {r["key"]: r for r in self.rows}
        self.by_sig = {r["edit_sig"]: r for r in self.rows if r.get("edit_sig")}

    def done(self, key: str, tag: str) -> bool:
        """Whether ``key`` was measured on the data tagged ``tag``."""
        row = self.latest.get(key)
        return row is not None and row.get("data") == tag

    def add(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.rows.append(row)
        self.latest[row["key"]] = row
        if row.get("edit_sig"):
            self.by_sig.setdefault(row["edit_sig"], row)


def current_rows(rows: list[dict[str, Any]], tags: dict[str, str]) -> list[dict[str, Any]]:
    """The newest row of each key whose data tag is its concept's tag now (``tags``: concept label ->
    tag); rows measured on other data, or before points carried a tag, are left out with a warning."""
    latest = {r["key"]: r for r in rows}
    kept = [r for r in latest.values() if r.get("data") is not None and r.get("data") == tags.get(r.get("concept"))]
    if len(kept) < len(latest):
        log.warning("report: %d of %d points were measured on other data than the current and are left out; "
                    "run the study again to measure them", len(latest) - len(kept), len(latest))
    return kept


def plan_signature(model: str, concept: str, tag: str, ids: torch.Tensor, direction: torch.Tensor, delta: float) -> str:
    h = hashlib.sha1()
    h.update(f"{model}|{concept}|{tag}|{delta:g}|".encode())
    h.update(ids.numpy().tobytes())
    h.update(direction.float().contiguous().numpy().round(5).tobytes())
    return h.hexdigest()[:16]


def replacement_plan(W: torch.Tensor, ids: list[int], target: torch.Tensor | None, scale: float) -> EditPlan:
    """An EditPlan that at delta=1 sets each row to ``target`` (zeros when None)."""
    t = torch.tensor(ids, dtype=torch.long)
    rows = W[t].detach().float().cpu()
    tgt = torch.zeros_like(rows) if target is None else target.float().cpu().expand_as(rows)
    return EditPlan(t, (rows - tgt) * scale, [])


def run_model(model_name: str, concepts: list[tuple[str, str]], quick: bool, points: Points,
              cache: ArtifactCache) -> None:
    from ember.models import load_model, untie_embeddings

    t0 = time.perf_counter()
    lm = load_model(model_preset(model_name))
    untie_embeddings(lm.model)
    lm.model.eval()
    log.info("%s loaded in %.1fs", model_name, time.perf_counter() - t0)
    tok = lm.tokenizer
    starter = ConceptStore(STARTER, label="the starter set")
    release = ConceptStore(RELEASE, label="release")
    editor = EmbeddingEditor(lm.model, lm.facts.embed_scale)
    W = lm.model.get_input_embeddings().weight
    mean_row = W.detach().float().mean(0)
    plans_path = OUT / "plans.jsonl"
    done_plans: set[tuple[str, str | None]] = set()
    if plans_path.exists():
        rows = [json.loads(x) for x in plans_path.read_text().splitlines() if x.strip()]
        done_plans = {(r["key"], r.get("data")) for r in rows}

    for source, name in concepts:
        ref = concept_ref(source, name, starter, release)
        tag = ref.data_tag()
        ev = Evaluator(lm.model, tok)
        splits = {"QA_train": ref.data.mc["QA_train"], "QA_test": ref.data.mc["QA_test"],
                  "SimdomQA_test": ref.data.mc["SimdomQA_test"], "control": list(starter.control_facts)}
        ev.setup(splits, ref.ppl_texts(), OUT / "base" / model_name / f"{source}_{ref.data.slug}_{tag}.json")
        base = ev.base_scores()
        log.info("[%s %s] base %s", model_name, ref.label, {k: round(v, 3) for k, v in base.items()})

        def measure(key: str, meta: dict[str, Any], plan: EditPlan, delta: float,
                    ref: ConceptRef = ref, base: dict[str, float] = base, ev: Evaluator = ev, tag: str = tag) -> None:
            if points.done(key, tag):
                return
            sig = plan_signature(model_name, ref.label, tag, plan.token_ids, plan.direction, delta) if len(plan) else ""
            row = {"key": key, "model": model_name, "concept": ref.label, "data": tag, **meta, "delta": delta,
                   "n_tokens": len(plan), "n_features": len(plan.features), "edit_sig": sig, "base": base}
            if len(plan) == 0:
                row.update({"scores": base, "note": "empty edit", "seconds": 0.0})
            elif sig in points.by_sig:
                row.update({"scores": points.by_sig[sig]["scores"], "note": f"same edit as {points.by_sig[sig]['key']}",
                            "seconds": 0.0})
            else:
                t = time.perf_counter()
                editor.apply(plan, delta)
                try:
                    row["scores"] = ev.scores({int(i) for i in plan.token_ids})
                finally:
                    editor.restore()
                row["seconds"] = round(time.perf_counter() - t, 2)
                row["rescored"] = dict(ev.n_rescored)
            row["derived"] = derive(row["scores"], base)
            points.add(row)
            d = row["derived"]
            log.info("[%s %s] %-40s d=%-5g tok=%-4d eff=%.2f spec=%.2f (sim %.2f ctrl %.2f ppl %.2f) %.1fs %s",
                     model_name, ref.label, meta.get("level", meta["method"]), delta, len(plan),
                     d["efficacy_test"], d["specificity"], d["simdom_kept"], d["control_kept"], d["ppl_kept"],
                     row["seconds"], row.get("note", ""))

        # naive baseline: key-term tokens set to zero / to the mean embedding, no factorization
        kids = key_token_ids(tok, ref.key_terms)
        for method, target in (("naive_zero", None), ("naive_mean", mean_row)):
            plan = replacement_plan(W, kids, target, lm.facts.embed_scale)
            measure(f"{model_name}|{ref.label}|{method}", {"method": method, "factor": "naive", "level": method},
                    plan, 1.0)
        pkey = f"{model_name}|{ref.label}|naive_tokens"
        if (pkey, tag) not in done_plans:
            _append(plans_path, {"key": pkey, "model": model_name, "concept": ref.label, "data": tag,
                                 "setting": "naive", "tokens": [tok.decode([i]) for i in kids]})
            done_plans.add((pkey, tag))

        tier = tier_of(model_name, ref.label, quick)
        for st in settings_for(model_name, tier):
            todo = [d for d in deltas_for(st, tier) if not points.done(f"{model_name}|{ref.label}|ember|{st.sid}|{d:g}", tag)]
            pkey = f"{model_name}|{ref.label}|{st.sid}"
            if not todo and (pkey, tag) in done_plans:
                continue
            plan, info = build_plan(lm, ref, st, cache)
            if (pkey, tag) not in done_plans:
                _append(plans_path, {"key": pkey, "model": model_name, "concept": ref.label, "data": tag,
                                     "setting": st.sid, "factor": st.factor, "level": st.level, **info})
                done_plans.add((pkey, tag))
            stopped = False
            for d in deltas_for(st, tier):
                key = f"{model_name}|{ref.label}|ember|{st.sid}|{d:g}"
                meta = {"method": "ember", "factor": st.factor, "level": st.level, "setting": st.sid}
                if stopped:
                    if not points.done(key, tag):
                        points.add({"key": key, "model": model_name, "concept": ref.label, "data": tag, **meta,
                                    "delta": d, "skipped": f"specificity < {STOP_SPECIFICITY} at a smaller delta"})
                    continue
                measure(key, meta, plan, d)
                row = points.latest[key]
                if "derived" in row and row["derived"]["specificity"] < STOP_SPECIFICITY:
                    stopped = True


def _append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


_FEATS: dict[tuple, EmbeddingFeatures] = {}


def features_for(lm: Any, ref: ConceptRef, st: Setting, cache: ArtifactCache) -> EmbeddingFeatures:
    k = (lm.facts.name, ref.label, st.rank, st.sparsity, st.background)
    if k not in _FEATS:
        t = time.perf_counter()
        _FEATS[k] = compute_embedding_features(
            lm.model, lm.tokenizer, lm.facts, ref.name, ref.data.sentences, ref.background(st.background),
            st.fact_cfg(), cache)
        log.info("features %s K=%d s=%g bg=%s: |V'|=%d, %.1fs", ref.label, st.rank, st.sparsity, st.background,
                 len(_FEATS[k].vprime), time.perf_counter() - t)
    return _FEATS[k]


def build_plan(lm: Any, ref: ConceptRef, st: Setting, cache: ArtifactCache) -> tuple[EditPlan, dict[str, Any]]:
    feats = features_for(lm, ref, st, cache)
    ctx = SelectionContext(lm.tokenizer, ref.name, list(ref.key_terms))
    report = select_features(feats, st.selector_cfg(), ctx)
    selected = [int(k) for k in report.loc[report["selected"], "feature"]]
    plan = EditPlan.from_features(feats, selected)
    norms = plan.direction.norm(dim=1) if len(plan) else torch.zeros(0)
    order = norms.argsort(descending=True).tolist()
    toks = [lm.tokenizer.decode([int(plan.token_ids[i])]) for i in order]
    sel_rows = report.loc[report["selected"]]
    info = {"n_vprime": int(feats.vprime.numel()), "n_concept_only": int((feats.labels == CONCEPT_ONLY).sum()),
            "selected": selected, "n_tokens": len(plan), "tokens": toks,
            "features": [{"feature": int(r.feature), "ratio": float(r.ratio_abs), "purity": float(r.purity),
                          "exclusivity": float(r.exclusivity), "semantic": float(getattr(r, "semantic", float("nan"))),
                          "top": r.top_tokens[:300]} for r in sel_rows.itertuples()]}
    return plan, info


# --------------------------------------------------------------------------------------------------
# report: tables and plots

FACTOR_ORDER = ["base", "rank", "sparsity", "background", "selector", "combined"]


def _fmt(x: float, nd: int = 2) -> str:
    return "—" if x is None or x != x else f"{x:.{nd}f}"


def curves(rows: list[dict[str, Any]], model: str) -> dict[str, dict[float, dict[str, float]]]:
    """Per level (setting label): per delta, the mean over concepts of each derived measure.

    A delta enters a curve only when every concept that ran the setting has a measured point there
    (a delta skipped after the specificity stop in one concept is left out of the mean)."""
    import pandas as pd

    recs = []
    for r in rows:
        if r.get("model") != model or r.get("method") != "ember":
            continue
        recs.append({"factor": r["factor"], "level": r["level"], "concept": r["concept"], "delta": r["delta"],
                     "n_tokens": r.get("n_tokens", float("nan")), "ok": "derived" in r,
                     **(r.get("derived") or {})})
    out: dict[str, dict[float, dict[str, float]]] = {}
    if not recs:
        return out
    df = pd.DataFrame(recs)
    for (factor, level), g in df.groupby(["factor", "level"], sort=False):
        n_conc = g["concept"].nunique()
        per: dict[float, dict[str, float]] = {}
        for d, gd in g.groupby("delta"):
            if not gd["ok"].all() or gd["concept"].nunique() < n_conc:
                continue
            m = gd.drop(columns=["factor", "level", "concept", "ok"]).mean(numeric_only=True).to_dict()
            m["n_concepts"] = n_conc
            per[float(d)] = m
        out[f"{factor}|{level}"] = per
        CURVE_CONCEPTS[(model, f"{factor}|{level}")] = set(g["concept"])
    return out


#: (model, curve key) -> the concepts its mean is over (filled by :func:`curves`)
CURVE_CONCEPTS: dict[tuple[str, str], set[str]] = {}


def naive_points(rows: list[dict[str, Any]], model: str, concepts: set[str] | None = None) -> dict[str, dict[str, float]]:
    import pandas as pd

    out = {}
    for method in ("naive_zero", "naive_mean"):
        recs = [{**r["derived"], "n_tokens": r["n_tokens"]} for r in rows
                if r.get("model") == model and r.get("method") == method and "derived" in r
                and (concepts is None or r["concept"] in concepts)]
        if recs:
            out[method] = pd.DataFrame(recs).mean().to_dict()
    return out


def best_by(curve: dict[float, dict[str, float]], key: str) -> tuple[float | None, dict[str, float]]:
    if not curve:
        return None, {}
    d = max(curve, key=lambda x: (curve[x][key], -x))
    return d, curve[d]


def spec_at(curve: dict[float, dict[str, float]], target: float) -> float:
    """Highest specificity among the curve's points with efficacy_test >= target (NaN if none)."""
    vals = [v["specificity"] for v in curve.values() if v["efficacy_test"] >= target - 1e-9]
    return max(vals) if vals else float("nan")


def slugify_group(group: str) -> str:
    return group.replace("starter:", "starter_").replace(" ", "_").replace(":", "_")


def eff_at_spec(curve: dict[float, dict[str, float]], floor: float = 0.95) -> float:
    """Highest efficacy (test) among the curve's points that keep specificity >= floor (0 if none)."""
    vals = [v["efficacy_test"] for v in curve.values() if v["specificity"] >= floor - 1e-9]
    return max(vals) if vals else 0.0


def write_report(rows: list[dict[str, Any]], docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs.mkdir(parents=True, exist_ok=True)
    lines = ["# Selection study: generated tables", "",
             "Generated by `experiments/selection_study.py` from `outputs/study/points.jsonl` (means over the "
             "model's concepts; efficacy on QA_test, delta* chosen by the mean harmonic on QA_train). "
             "See ../study.md for definitions and discussion.", ""]
    models = [m for m in CONCEPTS if any(r.get("model") == m for r in rows)]
    groups = [(m, g) for m in models for g in ("starter", "release")]
    groups.insert(1, ("smollm2_135m", "starter:Harry Potter"))  # the full factor set ran on this one
    for model, group in groups:
        if model not in models:
            continue
        grows = [r for r in rows if r.get("model") == model and
                 (str(r.get("concept", "")).startswith(group + ":") or r.get("concept") == group)]
        if not any(r.get("method") == "ember" for r in grows):
            continue
        cv = curves(grows, model)
        concepts = sorted({r["concept"] for r in grows if r.get("model") == model and r.get("method") == "ember"})
        nv = naive_points(grows, model, set(concepts))
        target = nv.get("naive_zero", {}).get("efficacy_test", float("nan"))
        lines += [f"## {model}, {group}{'' if ':' in group else ' concepts'} ({len(concepts)}: {', '.join(concepts)})", ""]
        if nv:
            lines += ["| naive baseline | tokens | efficacy (test) | efficacy (train) | specificity | simdom kept | "
                      "control kept | ppl kept | harmonic (test) |", "|---|---|---|---|---|---|---|---|---|"]
            for k, v in nv.items():
                lines.append(f"| {k} | {v['n_tokens']:.1f} | {_fmt(v['efficacy_test'])} | {_fmt(v['efficacy_train'])} | "
                             f"{_fmt(v['specificity'])} | {_fmt(v['simdom_kept'])} | {_fmt(v['control_kept'])} | "
                             f"{_fmt(v['ppl_kept'])} | {_fmt(v['harmonic_test'])} |")
            lines.append("")
        lines += ["Specificity at matched efficacy: the best specificity among a setting's deltas whose mean "
                  "efficacy (test) reaches the naive zero baseline's on the same concepts (column 'naive zero E'); "
                  "— = no delta reaches it. Levels that ran on fewer concepts (column n) are means over those only.",
                  "",
                  "| factor | level | n | naive zero E / mean E | tokens edited | delta* (train) | efficacy (test) | specificity | control kept | "
                  "harmonic (test) at delta* | best harmonic (test) [delta] | spec. at matched efficacy | "
                  "max efficacy (test) | efficacy at spec. >= 0.95 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        keys = sorted(cv, key=lambda k: (FACTOR_ORDER.index(k.split("|")[0]) if k.split("|")[0] in FACTOR_ORDER else 99))
        for key in keys:
            curve = cv[key]
            if not curve:
                continue
            factor, level = key.split("|", 1)
            d_tr, at_tr = best_by(curve, "harmonic_train")
            d_te, at_te = best_by(curve, "harmonic_test")
            mx = max(v["efficacy_test"] for v in curve.values())
            cs = CURVE_CONCEPTS[(model, key)]
            nv_same = naive_points(grows, model, cs)
            target = nv_same.get("naive_zero", {}).get("efficacy_test", float("nan"))
            nm = nv_same.get("naive_mean", {}).get("efficacy_test", float("nan"))
            lines.append(f"| {factor} | {level} | {len(cs)} | {_fmt(target)} / {_fmt(nm)} | "
                         f"{at_tr.get('n_tokens', float('nan')):.0f} | {d_tr:g} | "
                         f"{_fmt(at_tr['efficacy_test'])} | {_fmt(at_tr['specificity'])} | {_fmt(at_tr['control_kept'])} | "
                         f"{_fmt(at_tr['harmonic_test'])} | {_fmt(at_te['harmonic_test'])} [{d_te:g}] | "
                         f"{_fmt(spec_at(curve, target))} | {_fmt(mx)} | {_fmt(eff_at_spec(curve))} |")
        lines.append("")
        # per-concept detail: every setting at its train-chosen delta, plus the naive baselines
        lines += [f"### {model}, {group}: per concept (each setting at the delta with the best QA_train harmonic for that concept)", "",
                  "| concept | edit | delta | tokens | efficacy (test) | acc QA_test base→edit | specificity | "
                  "control acc base→edit | simdom kept | ppl kept |", "|---|---|---|---|---|---|---|---|---|---|"]
        for concept in concepts:
            rs = [r for r in grows if r.get("model") == model and r["concept"] == concept and "derived" in r]
            groups: dict[str, list[dict[str, Any]]] = {}
            for r in rs:
                groups.setdefault(r["level"], []).append(r)
            for level, g in groups.items():
                r = max(g, key=lambda x: (x["derived"]["harmonic_train"], -x["delta"]))
                dv, sc, b = r["derived"], r["scores"], r["base"]
                lines.append(f"| {concept} | {level} | {r['delta']:g} | {r['n_tokens']} | {_fmt(dv['efficacy_test'])} | "
                             f"{b['QA_test_acc']:.2f}→{sc['QA_test_acc']:.2f} | {_fmt(dv['specificity'])} | "
                             f"{b['control_acc']:.2f}→{sc['control_acc']:.2f} | {_fmt(dv['simdom_kept'])} | "
                             f"{_fmt(dv['ppl_kept'])} |")
        lines.append("")
        # plots: one per factor, the base curve on each
        base_key = next((k for k in cv if k.startswith("base|")), None)
        for factor in FACTOR_ORDER[1:]:
            # only levels measured on every concept of the group, so that they compare with the naive markers
            fkeys = [k for k in keys if k.startswith(factor + "|") and cv[k]
                     and len(CURVE_CONCEPTS[(model, k)]) == len(concepts)]
            if not fkeys:
                continue
            fig, ax = plt.subplots(figsize=(6.4, 5.0))
            for k in ([base_key] if base_key else []) + fkeys:
                c = cv[k]
                ds = sorted(c)
                xs, ys = [1.0] + [c[d]["specificity"] for d in ds], [0.0] + [c[d]["efficacy_test"] for d in ds]
                ds = [0.0] + ds  # delta 0 = the unedited model
                style = dict(color="black", ls="--") if k == base_key else {}
                ax.plot(xs, ys, marker="o", label=k.split("|", 1)[1] + (" (paper base)" if k == base_key else ""),
                        **style)
                for d, x, y in zip(ds, xs, ys, strict=True):
                    ax.annotate(f"{d:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
            for name, mk in (("naive_zero", "*"), ("naive_mean", "P")):
                if name in nv:
                    ax.scatter([nv[name]["specificity"]], [nv[name]["efficacy_test"]], marker=mk, s=160,
                               color="red" if name == "naive_zero" else "darkred", zorder=5,
                               label=f"{name} (key-term tokens)")
            ax.set_xlabel("specificity (mean kept: SimdomQA, control facts, neutral ppl)")
            ax.set_ylabel("efficacy on QA_test (1 - kept)")
            lo = min([0.6] + [v["specificity"] for k in fkeys + ([base_key] if base_key else []) for v in cv[k].values()])
            ax.set_xlim(max(0.0, lo - 0.05), 1.02)
            ax.set_ylim(-0.02, 1.0)
            ax.grid(alpha=0.3)
            ax.set_title(f"{model}, {group}: {factor} (mean over {len(concepts)} concept(s); labels = delta)", fontsize=10)
            ax.legend(fontsize=7, loc="upper left")
            fig.tight_layout()
            fig.savefig(docs / f"{model}_{slugify_group(group)}_{factor}.png", dpi=110)
            plt.close(fig)
    (docs / "results.md").write_text("\n".join(lines) + "\n")
    # a flat copy of the points for the repository
    import csv

    cols = ["model", "concept", "method", "factor", "level", "delta", "n_tokens", "n_features", "efficacy_test",
            "efficacy_train", "eff_acc_test", "eff_p_test", "specificity", "simdom_kept", "control_kept", "ppl_kept",
            "harmonic_test", "harmonic_train", "QA_test_acc", "QA_test_p", "control_acc", "skipped"]
    with (docs / "points.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            flat = {**r, **(r.get("derived") or {}), **(r.get("scores") or {})}
            w.writerow([(round(v, 4) if isinstance(v, float) else v) for v in (flat.get(c, "") for c in cols)])
    log.info("report: %s", docs)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all", help="smollm2_135m | gemma3_270m | all")
    ap.add_argument("--concepts", default=None,
                    help="comma-separated source:name (e.g. 'starter:Harry Potter,release:Baseball'); "
                         "default: the study's set for the model")
    ap.add_argument("--quick", action="store_true", help="reduced settings (base, K=400, the combination) and 2 deltas")
    ap.add_argument("--report-only", action="store_true", help="only rebuild tables and plots from the points")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "sentence_transformers", "transformers", "ember"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    require_script_release("the study reads")
    points = Points(OUT / "points.jsonl")
    if not args.report_only:
        cache = ArtifactCache(Path(os.environ.get("EMBER_CACHE", Path.home() / ".cache" / "ember")))
        models = list(CONCEPTS) if args.model == "all" else [args.model]
        for m in models:
            if m not in CONCEPTS:
                raise SystemExit(f"--model {m}: use one of {list(CONCEPTS)} or all")
            cs = CONCEPTS[m]
            if args.concepts:
                cs = [tuple(c.split(":", 1)) for c in args.concepts.split(",")]  # type: ignore[misc]
            t0 = time.perf_counter()
            with torch.no_grad():
                run_model(m, cs, args.quick, points, cache)
            log.info("%s done in %.1fs", m, time.perf_counter() - t0)
    if not args.no_report:
        rows = current_rows(points.rows, data_tags({r["concept"] for r in points.rows if "concept" in r}))
        if not rows:  # a fresh clone has no outputs/study: keep the committed tables rather than blank them
            raise SystemExit(f"no points measured on the current data in {points.path}: nothing to report "
                             f"(run the study first; {DOCS} is left as it is)")
        write_report(rows, DOCS)


def data_tags(labels: set[str]) -> dict[str, str]:
    """Each concept label's data tag as the data stands now (labels whose concept is gone get none)."""
    starter = ConceptStore(STARTER, label="the starter set")
    release = ConceptStore(RELEASE, label="release")
    out = {}
    for label in labels:
        source, name = label.split(":", 1)
        if name in (starter if source == "starter" else release).concept_names:
            out[label] = concept_ref(source, name, starter, release).data_tag()
    return out


if __name__ == "__main__":
    main()
