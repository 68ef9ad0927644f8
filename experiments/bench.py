"""`make bench`: every figure beside its baseline, measured in one run; writes BENCHMARKS.md.

Each benchmark returns rows (name, value, unit, baseline, ratio, note). Times are medians of
repeated runs. Run a subset with ``--only factorization,mc``; ``--quick`` uses fewer repeats.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ember.config import model_preset  # noqa: E402
from ember.data import ConceptStore  # noqa: E402
from ember.features import count_tokens, effective_embeddings, label_tokens  # noqa: E402
from ember.models import load_model  # noqa: E402

RELEASE = ROOT.parent / "shared" / "ember-release"


@dataclass
class Row:
    section: str
    name: str
    value: float
    unit: str
    baseline: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.value == 0:
            return None
        return self.baseline / self.value if self.unit in ("s", "ms", "MiB") else self.value / self.baseline


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
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


def bench_factorization(repeats: int) -> list[Row]:
    from ember.factorize import sparse_factorize

    lm = smollm2()
    A = embedding_matrix(lm, ["Harry Potter"])
    rows = []
    t_ref, ref = median_time(lambda: sparse_factorize(A, 100, stopping="reference"), repeats)
    t_new, new = median_time(lambda: sparse_factorize(A, 100, stopping="plateau"), repeats)
    note = f"|V'|={A.shape[1]}, d={A.shape[0]}, K=100"
    rows.append(Row("factorization", "reference rule (tol 1e-4, patience 500): time", t_ref, "s", note=note +
                    f"; best at iter {ref.best_iter}, stopped at {ref.n_iter}"))
    rows.append(Row("factorization", "project default (plateau, patience 25): time", t_new, "s", baseline=t_ref,
                    note=f"best at iter {new.best_iter}, stopped at {new.n_iter}"))
    rows.append(Row("factorization", "final loss, project default / reference", new.best_loss / ref.best_loss, "x",
                    note=f"reference {ref.best_loss:.6g}, default {new.best_loss:.6g} (goal: within 1%)"))
    for k in (50, 100, 200):
        t, r = median_time(lambda k=k: sparse_factorize(A, k, stopping="plateau"), repeats)
        rows.append(Row("factorization scaling", f"K={k}, |V'|={A.shape[1]}", t, "s",
                        note=f"{r.n_iter} iterations, {1000 * t / r.n_iter:.1f} ms/iteration"))
    for concepts in (["Harry Potter"], ["Harry Potter", "Baseball"],
                     ["Harry Potter", "Baseball", "World War II", "Ancient Rome"]):
        B = embedding_matrix(lm, concepts)
        t, r = median_time(lambda B=B: sparse_factorize(B, 100, stopping="plateau"), repeats)
        rows.append(Row("factorization scaling", f"{len(concepts)} concept(s): |V'|={B.shape[1]}, K=100", t, "s",
                        note=f"{r.n_iter} iterations, {1000 * t / r.n_iter:.1f} ms/iteration"))
    return rows


BENCHES: dict[str, Callable[[int], list[Row]]] = {"factorization": bench_factorization}


# --------------------------------------------------------------------------------------------------


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    vers = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "lm_eval"))
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; {vers}; " \
           f"torch threads {torch.get_num_threads()}"


def write_markdown(rows: list[Row], cmd: str, path: Path, seconds: float) -> str:
    lines = ["# Benchmarks", "", f"Produced by `{cmd}` in {seconds:.0f} s.", "", f"Machine: {machine()}.", "",
             "Times are medians of repeated runs; *ratio* is baseline / value for times (higher = faster) and "
             "value / baseline otherwise. Every baseline was measured in the same run.", ""]
    section = None
    for r in rows:
        if r.section != section:
            section = r.section
            lines += ["", f"## {section}", "", "| figure | value | baseline | ratio | note |", "|---|---|---|---|---|"]
        base = "" if r.baseline is None else f"{r.baseline:.4g} {r.unit}"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"| {r.name} | {r.value:.4g} {r.unit} | {base} | {ratio} | {r.note} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    names = [n for n in (args.only.split(",") if args.only else BENCHES) if n]
    t0 = time.perf_counter()
    rows: list[Row] = []
    for n in names:
        print(f"== {n}", flush=True)
        got = BENCHES[n](args.repeats)
        for r in got:
            print(f"  {r.name}: {r.value:.4g} {r.unit}" + (f" (baseline {r.baseline:.4g}, {r.ratio:.2f}x)" if r.ratio else "")
                  + (f"  [{r.note}]" if r.note else ""), flush=True)
        rows += got
        gc.collect()
    cmd = "make bench" + (f" ARGS='--only {args.only}'" if args.only else "")
    write_markdown(rows, cmd, args.out, time.perf_counter() - t0)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
