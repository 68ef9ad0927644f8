"""Score a starter-data draft (or a data dir) with SmolLM2 log-likelihood MC; list the misses.

Usage: python experiments/starter_mc_accuracy.py PART.json [--model smollm2_135m]
A PART file holds {"concept", "QA_train", "QA_test", "SimdomQA_train", "SimdomQA_test", ...} or is a
list of question items (control facts).
"""

from __future__ import annotations

import argparse
import json
import time

from ember.config import model_preset
from ember.data import _mc_items
from ember.evals.mc import score_loglik
from ember.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part")
    ap.add_argument("--model", default="smollm2_135m")
    args = ap.parse_args()
    from pathlib import Path

    path = Path(args.part)
    raw = json.loads(path.read_text())
    lm = load_model(model_preset(args.model))
    splits = {"control": raw} if isinstance(raw, list) else {
        k: raw[k] for k in ("QA_train", "QA_test", "SimdomQA_train", "SimdomQA_test") if k in raw}
    for split, items in splits.items():
        qs = _mc_items(items, path, split, raw.get("concept", "control") if isinstance(raw, dict) else "control", split, 42)
        t = time.perf_counter()
        res = score_loglik(lm.model, lm.tokenizer, qs)
        print(f"{split}: acc={res.acc:.3f} acc_norm={res.acc_norm:.3f} p_correct={res.p_correct:.3f} "
              f"n={res.n} ({time.perf_counter() - t:.1f}s)")
        for q, it in zip(qs, res.items, strict=True):
            if not it.correct:
                print(f"   MISS: {q.q!r} -> picked {q.options[it.pred]!r}, answer {q.correct_answer!r} "
                      f"(p={it.p_correct:.2f})")


if __name__ == "__main__":
    main()
