"""`make bench`: every figure beside its baseline, measured in one run; writes BENCHMARKS.md.

Each benchmark returns rows (name, value, unit, baseline, ratio, note, runs). A value is the median of
``runs`` timed runs (``--repeats``, 3 by default, where a figure is cheap enough; 1 where it is not).
Run a subset with ``--only factorization,mc``; ``--repeats 1`` for a quicker, noisier pass.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ember.config import model_preset  # noqa: E402
from ember.data import ConceptStore, background_sentences  # noqa: E402
from ember.features import count_tokens, effective_embeddings, label_tokens  # noqa: E402
from ember.models import load_model  # noqa: E402
from ember.paths import SCRIPT_RELEASE_DIR, STARTER_DIR, require_script_release  # noqa: E402

#: the paper's concept data, read in place (never copied); EMBER_RELEASE_DIR points elsewhere
RELEASE = SCRIPT_RELEASE_DIR


@dataclass
class Row:
    section: str
    name: str
    value: float
    unit: str
    baseline: float | None = None
    note: str = ""
    runs: int = 1  # the value is the median of this many timed runs

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.value == 0:
            return None
        return self.baseline / self.value if self.unit in ("s", "ms", "MiB") else self.value / self.baseline


@dataclass(frozen=True)
class BenchOptions:
    """What the command line passes to every benchmark."""

    repeats: int = 3
    stand_in_tokenizers: Path | None = None  # saved tokenizers for the paper-shaped models (device_bundle.py)


def median_time(fn: Callable[..., object], repeats: int,
                setup: Callable[[], object] | None = None) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` calls, or of ``fn(setup())`` with ``setup`` run
    outside the timing (a fresh model copy for work that changes its model) and released after each."""
    times, out = [], None
    for _ in range(repeats):
        arg = setup() if setup is not None else None
        t = time.perf_counter()
        out = fn(arg) if setup is not None else fn()
        times.append(time.perf_counter() - t)
        if setup is not None:
            del arg
            gc.collect()
    return statistics.median(times), out


_LM: dict[str, object] = {}


def smollm2():
    if "s" not in _LM:
        _LM["s"] = load_model(model_preset("smollm2_135m"))
    return _LM["s"]


def embedding_matrix(lm, concepts: list[str]) -> torch.Tensor:
    store = ConceptStore(RELEASE)
    sents = [s for c in concepts for s in store.concept(c).sentences]
    con, bg = count_tokens(lm.tokenizer, sents), count_tokens(lm.tokenizer, store.neutral)
    vprime, _, _ = label_tokens(con, bg, set(lm.tokenizer.all_special_ids))
    return effective_embeddings(lm.model, torch.tensor(vprime), lm.facts.embed_scale).T.contiguous()


# --------------------------------------------------------------------------------------------------


def bench_factorization(opts: BenchOptions) -> list[Row]:
    from ember.factorize import sparse_factorize

    lm = smollm2()
    A = embedding_matrix(lm, ["Harry Potter"])
    rows = []
    n = opts.repeats
    sparse_factorize(A, 10, max_iter=5)  # warm-up (allocator, BLAS set-up): outside every timed run
    # the reference as reference-spec 1.2 has it: its stopping rule, in float32
    t_ref32, ref32 = median_time(lambda: sparse_factorize(A, 100, stopping="reference", dtype=torch.float32), n)
    t_ref, ref = median_time(lambda: sparse_factorize(A, 100, stopping="reference"), n)
    t_new, new = median_time(lambda: sparse_factorize(A, 100, stopping="plateau"), n)
    note = f"|V'|={A.shape[1]}, d={A.shape[0]}, K=100"
    rows.append(Row("factorization", "reference (its rule: tol 1e-4, patience 500; float32): time", t_ref32, "s",
                    note=note + f"; best at iter {ref32.best_iter}, stopped at {ref32.n_iter}", runs=n))
    rows.append(Row("factorization", "project default (plateau, patience 25; float64): time", t_new, "s",
                    baseline=t_ref32, note=f"best at iter {new.best_iter}, stopped at {new.n_iter}; the "
                    "project's precision costs about 2x (below), so this ratio is the stopping rule's gain net of it",
                    runs=n))
    rows.append(Row("factorization", "reference rule in float64 (the project's precision): time", t_ref, "s",
                    note=f"best at iter {ref.best_iter}, stopped at {ref.n_iter}", runs=n))
    rows.append(Row("factorization", "project default vs the reference rule, both float64: time", t_new, "s",
                    baseline=t_ref, note="the stopping rule's gain alone", runs=n))
    rows.append(Row("factorization", "final loss, project default / reference rule (both float64)",
                    round(new.best_loss / ref.best_loss, 6), "x",
                    note=f"reference {ref.best_loss:.8g}, default {new.best_loss:.8g}, ratio "
                         f"{new.best_loss / ref.best_loss:.6f} (goal: within 1%); float32 reference {ref32.best_loss:.8g}"))
    # the precision choice (docs/design.md "Precision"): what float64 costs over float32, same rule
    t32, r32 = median_time(lambda: sparse_factorize(A, 100, stopping="plateau", dtype=torch.float32), opts.repeats)
    rows.append(Row("factorization", "project default in float64 (vs float32, the baseline): time", t_new, "s",
                    baseline=t32, note=f"float32 {r32.n_iter} iterations, loss {r32.best_loss:.6g}; "
                    f"float64 {new.n_iter} iterations, loss {new.best_loss:.6g}", runs=n))
    for k in (50, 100, 200):
        t, r = median_time(lambda k=k: sparse_factorize(A, k, stopping="plateau"), opts.repeats)
        rows.append(Row("factorization scaling", f"K={k}, |V'|={A.shape[1]}", t, "s",
                        note=f"{r.n_iter} iterations, {1000 * t / r.n_iter:.1f} ms/iteration", runs=n))
    for concepts in (["Harry Potter"], ["Harry Potter", "Baseball"],
                     ["Harry Potter", "Baseball", "World War II", "Ancient Rome"]):
        B = embedding_matrix(lm, concepts)
        t, r = median_time(lambda B=B: sparse_factorize(B, 100, stopping="plateau"), opts.repeats)
        rows.append(Row("factorization scaling", f"{len(concepts)} concept(s): |V'|={B.shape[1]}, K=100", t, "s",
                        note=f"{r.n_iter} iterations, {1000 * t / r.n_iter:.1f} ms/iteration", runs=n))
    return rows


