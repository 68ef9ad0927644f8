"""On-disk cache of the unedited model's scores, computed once and reused by every job and sweep.

An entry is keyed by (model identity, eval set, concept, scoring mode, a hash of the settings and
of the scoring code's source, ``suite.scoring_code_version``) and stored
as ``<cache_dir>/baselines/<model>/<concept>/<eval_set>__<mode>__<hash>.json``, written
atomically under an inter-process lock, so concurrent jobs compute a baseline once and the others
wait and read it. Each file carries a SHA-256 ``checksum`` of its payload; a file that is not valid
JSON, lacks the checksum, fails it, or belongs to another key is treated as absent and recomputed.

The model identity (:func:`model_identity`) combines the model's name/source/dtype with a cheap
fingerprint of its weights, so a baseline can never be read for different weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ember.data import slugify
from ember.locking import atomic_write_json, cache_lock

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)


def settings_hash(settings: Mapping[str, Any] | Any) -> str:
    """12 hex digits of SHA-256 over the canonical JSON of the settings (dataclass, DictConfig or dict)."""
    if is_dataclass(settings) and not isinstance(settings, type):
        settings = asdict(settings)
    elif not isinstance(settings, Mapping):
        from omegaconf import OmegaConf

        settings = OmegaConf.to_container(settings, resolve=True)
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()[:12]


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    """Hash of per-tensor sums and sums of squares (float64): changes with any meaningful weight edit."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        x = p.detach().double()
        h.update(f"{name}:{tuple(p.shape)}:{float(x.sum()):.9e}:{float((x * x).sum()):.9e};".encode())
    return h.hexdigest()[:12]


def model_identity(model: nn.Module, facts: Any = None) -> str:
    """``<name>-<dtype>-<fingerprint>`` (name from the loader's facts when given)."""
    name = getattr(facts, "name", None) or getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return f"{slugify(str(name)) or 'model'}-{dtype}-{weights_fingerprint(model)}"


@dataclass(frozen=True)
class BaselineKey:
    model: str
    eval_set: str  # e.g. "qa_train", "coherence_test"
    concept: str  # a concept name, or "*" for concept-independent sets
    mode: str  # scoring mode, e.g. "loglik", "letter", "local"
    settings: str  # settings hash

    def relpath(self) -> Path:
        concept = "_all" if self.concept == "*" else slugify(self.concept)
        return Path(slugify(self.model)) / concept / f"{self.eval_set}__{self.mode}__{self.settings}.json"


def _checksum(payload: Any) -> str:
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()


class BaselineCache:
    """Base-model scores on disk: :meth:`get_or_compute` for the suite's parts, :meth:`entry` for any payload."""

    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir).expanduser() / "baselines"
        self.computed = 0  # entries computed by this instance (hits do not count)
        self.rows: dict[tuple[str, str], list[dict[str, Any]]] = {}  # (concept, split) -> per-question rows

    def path(self, key: BaselineKey) -> Path:
        return self.root / key.relpath()

    def read(self, key: BaselineKey) -> dict[str, Any] | None:
        """The stored payload, or None when absent or invalid (bad JSON, checksum missing or wrong, other key)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("baseline %s is corrupt (%s); recomputing", path, exc)
            return None
        if not isinstance(doc, dict) or "checksum" not in doc or "payload" not in doc:
            log.warning("baseline %s has no checksum; recomputing", path)
            return None
        if doc["checksum"] != _checksum(doc["payload"]) or doc.get("key") != asdict(key):
            log.warning("baseline %s fails its checksum or key; recomputing", path)
            return None
        return doc["payload"]

    def write(self, key: BaselineKey, payload: dict[str, Any]) -> None:
        payload = json.loads(_canonical(payload))  # what a reader will see (tuples -> lists, NaN kept)
        doc = {"format": FORMAT_VERSION, "key": asdict(key), "created": time.time(), "payload": payload,
               "checksum": _checksum(payload)}
        atomic_write_json(self.path(key), doc)

    def entry(self, key: BaselineKey, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The payload stored under ``key``, computing and storing it first when absent or invalid."""
        hit = self.read(key)
        if hit is not None:
            return hit
        with cache_lock(self.path(key)):
            hit = self.read(key)  # another job may have written it while we waited
            if hit is not None:
                return hit
            log.info("computing baseline %s", key.relpath())
            payload = compute()
            self.write(key, payload)
            self.computed += 1
            return self.read(key) or json.loads(_canonical(payload))

    def get_or_compute(
        self, model: nn.Module, tokenizer: Any, facts: Any, concept: Any, store: Any, cfg: Any, split: str,
        progress: bool = False,
    ) -> dict[str, Any]:
        """The unedited model's raw scores for ``concept``/``split``, as :func:`ember.evals.suite.evaluate`.

        Each suite part is its own entry: per-concept parts (QA, SimDom, open QA) are keyed by the
        concept, the others (control facts, perplexity, coherence, lm-eval) are shared by every
        concept. The per-question rows go to ``self.rows[(concept, split)]``, not the returned dict.
        """
        from ember.evals import suite

        suite.check_settings(cfg, split)
        model_id = model_identity(model, facts)
        ctx = suite.EvalContext(model, tokenizer, concept, store, cfg, split, None, progress)
        scores: dict[str, Any] = {"split": split, "concept": concept.name, **suite.provenance(cfg),
                                  "baseline_model": model_id}
        rows: list[dict[str, Any]] = []
        for name in suite.enabled_parts(cfg):
            part = suite.PARTS[name]
            key = BaselineKey(model_id, f"{name}_{split}" if part.per_split else name, concept.name if part.per_concept else "*",
                              part.mode(ctx), settings_hash({"settings": part.settings(ctx),
                                                             "code": suite.scoring_code_version()}))

            def compute(name: str = name) -> dict[str, Any]:
                out = suite.run_part(name, ctx)
                return {"scores": out.scores, "rows": out.rows}

            payload = self.entry(key, compute)
            scores.update(payload["scores"])
            rows += payload["rows"]
        self.rows[(concept.name, split)] = rows
        return scores
