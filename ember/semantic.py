"""Sentence-embedding similarity of a concept to feature token lists (the `semantic` selector).

Uses the same packaged all-MiniLM-L6-v2 encoder as the coherence evaluation
(:func:`ember.evals.coherence.sentence_encoder`, loaded once per process).
"""

from __future__ import annotations

from collections.abc import Sequence


def similarity_to_concept(concept_terms: Sequence[str], texts: Sequence[str]) -> list[float]:
    """Max cosine similarity of each text to any of the concept's terms."""
    from ember.evals.coherence import sentence_encoder

    enc = sentence_encoder()
    a = enc.encode(list(concept_terms), normalize_embeddings=True, convert_to_tensor=True)
    b = enc.encode(list(texts), normalize_embeddings=True, convert_to_tensor=True)
    return (b @ a.T).max(dim=1).values.tolist()