def bench_mc(opts: BenchOptions) -> list[Row]:
    from torch.profiler import ProfilerActivity, profile

    from ember.evals.mc import score_letter, score_loglik

    lm = smollm2()
    qs = ConceptStore(RELEASE).concept("Harry Potter").mc["QA_test"]
    sec = "multiple choice (SmolLM2, 50 release Harry Potter questions)"
    score_loglik(lm.model, lm.tokenizer, qs[:2])  # warm-up: the first forward pass is outside every timed run
    t_letter, r_letter = median_time(lambda: score_letter(lm.model, lm.tokenizer, qs, use_chat=True, batch_size=1), 1)
    t_plain, r_plain = median_time(lambda: score_loglik(lm.model, lm.tokenizer, qs, share_prefix=False), opts.repeats)
    t_fast, r_fast = median_time(lambda: score_loglik(lm.model, lm.tokenizer, qs), opts.repeats)
    n = len(qs)
    rows = [
        Row(sec, "letter generation, one at a time (the reference's way)",
            n / t_letter, "q/s", note=f"acc {r_letter.acc:.2f}, invalid {r_letter.invalid:.2f}; {t_letter:.1f} s"),
        Row(sec, "log-likelihood, one sequence per option",
            n / t_plain, "q/s", baseline=n / t_letter, note=f"acc {r_plain.acc:.2f}; {t_plain:.1f} s", runs=opts.repeats),
        Row(sec, "log-likelihood, shared prompt (default)",
            n / t_fast, "q/s", baseline=n / t_letter, note=f"acc {r_fast.acc:.2f}; {t_fast:.1f} s (goal: 10x)",
            runs=opts.repeats),
    ]
    # the reference loads its models with use_cache=False (reference-spec 8.1), which reaches generate():
    # every new letter token re-reads the whole prompt. The cached row above is the stronger baseline.
    lm.model.generation_config.use_cache = False
    try:
        t_nocache, r_nocache = median_time(
            lambda: score_letter(lm.model, lm.tokenizer, qs, use_chat=True, batch_size=1), 1)
    finally:
        lm.model.generation_config.use_cache = True
    rows += [
        Row(sec, "letter generation, one at a time, no KV cache (the reference's use_cache=False)",
            n / t_nocache, "q/s", note=f"acc {r_nocache.acc:.2f}; {t_nocache:.1f} s"),
        Row(sec, "log-likelihood, shared prompt (default), vs the no-cache letter generation",
            n / t_fast, "q/s", baseline=n / t_nocache, note="same default figure as above, other baseline",
            runs=opts.repeats),
    ]
    # the profile behind the notes: where the default path spends its time
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        score_loglik(lm.model, lm.tokenizer, qs)
    stats = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(stats.values()) or 1.0
    attention = sum(v for k, v in stats.items() if "scaled_dot_product" in k)
    rows.append(Row(sec, "profile of the default path: share of CPU time in matrix products (aten::mm)",
                    100 * stats.get("aten::mm", 0.0) / total, "%",
                    note=f"attention {100 * attention / total:.0f}%; torch.profiler, self CPU time"))
    # lower precision speeds both paths alike, so it is reported beside its own bf16 baseline
    half = copy.deepcopy(lm.model).to(torch.bfloat16)
    t_l16, r_l16 = median_time(lambda: score_letter(half, lm.tokenizer, qs, use_chat=True, batch_size=1), 1)
    t_f16, r_f16 = median_time(lambda: score_loglik(half, lm.tokenizer, qs), opts.repeats)
    rows += [
        Row(sec, "bfloat16 weights: letter generation", n / t_l16, "q/s", baseline=n / t_letter,
            note=f"vs float32 letter generation; acc {r_l16.acc:.2f}, invalid {r_l16.invalid:.2f}; {t_l16:.1f} s"),
        Row(sec, "bfloat16 weights: shared prompt", n / t_f16, "q/s", baseline=n / t_l16,
            note=f"vs bfloat16 letter generation; acc {r_f16.acc:.2f}; {t_f16:.1f} s (float32 shared prompt {t_fast:.1f} s)",
            runs=opts.repeats),
    ]
    return rows


