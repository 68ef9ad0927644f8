"""Base accuracy of a model on a concept data set, per concept and split, with an options-only control.

Usage:
  python experiments/starter_mc_accuracy.py                       # the shipped starter set, SmolLM2
  python experiments/starter_mc_accuracy.py --data ../shared/ember-release --concepts "Harry Potter"
  python experiments/starter_mc_accuracy.py --part draft.json     # a draft file (list the misses)

Scoring is the framework's log-likelihood multiple choice (``Question: {q}\\nAnswer:``). The
*options-only* column scores the options after ``Answer:`` with no question: what answer
familiarity alone gets right.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ember.config import model_preset
from ember.data import MC_SPLITS, ConceptStore, _mc_items
from ember.evals.mc import score_loglik
from ember.models import load_model
from ember.paths import STARTER_DIR


def score_part(lm, path: Path) -> None:
    raw = json.loads(path.read_text())
    splits = {"control": raw} if isinstance(raw, list) else {k: raw[k] for k in MC_SPLITS if k in raw}
    for split, items in splits.items():
        qs = _mc_items(items, path, split, raw.get("concept", "control") if isinstance(raw, dict) else "control", split, 42)
        res = score_loglik(lm.model, lm.tokenizer, qs)
        print(f"{split}: acc={res.acc:.3f} acc_norm={res.acc_norm:.3f} p_correct={res.p_correct:.3f} n={res.n}")
        for q, it in zip(qs, res.items, strict=True):
            if not it.correct:
                print(f"   MISS: {q.q!r} -> picked {q.options[it.pred]!r}, answer {q.correct_answer!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=STARTER_DIR)
    ap.add_argument("--concepts", nargs="*", default=[])
    ap.add_argument("--model", default="smollm2_135m")
    args = ap.parse_args()
    lm = load_model(model_preset(args.model))
    if args.part:
        score_part(lm, args.part)
        return
    store = ConceptStore(args.data)
    print("| concept | split | n | accuracy | p(correct) | options-only accuracy | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name in store.resolve_names(args.concepts):
        c = store.concept(name)
        for split in MC_SPLITS:
            qs = c.mc[split]
            t = time.perf_counter()
            res = score_loglik(lm.model, lm.tokenizer, qs)
            dt = time.perf_counter() - t
            blind = score_loglik(lm.model, lm.tokenizer, qs, template="Answer:")
            print(f"| {name} | {split} | {res.n} | {res.acc:.3f} | {res.p_correct:.3f} | {blind.acc:.3f} | {dt:.1f} |")
    if store.control_facts:
        qs = store.control_facts
        res = score_loglik(lm.model, lm.tokenizer, qs)
        blind = score_loglik(lm.model, lm.tokenizer, qs, template="Answer:")
        print(f"| (control facts) | - | {res.n} | {res.acc:.3f} | {res.p_correct:.3f} | {blind.acc:.3f} | |")


if __name__ == "__main__":
    main()
