"""Every check that can fail before expensive work starts: config ranges, data files, names.

``preflight`` validates the config, resolves and reads every requested concept (so a malformed
data file fails now, naming the file and key), instantiates the method (unknown parameters fail
now), checks attack names, and checks the factorization rank against the model's width read from
its config alone (no weights loaded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ember.config import validate, validate_against_model
from ember.data import ConceptData, ConceptStore, open_store, starter_store
from ember.errors import ConfigError, EmberError


@dataclass
class Checked:
    store: ConceptStore
    starter: ConceptStore
    concepts: list[ConceptData]


def peek_d_model(cfg: DictConfig) -> int | None:
    """The model's width from its config file or preset, without loading weights (None if unknown)."""
    m = cfg.model
    if m.source == "tiny_random":
        return int(m.tiny.d_model)
    if m.source == "packaged":
        from ember.models import _float_cache_dir

        p = _float_cache_dir(m, Path(cfg.cache_dir)) / "config.json"
        if p.exists():
            c = json.loads(p.read_text())
            return int((c.get("text_config") or c).get("hidden_size", 0)) or None
        return None
    if m.source == "hub":
        try:
            from transformers import AutoConfig

            c = AutoConfig.from_pretrained(m.hub_id)
            return int(getattr(getattr(c, "text_config", None) or c, "hidden_size", 0)) or None
        except Exception:
            return None  # load_model will report the missing model clearly
    return None


def preflight(cfg: DictConfig) -> Checked:
    from ember.attacks import ATTACKS
    from ember.methods import get_method

    validate(cfg)
    params: Any = OmegaConf.to_container(cfg.method.params, resolve=True)
    get_method(cfg.method.name, params)
    enabled = list((cfg.attacks or {}).get("enabled", []) or [])
    unknown = [a for a in enabled if a not in ATTACKS]
    if unknown:
        raise ConfigError(f"attacks.enabled: unknown attack(s) {unknown}; known: {sorted(ATTACKS)}")
    store = open_store(cfg)
    names = store.resolve_names(list(cfg.concepts.names))
    if not names:
        raise EmberError(f"concepts.names: no concepts found in {store.root}")
    concepts = [store.concept(n) for n in names]
    starter = starter_store(cfg)
    d = peek_d_model(cfg)
    if d is not None:
        validate_against_model(cfg, d)
    return Checked(store=store, starter=starter, concepts=concepts)