def bench_delta(opts: BenchOptions) -> list[Row]:
    """One EMBER delta-grid cell (restore + edit + evaluate on the train split) and a full grid."""
    from types import SimpleNamespace

    from ember.cache import ArtifactCache
    from ember.edit import EditPlan, EmbeddingEditor
    from ember.evals.suite import evaluate, relative
    from ember.features import SelectionContext, compute_embedding_features, select_features
    from tests.conftest import compose

    cfg = compose([])
    lm = smollm2()
    store = ConceptStore(STARTER_DIR)
    hp = store.concept("Harry Potter")
    import tempfile

    feats = compute_embedding_features(lm.model, lm.tokenizer, lm.facts, hp.name, hp.sentences, store.neutral,
                                       cfg.ember.factorization, ArtifactCache(tempfile.mkdtemp()))
    rep = select_features(feats, cfg.ember.selector, SelectionContext(lm.tokenizer, hp.name, hp.key_terms))
    plan = EditPlan.from_features(feats, [int(k) for k in rep.loc[rep["selected"], "feature"]])
    model = copy.deepcopy(lm.model)
    ed = EmbeddingEditor(model, lm.facts.embed_scale)
    base = evaluate(lm.model, lm.tokenizer, hp, store, cfg.eval, "train")
    parts_all = ["qa", "simdom", "control", "ppl", "coherence"]

    def cell(delta: float, parts: list[str]) -> dict:
        ed.restore()
        ed.apply(plan, delta)
        s = evaluate(model, lm.tokenizer, hp, store, cfg.eval, "train", judge_model=lm.model, parts=parts)
        return relative(s, base)

    t_cell, _ = median_time(lambda: cell(5.0, parts_all), opts.repeats)
    t_cheap, _ = median_time(lambda: cell(5.0, ["qa", "simdom", "control", "ppl"]), opts.repeats)
    t_edit, _ = median_time(lambda: (ed.restore(), ed.apply(plan, 5.0)), max(opts.repeats, 5))
    grid = list(cfg.ember.delta_grid)
    t0 = time.perf_counter()
    for d in grid:
        cell(d, parts_all)
    t_naive = time.perf_counter() - t0
    _ = SimpleNamespace
    sec = "EMBER delta grid (SmolLM2, starter Harry Potter, train split)"
    return [
        Row(sec, "restore + edit only", t_edit * 1000, "ms", note=f"{len(plan)} tokens, {len(plan.features)} features",
            runs=max(opts.repeats, 5)),
        Row(sec, "one cell with coherence (restore + edit + evaluate)", t_cell, "s", runs=opts.repeats),
        Row(sec, "one cell without coherence (the gate check first)", t_cheap, "s", baseline=t_cell, runs=opts.repeats),
        Row(sec, f"full grid of {len(grid)} deltas, every part every cell", t_naive, "s",
            note="the pipeline evaluates coherence only for deltas that pass the retention gate, and caches the choice"),
    ]


TRAIN_STEPS = 3


def bare_ga_loop(model, tok, method, texts: list[str], seed: int, n_layers: int) -> None:
    """GA's steps in a bare PyTorch loop: the method's batches and trained tensors, transformers' own
    ``labels=`` loss, AdamW; no loss guard, master weights, progress bar or report."""
    from ember.methods import MethodContext
    from ember.methods.training import trainable

    ctx = MethodContext(model=model, tokenizer=tok, facts=None, forget_texts=texts, retain_texts=[], concept="")
    batches = method.batches(ctx, texts, seed, "forget")
    named = method.trainable_params(model, n_layers)
    with trainable(named):
        opt = torch.optim.AdamW([p for _, p in named], lr=method.params["lr"], weight_decay=0.0)
        for i in range(method.params["steps"]):
            b = batches[i % len(batches)]
            loss = -model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], method.params["max_grad_norm"])
            opt.step()


def reference_rmu(model, tok, method, forget: list[str], retain: list[str], seed: int, facts) -> None:
    """RMU as the reference runs it (reference-spec 4.2, WMDP's ``run_rmu``): a second whole model as the
    frozen one (the reference reloads it from disk for every cell; a copy in memory is cheaper), every
    forward pass through all layers with a hook reading the hooked layer, MSE over every position."""
    from ember.methods.rmu import control_vector, masked_mse
    from ember.methods.training import layer_output, make_batches, named_in_layers, seeded_shuffle, trainable

    p = method.params
    frozen = copy.deepcopy(model)
    layer, ids = method.resolve_layers(facts.n_layers)
    named = named_in_layers(model, ids, p["param_names"], "param_names")
    fb = make_batches(tok, seeded_shuffle(forget, seed), p["batch_size"], p["max_length"], torch.device("cpu"))
    rb = make_batches(tok, seeded_shuffle(retain, seed + 1), p["batch_size"], p["max_length"], torch.device("cpu"))
    target = p["steering_coeff"] * control_vector(facts.d_model, seed)
    with trainable(named):
        opt = torch.optim.AdamW([t for _, t in named], lr=p["lr"], eps=p["adam_eps"], weight_decay=0.0)
        for i in range(p["steps"]):
            f, r = fb[i % len(fb)], rb[i % len(rb)]
            h_f = layer_output(model, layer, f, stop=False)
            h_r = layer_output(model, layer, r, stop=False)
            with torch.no_grad():
                h_r0 = layer_output(frozen, layer, r, stop=False)
            loss = masked_mse(h_f, target.expand_as(h_f), None) + p["alpha"] * masked_mse(h_r, h_r0, None)
            opt.zero_grad()
            loss.backward()
            opt.step()


