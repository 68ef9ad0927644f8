"""Digests of the source of the code that computes each cached or resumed result.

A stage record, a cache entry or a resumable grid holds the digest of the code that made it, so that a
fix to the factorization, the feature selection, the edit or a base method recomputes what it affects
instead of reusing what the old code produced. The scoring code has its own digest
(``ember.evals.suite.scoring_code_version``), as does each attack (``ember.attacks.attack_code_version``).
Any edit of a listed module, a comment included, counts as a change: a needless recomputation is cheap
next to a silently stale result.
"""

from __future__ import annotations

import functools
import importlib
import sys

from ember.cache import source_digest


@functools.cache
def factorization_code_version() -> str:
    """The sparse factorization of the embedding rows (the ``embedding_factors`` cache entries)."""
    from ember import factorize

    return source_digest([factorize])


@functools.cache
def erasure_code_version() -> str:
    """EMBER end to end: the factorization, the choice of features and tokens, the edit and the delta grid."""
    from ember import delta, edit, factorize, features, llm_selector

    return source_digest([factorize, features, llm_selector, edit, delta])


def job_erasure_code(ember_enabled: bool) -> str:
    """EMBER's digest for a job: an EMBER fix leaves ``ember=off`` jobs (and their method grids) be."""
    return erasure_code_version() if ember_enabled else "ember off"


@functools.cache
def method_code_version(name: str) -> str:
    """A base method (``method.name``): its module and those it declares (``Method.code_modules``: SNMF's
    Semi-NMF fit), the shared training loop and fp32 master weights, and the grid protocol that picks
    its parameters."""
    from ember import master_weights, search
    from ember.methods import METHODS, base, get_method, training

    cls = METHODS[name] if name in METHODS else type(get_method(name))  # get_method names the bad method.name
    own = [sys.modules[cls.__module__], *(importlib.import_module(m) for m in cls.code_modules)]
    return source_digest(list(dict.fromkeys([*own, base, training, master_weights, search])))
