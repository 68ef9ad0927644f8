"""Attacks on an erased model: prompting, GCG, probes and relearning, scored as recovered knowledge.

Every attack is a function registered by name in :data:`ATTACKS` (see :mod:`ember.attacks.base`
for the protocol). Adding an attack = a module in this package with a function decorated by
``@register_attack("name")``; modules here are imported automatically. The config names the
attacks to run (``attacks.enabled``) and holds one sub-dict of settings per attack, e.g.::

    attacks:
      enabled: [jailbreak, incontext, token_evasion]
      incontext: {k: 3, source: [paragraphs, qa_train]}

Relearning is registered too (``relearn``) but configured by the ``relearn=`` group.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ember.attacks.base import (
    AttackContext,
    AttackFn,
    AttackResult,
    recovered_fraction,
    summary_row,
)
from ember.errors import ConfigError

log = logging.getLogger(__name__)

ATTACKS: dict[str, AttackFn] = {}
SettingsCheck = Callable[[Mapping[str, Any] | None, Sequence[Any]], dict[str, Any]]
#: per attack: its settings merged over its defaults and checked against the concepts, with no model
#: (preflight runs these, so a misspelt setting fails before any model loads; each attack runs it too)
SETTINGS_CHECKS: dict[str, SettingsCheck] = {}


def register_attack(name: str, check: SettingsCheck | None = None) -> Callable[[AttackFn], AttackFn]:
    def deco(fn: AttackFn) -> AttackFn:
        if name in ATTACKS and ATTACKS[name] is not fn:
            raise ValueError(f"attack {name!r} registered twice")
        ATTACKS[name] = fn
        if check is not None:
            SETTINGS_CHECKS[name] = check
        return fn

    return deco


def check_attack_settings(attacks_cfg: Mapping[str, Any] | None, concepts: Sequence[Any]) -> None:
    """Every enabled attack's settings, checked without a model: unknown keys and impossible values
    raise a ConfigError naming ``attacks.<name>.<key>``."""
    for name in enabled_attacks(attacks_cfg):
        if name in SETTINGS_CHECKS:
            SETTINGS_CHECKS[name](attacks_cfg.get(name) if attacks_cfg is not None else None, concepts)


def attack_code_version(name: str | None = None) -> str:
    """A digest of the source of the attack's module (none: plain scoring alone) and of the shared scoring
    code it relies on, part of the cache key of its control run: editing an attack invalidates its
    cached controls."""
    import sys

    from ember import models
    from ember.attacks import _lm, base
    from ember.cache import source_digest
    from ember.evals import loglik, mc

    shared = [base, _lm, loglik, mc, models]  # scoring, model plumbing (layers, embed scale, BOS)
    if name == "relearn":  # its curve is scored by the job's scorer, through the suite; fp32 master weights
        from ember import master_weights
        from ember.evals import suite

        shared += [suite, master_weights]
    return source_digest(shared if name is None else [sys.modules[get_attack(name).__module__], *shared])


def get_attack(name: str) -> AttackFn:
    if name not in ATTACKS:
        raise ConfigError(f"attacks.enabled: unknown attack {name!r}; registered attacks: {sorted(ATTACKS)}")
    return ATTACKS[name]


def enabled_attacks(attacks_cfg: Mapping[str, Any] | None) -> list[str]:
    """The names in ``attacks.enabled``, checked against the registry (relearn is not one of them)."""
    if not attacks_cfg:
        return []
    names = list(attacks_cfg.get("enabled", []) or [])
    for n in names:
        get_attack(n)
        if n == "relearn":
            raise ConfigError("attacks.enabled: 'relearn' is configured by the relearn= group "
                              "(relearn=full or relearn=lora), not in the attacks list")
    return names


def run_attacks(model: Any, tok: Any, concept: Any, attacks_cfg: Mapping[str, Any] | None,
                ctx: AttackContext) -> list[AttackResult]:
    """Run every attack in ``attacks_cfg.enabled`` with its own sub-dict of settings."""
    out = []
    for name in enabled_attacks(attacks_cfg):
        sub = attacks_cfg.get(name) if attacks_cfg is not None else None
        res = get_attack(name)(model, tok, concept, sub, ctx)
        log.info("attack %-14s acc=%.3f (%s) in %.1fs", name, res.accuracy, res.status, res.seconds)
        out.append(res)
    return out


def _import_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base" and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


_import_all()

__all__ = [
    "ATTACKS", "SETTINGS_CHECKS", "AttackContext", "AttackFn", "AttackResult", "check_attack_settings",
    "enabled_attacks", "get_attack",
    "recovered_fraction", "register_attack", "run_attacks", "summary_row",
]