def reference_relearn(model, tok, concept, n_paragraphs: int, max_length: int = 256) -> None:
    """One relearning epoch as the reference runs it (reference-spec 6): each paragraph padded on the left
    to ``max_length`` with EOS, labels -100 at padding, every parameter trained, AdamW (lr 1e-5, weight
    decay 0.01), batch 1, no clipping; concept and similar-domain accuracy by letter generation, one
    question at a time, before and after (the project's relearning evaluates at the same two points)."""
    from ember.attacks.relearn import relearn_paragraphs
    from ember.evals.mc import score_letter

    def evaluate() -> None:
        for split in ("QA_test", "SimdomQA_test"):
            score_letter(model, tok, concept.mc[split], use_chat=True, batch_size=1)

    evaluate()
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    pad = tok.eos_token_id
    for text in relearn_paragraphs(concept, n_paragraphs):
        ids = tok(text, truncation=True, max_length=max_length)["input_ids"]
        n_pad = max_length - len(ids)
        input_ids = torch.tensor([[pad] * n_pad + ids])
        mask = torch.tensor([[0] * n_pad + [1] * len(ids)])
        loss = model(input_ids=input_ids, attention_mask=mask,
                     labels=input_ids.masked_fill(input_ids == pad, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.requires_grad_(False)
    model.eval()
    evaluate()


def timed_on_copies(lm, fn: Callable[[torch.nn.Module], object], repeats: int) -> tuple[float, object]:
    """Median time of ``fn`` on fresh copies of the model (each copy made outside the timing)."""
    return median_time(fn, repeats, setup=lambda: copy.deepcopy(lm.model))


def bench_training(opts: BenchOptions) -> list[Row]:
    from ember.attacks.base import AttackContext
    from ember.attacks.relearn import run_relearn
    from ember.evals.mc import score_letter
    from ember.methods import MethodContext, get_method

    lm = smollm2()
    store = ConceptStore(STARTER_DIR)
    hp = store.concept("Harry Potter")
    sec = "training (SmolLM2)"
    params = {"steps": TRAIN_STEPS}
    rows = []

    def project(name: str) -> Callable[[torch.nn.Module], object]:
        return lambda model: get_method(name, params).apply(MethodContext(
            model=model, tokenizer=lm.tokenizer, facts=lm.facts, forget_texts=hp.sentences,
            retain_texts=store.neutral, concept=hp.name))

    ga = get_method("ga", params)
    rmu = get_method("rmu", params)
    pairs = [
        ("ga", "a bare PyTorch loop (same batches and tensors, transformers' labels loss)",
         lambda model: bare_ga_loop(model, lm.tokenizer, ga, hp.sentences, 42, lm.facts.n_layers)),
        ("rmu", "the reference's RMU (a second whole model, full forward passes)",
         lambda model: reference_rmu(model, lm.tokenizer, rmu, hp.sentences, store.neutral, 42, lm.facts)),
    ]
    for name, what, baseline in pairs:
        project(name)(copy.deepcopy(lm.model))  # warm-up, untimed
        t_base, _ = timed_on_copies(lm, baseline, opts.repeats)
        t_proj, rep = timed_on_copies(lm, project(name), opts.repeats)
        rows.append(Row(sec, f"{name}: {what}: (set-up + {TRAIN_STEPS} steps) / {TRAIN_STEPS}", t_base / TRAIN_STEPS,
                        "s", runs=opts.repeats))
        rows.append(Row(sec, f"{name}: the project's method (default): (set-up + {rep.steps} steps) / {rep.steps}",
                        t_proj / TRAIN_STEPS, "s", baseline=t_base / TRAIN_STEPS, runs=opts.repeats,
                        note=f"conf/method/{name}.yaml with steps={TRAIN_STEPS}"))

    n_par = 10
    rcfg = {"name": "full", "epochs": 1, "max_paragraphs": n_par}
    ctx = AttackContext(template="Question: {q}\nAnswer:", batch_size=16, max_questions=None)
    t_ref, _ = timed_on_copies(lm, lambda model: reference_relearn(model, lm.tokenizer, hp, n_par), 1)
    t_proj, res = timed_on_copies(lm, lambda model: run_relearn(model, lm.tokenizer, hp, rcfg, ctx), 1)
    letter = AttackContext(mc_scorer=lambda m, t, qs: score_letter(m, t, qs, use_chat=True, batch_size=1))
    t_mid, _ = timed_on_copies(lm, lambda model: run_relearn(model, lm.tokenizer, hp, rcfg, letter), 1)
    what = f"one epoch on {n_par} paragraphs, concept and similar-domain accuracy before and after"
    rows += [
        Row(sec, f"relearning, the reference's way: {what}", t_ref, "s",
            note="padded to 256 tokens, every parameter, letter generation one question at a time"),
        Row(sec, "relearning, the project's training with letter-generation scoring", t_mid, "s", baseline=t_ref,
            note="unpadded paragraphs, gradient clipping; the same scorer as the baseline"),
        Row(sec, "relearning, the project's (default)", t_proj, "s", baseline=t_ref,
            note=f"unpadded, log-likelihood scoring; {res.extra['n_tokens']} tokens in {n_par} paragraphs; "
                 f"accuracy {res.extra['accuracy_before']:.3f} -> {res.accuracy:.3f}"),
    ]
    return rows


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_model_load(opts: BenchOptions) -> list[Row]:
    """Loading a packaged model: straight from its GGUF (de-quantising every tensor) against the float copy
    the project caches on first use (``<cache>/models``, built here before the timing if absent)."""
    from ember.models import load_gguf_direct

    sec = "model load (packaged GGUF vs the float cache)"
    rows = []
    for preset in ("smollm2_135m", "gemma3_270m"):
        cfg = model_preset(preset)
        load_model(cfg)  # builds the cache entry if this machine has none
        t_gguf, _ = median_time(lambda cfg=cfg: load_gguf_direct(cfg), opts.repeats)
        t_cache, lm = median_time(lambda cfg=cfg: load_model(cfg), opts.repeats)
        rows += [Row(sec, f"{preset}: from the GGUF", t_gguf, "s", runs=opts.repeats),
                 Row(sec, f"{preset}: from the float cache (default)", t_cache, "s", baseline=t_gguf,
                     runs=opts.repeats, note="cache hit" if lm.facts.from_cache else "cache MISSED")]
        del lm
        gc.collect()
    return rows


def bench_gemma_memory(opts: BenchOptions) -> list[Row]:
    """Peak memory of Gemma-3-270M MC evaluation on 50 questions, in a fresh process per path."""
    code = """
import resource, sys, torch
from ember.config import model_preset
from ember.models import load_model
from ember.data import ConceptStore
from ember.evals.mc import score_loglik
import threading, time, gc
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024
lm = load_model(model_preset('gemma3_270m'))
qs = ConceptStore('{release}').concept('Harry Potter').mc['QA_test']
gc.collect()
before = rss()
peak = [before]
stop = []
def sample():
    while not stop:
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
th = threading.Thread(target=sample, daemon=True)
th.start()
if '{mode}' == 'full':
    with torch.no_grad():
        for q in qs:
            for o in q.options:
                ids = lm.tokenizer('Question: ' + q.q + '\\nAnswer: ' + o, return_tensors='pt')['input_ids']
                lm.model(ids).logits
elif '{mode}' == 'plain':
    score_loglik(lm.model, lm.tokenizer, qs, share_prefix=False)
else:
    score_loglik(lm.model, lm.tokenizer, qs)
stop.append(1)
th.join()
print(before, peak[0])
"""
    rows = []
    res = {}
    for mode in ("batched_full_logits", "plain", "shared"):
        src = code.replace("{release}", str(RELEASE)).replace("{mode}", mode)
        if mode == "batched_full_logits":
            src = src.replace("'batched_full_logits' == 'full'", "True")
            src = src.replace("""    with torch.no_grad():
        for q in qs:
            for o in q.options:
                ids = lm.tokenizer('Question: ' + q.q + '\\nAnswer: ' + o, return_tensors='pt')['input_ids']
                lm.model(ids).logits""", """    lm.tokenizer.padding_side = 'right'
    texts = ['Question: ' + q.q + '\\nAnswer: ' + o for q in qs for o in q.options][:64]
    with torch.no_grad():
        enc = lm.tokenizer(texts, return_tensors='pt', padding=True)
        lm.model(**enc).logits""")
        out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        before, after = map(float, out.stdout.split()[-2:])
        res[mode] = (before, after)
    full = res["batched_full_logits"][1] - res["batched_full_logits"][0]
    rows.append(Row("Gemma-3-270M evaluation memory (50 questions)", "full-vocabulary logits, one batch of 64 options",
                    full, "MiB", note=f"peak RSS growth (sampled) over the loaded model ({res['batched_full_logits'][0]:.0f} MiB)"))
    for mode, label in (("plain", "log-likelihood, one sequence per option"), ("shared", "log-likelihood, shared prompt (default)")):
        rows.append(Row("Gemma-3-270M evaluation memory (50 questions)", label, res[mode][1] - res[mode][0], "MiB",
                        baseline=full, note=f"peak RSS growth (sampled) over the loaded model ({res[mode][0]:.0f} MiB)"))
    return rows


def bench_attacks(opts: BenchOptions) -> list[Row]:
    """The main job's prompting attacks with the shared prefix encoded once vs re-encoded per question."""
    from omegaconf import OmegaConf

    from ember.attacks import ATTACKS, AttackContext
    from ember.evals import mc
    from tests.conftest import compose

    cfg = compose([])
    lm = smollm2()
    hp = ConceptStore(STARTER_DIR).concept("Harry Potter")
    ctx = AttackContext(template=cfg.eval.prompt_template, batch_size=cfg.eval.batch_size)
    sec = "prompting attacks (SmolLM2, starter Harry Potter, 40 QA_test questions, `attacks=prompting`)"
    rows = []
    for name in ("jailbreak", "incontext"):
        settings = OmegaConf.to_container(cfg.attacks[name], resolve=True)

        def run(name: str = name, settings: dict = settings):
            return ATTACKS[name](lm.model, lm.tokenizer, hp, settings, ctx)

        with mock.patch.object(mc, "MIN_SHARED_PREFIX", 10**9):  # the baseline: every question re-encodes it
            t_off, r_off = median_time(run, opts.repeats)
        t_on, r_on = median_time(run, opts.repeats)
        rows.append(Row(sec, f"{name}: prefix re-encoded for every question", t_off, "s",
                        note=f"accuracy {r_off.accuracy:.3f}", runs=opts.repeats))
        rows.append(Row(sec, f"{name}: shared prefix encoded once (default)", t_on, "s", baseline=t_off,
                        note=f"accuracy {r_on.accuracy:.3f}; per-variant accuracies "
                        + ("identical" if r_on.per_variant == r_off.per_variant else f"{r_on.per_variant} vs {r_off.per_variant}"),
                        runs=opts.repeats))
    return rows


def stage_seconds(job_dir: Path) -> str:
    """The seconds each pipeline stage took, read from the stage files of a finished job directory."""
    import json

    from ember.stages import STAGES

    parts = []
    for stage in STAGES:
        secs = [json.loads(f.read_text()).get("seconds", 0.0) for f in job_dir.glob(f"*/{stage}.json")]
        if secs:
            parts.append(f"{stage} {sum(secs):.0f} s")
    return ", ".join(parts)


def job_headline(job: Path) -> str:
    """The main job's headline metrics from its results.json (what `make run` printed)."""
    import json

    res = json.loads((job / "results.json").read_text())["results"]
    out = []
    for concept, r in res.items():
        keys = ("efficacy", "specificity", "coherence", "harmonic")
        out.append(f"{concept}: " + ", ".join(f"{k} {r.get('evaluate/' + k, float('nan')):.3f}" for k in keys)
                   + f", relearn acc {r.get('relearn/relearn_acc', float('nan')):.3f}")
    return "; ".join(out)


def bench_main_job(opts: BenchOptions) -> list[Row]:
    """`make run` end to end: cold (empty caches except the converted model) and warm (everything cached)."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    cache = tmp / "cache"
    cache.mkdir()
    real_models = Path(os.environ.get("EMBER_CACHE", Path.home() / ".cache" / "ember")) / "models"
    if real_models.exists():
        (cache / "models").symlink_to(real_models)
    env = {**os.environ, "EMBER_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    rows = []
    times = {}
    for label, extra in (("cold (empty caches but the converted model)", []),
                         ("warm, second run (every stage complete)", [])):
        cmd = [sys.executable, "-m", "ember", f"hydra.run.dir={tmp}/job", *extra]
        t0 = time.perf_counter()
        timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
        out = subprocess.run([*timer, *cmd], capture_output=True, text=True, cwd=ROOT, env=env)
        t = time.perf_counter() - t0
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        rss = next((int(line.split()[-1]) / 1024 for line in out.stderr.splitlines() if "Maximum resident" in line), 0.0)
        times[label] = t
        first = next(iter(times.values()))
        note = f"peak RSS {rss:.0f} MiB"
        if len(times) == 1:
            note += "; stages: " + stage_seconds(tmp / "job") + "; results: " + job_headline(tmp / "job")
        rows.append(Row("main job (`make run`)", label, t, "s", baseline=first if len(times) > 1 else None, note=note))
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


#: the random-weight models of the paper's shapes (conf/model/), and the one whose evaluation throughput is measured
PAPER_SHAPE_PRESETS = ("gemma2_2b_shape", "llama31_8b_shape")
THROUGHPUT_PRESET = "gemma2_2b_shape"

def _current_rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench_paper_scale(opts: BenchOptions) -> list[Row]:
    """Paper-size costs on random-weight models of the paper's exact shapes (ember/model_shapes.py).

    Factorization (K = 100 and 200, and the reference rule at K = 100 as the baseline) and the edit at
    d_model 2304 and 4096 on |V'| of the release Harry Potter concept (against the neutral sentences,
    as the reference; and once against the project's wider default background), and the evaluation throughput
    of the 2B shape. On a GPU every figure runs there; on a CPU the same code runs, with fewer
    questions. Random embeddings have no concept structure, so iteration counts are not those of
    real weights; the cost per iteration is."""
    rows: list[Row] = []
    for preset in PAPER_SHAPE_PRESETS:
        got = _paper_shape_rows(preset, preset == THROUGHPUT_PRESET, opts)
        print_rows(got)  # now: a crash or a time-out in the next shape must not lose this one's figures
        rows += got
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def _paper_shape_rows(preset: str, evaluate: bool, opts: BenchOptions) -> list[Row]:
    from omegaconf import OmegaConf

    from ember.edit import EditPlan, EmbeddingEditor
    from ember.evals.mc import score_letter, score_loglik
    from ember.features import SelectionContext, compute_embedding_features, select_features
    from tests.conftest import compose

    cuda = torch.cuda.is_available()
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    memory_kind = "GPU memory (peak allocated)" if cuda else "process RSS"

    def memory_mib() -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if cuda else _current_rss_mib()

    store = ConceptStore(RELEASE)
    hp = store.concept("Harry Potter")
    cfg = compose([])
    mcfg = model_preset(preset)
    if opts.stand_in_tokenizers is not None:  # a bare machine without the packaged models
        mcfg.tokenizer_from = str(opts.stand_in_tokenizers / mcfg.tokenizer_from)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    lm = load_model(mcfg)
    t_load = time.perf_counter() - t0
    sec = f"paper scale: {preset} ({where})"
    n_params = sum(p.numel() for p in lm.model.parameters())
    rows = [Row(sec, "build the random-weight model", t_load, "s",
                note=f"{n_params / 1e9:.2f}B parameters (input embeddings untied), {lm.facts.dtype}, "
                     f"d={lm.facts.d_model}, vocab {lm.facts.vocab_size}; {memory_kind} {memory_mib():.0f} MiB")]

    def factorize(rank: int, stopping: str = "plateau", background: list[str] = store.neutral,
                  dtype: str = "float64") -> tuple[float, object]:
        fcfg = OmegaConf.merge(cfg.ember.factorization, {"rank": rank, "stopping": stopping, "dtype": dtype})
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        feats = compute_embedding_features(lm.model, lm.tokenizer, lm.facts, hp.name, hp.sentences,
                                           background, fcfg, cache=None)
        return time.perf_counter() - t, feats

    factorize(10)  # warm-up (cuBLAS/cuSOLVER set-up, kernel loading): outside every timed run
    t_ref32, ref32 = factorize(100, "reference", dtype="float32")  # the reference as specified
    rows.append(Row(sec, "factorization K=100, the reference (its rule: tol 1e-4, patience 500; float32)", t_ref32,
                    "s", note=f"|V'|={len(ref32.vprime)}, d={lm.facts.d_model}; {ref32.fit['n_iter']} iterations, "
                              f"best loss {ref32.fit['best_loss']:.6g}; every time here includes counting V' tokens"))
    t_ref, ref = factorize(100, "reference")
    rows.append(Row(sec, "factorization K=100, reference rule (tol 1e-4, patience 500)", t_ref, "s",
                    note=f"in float64, the project's precision; {ref.fit['n_iter']} iterations, "
                         f"best loss {ref.fit['best_loss']:.6g}"))
    feats = ref
    for rank in (100, 200):
        t, feats = factorize(rank)
        fit = feats.fit
        rows.append(Row(sec, f"factorization K={rank}, project default (plateau)", t, "s",
                        baseline=t_ref32 if rank == 100 else None,
                        note=f"{fit['n_iter']} iterations, {1000 * fit['seconds'] / fit['n_iter']:.1f} ms/iteration"
                             + (f"; loss / float64 reference rule {fit['best_loss'] / ref.fit['best_loss']:.6f}, "
                                f"{t_ref / t:.2f}x faster than that rule" if rank == 100 else "")))
    # the project's default background (neutral + every other concept + general text) makes V' 3-4x larger
    wide = background_sentences(cfg.ember.background, store, ConceptStore(STARTER_DIR), hp.name)
    t_wide, wide_feats = factorize(100, background=wide)
    kinds = " + ".join(k.replace("_", " ") for k in cfg.ember.background)
    rows.append(Row(sec, f"factorization K=100, project default background ({kinds})",
                    t_wide, "s", note=f"|V'|={len(wide_feats.vprime)}; {wide_feats.fit['n_iter']} iterations, "
                    f"{1000 * wide_feats.fit['seconds'] / wide_feats.fit['n_iter']:.1f} ms/iteration"))
    del wide_feats
    report = select_features(feats, cfg.ember.selector, SelectionContext(lm.tokenizer, hp.name, hp.key_terms))
    chosen = [int(k) for k in report.loc[report["selected"], "feature"]]
    how = f"{cfg.ember.selector.name} selector"
    if not chosen:  # random embeddings may give the anchor rule nothing: time the edit on the top features
        chosen, how = [int(k) for k in report.nlargest(10, "ratio_abs")["feature"]], "top 10 by concept ratio"
    plan = EditPlan.from_features(feats, chosen)
    editor = EmbeddingEditor(lm.model, lm.facts.embed_scale)

    def edit() -> None:
        editor.restore()
        editor.apply(plan, 10.0)
        if cuda:
            torch.cuda.synchronize()

    t_edit, _ = median_time(edit, max(opts.repeats, 5))
    rows.append(Row(sec, "restore + edit (delta 10)", 1000 * t_edit, "ms",
                    note=f"{len(plan)} tokens from {len(chosen)} features ({how}, K=200)", runs=max(opts.repeats, 5)))
    plan = EditPlan.from_features(feats, list(range(feats.rank)))  # the upper bound: every concept-only token
    t_all, _ = median_time(edit, max(opts.repeats, 5))
    editor.restore()
    rows.append(Row(sec, "restore + edit (delta 10), every feature selected", 1000 * t_all, "ms",
                    note=f"{len(plan)} tokens: every concept-only token of V' with a non-zero code",
                    runs=max(opts.repeats, 5)))
    if evaluate:
        qs = hp.mc["QA_test"][:50 if cuda else 8]
        use_chat = lm.facts.has_chat_template
        score_loglik(lm.model, lm.tokenizer, qs[:2])  # warm-up: the first forward pass is outside every timed run
        if cuda:
            torch.cuda.reset_peak_memory_stats()  # the evaluation's own peak, not the factorizations'
        t_letter, _ = median_time(lambda: score_letter(lm.model, lm.tokenizer, qs, use_chat=use_chat), 1)
        t_fast, _ = median_time(lambda: score_loglik(lm.model, lm.tokenizer, qs), opts.repeats)
        rows += [
            Row(sec, f"MC, letter generation one at a time ({len(qs)} questions)", len(qs) / t_letter, "q/s",
                note=f"{t_letter:.1f} s; the accuracy of random weights means nothing"),
            Row(sec, f"MC, log-likelihood shared prompt ({len(qs)} questions)", len(qs) / t_fast, "q/s",
                baseline=len(qs) / t_letter, note=f"{t_fast:.1f} s; {memory_kind} {memory_mib():.0f} MiB",
                runs=opts.repeats),
        ]
    return rows


BENCHES: dict[str, Callable[[BenchOptions], list[Row]]] = {
    "factorization": bench_factorization,
    "mc": bench_mc,
    "delta": bench_delta,
    "attacks": bench_attacks,
    "training": bench_training,
    "model_load": bench_model_load,
    "gemma_memory": bench_gemma_memory,
    "main_job": bench_main_job,
    "paper_scale": bench_paper_scale,
}

#: run by a plain `make bench` only where a GPU is present; on a CPU ask for it with --only paper_scale
GPU_ONLY = {"paper_scale"}
#: the benchmarks that read the paper's concept data (RELEASE)
NEEDS_RELEASE = {"factorization", "mc", "gemma_memory", "paper_scale"}


# --------------------------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:  # a bare GPU machine has no lm_eval; the paper_scale bench needs none
        return "not installed"


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    vers = ", ".join(f"{p} {_version(p)}" for p in ("torch", "transformers", "lm_eval"))
    load = os.getloadavg()[0]
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM{gpu}; {vers}; " \
           f"torch threads {torch.get_num_threads()}; load average {load:.2f} when it started"


NOTES_MARKER = "<!-- hand-written notes below: kept when make bench rewrites this file -->"


def render_sections(rows: list[Row]) -> dict[str, str]:
    """One Markdown table per section, in the order the rows came."""
    out: dict[str, list[str]] = {}
    for r in rows:
        lines = out.setdefault(r.section, [f"## {r.section}", "", "| figure | value | baseline | ratio | runs | note |",
                                           "|---|---|---|---|---|---|"])
        base = "" if r.baseline is None else f"{r.baseline:.4g} {r.unit}"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        name, note = r.name.replace("|", "\\|"), r.note.replace("|", "\\|")
        lines.append(f"| {name} | {r.value:.4g} {r.unit} | {base} | {ratio} | {r.runs} | {note} |")
    return {k: "\n".join(v) + "\n" for k, v in out.items()}


def split_sections(text: str) -> tuple[str, dict[str, str]]:
    """The part before the first ``## `` heading, and each section's text by its title."""
    head, sections, title = [], {}, None
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            title = line[3:].strip()
            sections[title] = ""
        if title is None:
            head.append(line)
        else:
            sections[title] += line
    return "".join(head), sections


def write_markdown(rows: list[Row], cmd: str, path: Path, seconds: float, partial: bool = False,
                   machine_line: str | None = None) -> str:
    """Write the tables to `path`, keeping whatever follows NOTES_MARKER in the existing file.

    A full run rewrites every table it measured and keeps the stamped sections of earlier partial runs
    that it did not measure (the GPU-only ones on a CPU). A partial run (``--only``) replaces only the sections it measured,
    each marked with its own command, and keeps the others as they were."""
    machine_line = machine_line or machine()
    existing = path.read_text() if path.exists() else ""
    tables, notes = existing.split(NOTES_MARKER, 1) if NOTES_MARKER in existing else (existing, None)
    fresh = render_sections(rows)
    if partial and tables.strip():
        head, sections = split_sections(tables)
        stamp = f"*Measured by `{cmd}` in {seconds:.0f} s on {machine_line}.*\n"
        for title, table in fresh.items():
            first, rest = table.split("\n\n", 1)
            sections[title] = f"{first}\n\n{stamp}\n{rest}"
        body = head.rstrip("\n") + "\n\n\n" + "\n".join(v.rstrip("\n") + "\n" for v in sections.values())
    else:
        # sections this run did not measure (the GPU-only ones on a CPU) keep their own stamped tables
        kept = {t: v for t, v in split_sections(tables)[1].items() if t not in fresh and "*Measured by `" in v}
        fresh.update(kept)
        head = "\n".join(["# Benchmarks", "", f"Produced by `{cmd}` in {seconds:.0f} s.", "", f"Machine: {machine_line}.", "",
                          "A value is the median of *runs* timed runs (1: a single run, where a figure is too costly to "
                          "repeat); *ratio* is baseline / value for times (higher = faster) and value / baseline "
                          "otherwise. Every baseline was measured in the same run.", ""])
        body = head + "\n\n" + "\n".join(fresh.values())
    text = body + ("\n" + NOTES_MARKER + notes if notes is not None else "")
    path.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch's CPU threads, here and in the subprocesses it times (default: every core)")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--stand-in-tokenizers", type=Path, default=None,
                    help="a folder of saved tokenizers (experiments/device_bundle.py) for the paper-shaped models")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: must be at least 1")
    if args.threads < 1:
        ap.error(f"--threads {args.threads}: must be at least 1")
    fix_threads(args.threads)
    started = machine()  # the load average before the benchmarks add to it
    opts = BenchOptions(repeats=args.repeats, stand_in_tokenizers=args.stand_in_tokenizers)
    default = [n for n in BENCHES if n not in GPU_ONLY or torch.cuda.is_available()]
    names = [n for n in (args.only.split(",") if args.only else default) if n]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"--only {','.join(unknown)}: unknown; choose from {','.join(BENCHES)}")
    if NEEDS_RELEASE & set(names):
        require_script_release(f"bench {', '.join(sorted(NEEDS_RELEASE & set(names)))}: these read")
    t0 = time.perf_counter()
    rows: list[Row] = []
    for n in names:
        print(f"== {n}", flush=True)
        got = BENCHES[n](opts)
        if n not in SELF_PRINTING:
            print_rows(got)
        rows += got
        gc.collect()
    write_markdown(rows, command_line(sys.argv[1:]), args.out, time.perf_counter() - t0, partial=bool(args.only),
                   machine_line=started)
    print(f"wrote {args.out}")


