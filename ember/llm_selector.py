"""The reference's LLM feature selection on any OpenAI-compatible endpoint (off by default).

For each feature that passes the numeric pre-filter (``ratio_abs >= ember.selector.ratio_thresh``,
reference-spec 2.4), the top activating tokens go to the model twice: first for a one-sentence
description of the single most specific concept they share, then for a membership verdict (is
the described feature distinctive and central for the concept?) as JSON
``{"is_member": bool, "confidence": 0..1}``. A feature is selected when it is a member with
confidence >= ``ember.selector.llm_confidence`` (0.85, the reference's). The prompts are this
project's own wording of the reference's rubric. Verdicts are written to the feature report.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pandas as pd

from ember.errors import ConfigError
from ember.evals.llm_judge import ChatClient, JudgeError, parallel_map

DESCRIBE = ("You will see a noisy list of tokens that strongly activate one feature of a language model's "
            "embedding space. Name the single most specific concept the tokens share, in one sentence. "
            "Ignore stray tokens. Example: for [' Monday', ' noon', ' weekly', ' 3pm', ' dawn'] answer "
            "'Times of day and days of the week.'")
MEMBERSHIP = ("A feature of a language model is described below. Decide whether the feature is distinctive and "
              "central for the target concept: it must be specifically about the concept (its people, places, "
              "objects, terms), not a broad category that contains it, not one of several unrelated themes, and "
              "not noise. Reply with JSON only: {\"is_member\": true|false, \"confidence\": number in [0, 1]}.")


def parse_verdict(text: str) -> tuple[bool, float] | None:
    m = re.search(r"\{.*\}", text, flags=re.S)
    if not m:
        return None
    try:
        obj = json.loads(m.group(0))
        return bool(obj["is_member"]), float(obj["confidence"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def judge_features(stats: pd.DataFrame, feats: Any, scfg: Any, ctx: Any) -> pd.Series:
    from ember.features import top_tokens

    if not scfg.llm_endpoint:
        raise ConfigError("ember.selector.llm_endpoint is not set: give an OpenAI-compatible URL "
                          "(e.g. http://localhost:8000/v1) or choose another ember.selector.name")
    client = ChatClient(endpoint=scfg.llm_endpoint, model=scfg.llm_model)
    candidates = [int(k) for k in stats.loc[stats["ratio_abs"] >= scfg.ratio_thresh, "feature"]]

    def ask(k: int) -> tuple[int, str, bool, float]:
        toks = [t for t, _, _ in top_tokens(feats, ctx.tokenizer, k, scfg.llm_top_tokens)]
        try:
            desc = client.chat([{"role": "system", "content": DESCRIBE},
                                {"role": "user", "content": "Tokens: " + json.dumps(toks)}]).strip()
            verdict = parse_verdict(client.chat([
                {"role": "system", "content": MEMBERSHIP},
                {"role": "user", "content": f"Target concept: {ctx.concept}\nFeature description: {desc}"}]))
        except JudgeError as exc:
            return k, f"(no answer: {exc})", False, 0.0
        member, conf = verdict if verdict else (False, 0.0)
        return k, desc, member, conf

    answers = {k: (d, m, c) for k, d, m, c in parallel_map(ask, candidates, threads=4)}
    stats["llm_description"] = [answers.get(int(k), ("", False, 0.0))[0] for k in stats["feature"]]
    stats["llm_is_member"] = [answers.get(int(k), ("", False, 0.0))[1] for k in stats["feature"]]
    stats["llm_confidence"] = [answers.get(int(k), ("", False, 0.0))[2] for k in stats["feature"]]
    return stats["llm_is_member"] & (stats["llm_confidence"] >= scfg.llm_confidence)