def fix_threads(n: int) -> None:
    """Pin torch's CPU thread count, in this process and (through OMP_NUM_THREADS and MKL_NUM_THREADS) in
    the ``python -m ember`` subprocesses the end-to-end figures time, so that two runs compare."""
    torch.set_num_threads(n)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def command_line(argv: list[str]) -> str:
    """The command as run, for the stamp: ``make bench ARGS=...`` (``--out`` left out), and the data
    and import paths where they were not the defaults (the GPU machine's bundle)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            kept.append(a)
    flags = " ".join(kept)
    env = " ".join(f"{k}={os.environ[k]}" for k in ("EMBER_RELEASE_DIR", "PYTHONPATH") if os.environ.get(k))
    if env:
        return f"{env} python3 experiments/bench.py {flags}".strip()
    return "make bench" + (f" ARGS='{flags}'" if flags else "")


def print_rows(rows: list[Row]) -> None:
    for r in rows:
        print(f"  {r.name}: {r.value:.4g} {r.unit}" + (f" (baseline {r.baseline:.4g}, {r.ratio:.2f}x)" if r.ratio else "")
              + (f"  [{r.note}]" if r.note else "") + (f" (median of {r.runs})" if r.runs > 1 else ""), flush=True)


#: benchmarks that print their rows as they measure them (the GPU section, whose time is scarce)
SELF_PRINTING = {"paper_scale"}


if __name__ == "__main__":
    main()
