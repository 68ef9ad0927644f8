"""Every check that can fail before expensive work starts: config ranges, data files, names.

``preflight`` validates the config, resolves and reads every requested concept (so a malformed
data file fails now, naming the file and key), instantiates the method (unknown parameters fail
now), checks attack names, and checks the factorization rank and the method's layers (every grid
cell) against the model's width and depth read from its config or GGUF header alone (no weights loaded).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ember.config import validate, validate_against_model
from ember.data import ConceptData, ConceptStore, open_store, starter_store
from ember.errors import ConfigError, EmberError
from ember.paths import cache_root

log = logging.getLogger(__name__)


@dataclass
class Checked:
    store: ConceptStore
    starter: ConceptStore
    concepts: list[ConceptData]


def packaged_gguf_config(m: Any) -> dict[str, int]:
    """A packaged model's sizes from its GGUF header (``gguf_header_config``); ``{}`` on any failure (the
    load reports a missing package clearly). An ``assemble`` package is read from its parts
    (``chunk_paths()``) rather than assembled."""
    try:
        from ember.gguf_header import gguf_header_config
        from ember.models import _package_dir

        if m.assemble:
            module = importlib.import_module(m.assemble.split(":")[0])
            chunk_paths = getattr(module, "chunk_paths", None)
            if not callable(chunk_paths):
                return {}
            parts = [Path(p) for p in chunk_paths()]
        else:
            parts = [_package_dir(m.package) / m.gguf_file]
        return gguf_header_config(parts)
    except Exception as exc:
        log.debug("model dimensions not read from the GGUF header (%s)", exc)
        return {}


def peek_model_config(cfg: DictConfig) -> dict[str, int]:
    """The model's ``hidden_size``, ``num_hidden_layers`` and ``intermediate_size`` (those known) from its
    config file, GGUF header or preset, without loading weights."""
    m = cfg.model
    if m.source == "tiny_random":
        return {"hidden_size": int(m.tiny.d_model), "num_hidden_layers": int(m.tiny.n_layers),
                "intermediate_size": int(m.tiny.d_mlp)}
    c: Any = None
    if m.source == "paper_shape":
        from ember.model_shapes import shape_sizes

        c = shape_sizes(m.shape)  # an unknown shape fails here, naming the choices
    elif m.source == "packaged":
        from ember.models import _float_cache_dir

        p = _float_cache_dir(m, cache_root(cfg)) / "config.json"
        if not p.exists():  # a fresh machine: the converted copy is made at load; the GGUF header knows
            return packaged_gguf_config(m)
        c = json.loads(p.read_text())
        c = c.get("text_config") or c
    elif m.source == "hub":
        try:
            from transformers import AutoConfig

            conf = AutoConfig.from_pretrained(m.hub_id)
            c = (getattr(conf, "text_config", None) or conf).to_dict()
        except Exception:
            return {}  # load_model will report the missing model clearly
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size")
    return {k: int(c[k]) for k in keys if c and isinstance(c.get(k), int) and c[k] > 0}


def peek_dims(cfg: DictConfig) -> tuple[int | None, int | None]:
    """The model's width and depth without loading weights (None if unknown)."""
    c = peek_model_config(cfg)
    return c.get("hidden_size"), c.get("num_hidden_layers")


def warn_large_model_on_cpu(cfg: DictConfig) -> bool:
    """Say so, before hours go by, when a paper-size model (``size_class: large``) will run on a CPU."""
    from ember.config import resolve_device

    m = cfg.model
    if m.size_class == "large" and resolve_device(m.device) == "cpu":
        log.warning("model '%s' is paper-size (size_class=large) and will run on the CPU: expect hours per concept; "
                    "run it on a GPU node (hydra/launcher=submitit_slurm) or pick model=smollm2_135m", m.name)
        return True
    return False


def warn_fp16_overflow(family: str, dtype: str) -> bool:
    """Say so when a Gemma model (every family: activations beyond float16's range) is run in float16."""
    if dtype == "float16" and family.startswith("gemma"):
        log.warning("model.dtype=float16 on a %s model: Gemma's activations overflow float16 (inf/NaN scores); "
                    "use model.dtype=bfloat16 or float32", family)
        return True
    return False


def check_attack_layers(cfg: DictConfig, n_layers: int) -> None:
    """The probe's layers against the model's depth, before any stage (it runs after the other attacks)."""
    from ember.attacks import enabled_attacks
    from ember.attacks.probe import check_probe, check_probe_layers

    if "probe" in enabled_attacks(cfg.attacks):
        check_probe_layers(check_probe(cfg.attacks.get("probe"))["layers"], n_layers)


def check_method_layers(cfg: DictConfig, n_layers: int, d_mlp: int | None = None) -> None:
    """The method's layer settings (and every cell of a configured grid search) exist in the model, and
    its sizes fit (SNMF's rank within the MLP width ``d_mlp``, when known)."""
    from ember.methods import get_method
    from ember.search import method_cells

    params: Any = OmegaConf.to_container(cfg.method.params, resolve=True) or {}
    cells = method_cells(cfg.method) if cfg.method.search != "none" and cfg.method.name != "none" else [{}]
    for cell in cells:
        try:
            get_method(cfg.method.name, {**params, **cell}).check_against_model(n_layers, d_mlp)
        except ConfigError as exc:
            where = f" (grid cell {cell})" if cell else ""
            raise ConfigError(f"{exc}{where}, for model '{cfg.model.name}'") from None


@functools.cache
def _lm_eval_task_names(include_path: str | None) -> frozenset[str]:
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager(include_path=include_path).all_tasks)


def check_lm_eval_tasks(tasks: list[str], include_path: str | None = None) -> None:
    """``eval.lm_eval_tasks`` names lm-eval knows, with the tasks under ``eval.lm_eval_include_path``
    (indexing its task files takes seconds: only when the list is set)."""
    if not tasks:
        return
    import difflib

    known = _lm_eval_task_names(include_path)
    for t in tasks:
        if t not in known:
            near = difflib.get_close_matches(t, sorted(known), 3)
            raise ConfigError(f"eval.lm_eval_tasks: lm-eval has no task {t!r}"
                              + (f"; did you mean {near}?" if near else "") + " (`lm-eval ls tasks` lists them)")


def _resolve_all(cfg: DictConfig) -> None:
    """Every interpolation resolves (an unset ``${oc.env:...}`` names its key, not a traceback)."""
    from omegaconf.errors import InterpolationResolutionError

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as exc:
        key = getattr(exc, "full_key", None) or "a config value"
        raise ConfigError(f"{key}: {exc.msg if hasattr(exc, 'msg') else exc}; set the environment variable it "
                          f"reads or pass {key}=<value>") from None


def _check_cache_dir(path: Path) -> None:
    """``cache_dir`` (env ``EMBER_CACHE``) is a directory this process can write."""
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"cache_dir={str(path)!r} (env EMBER_CACHE) is not a writable directory ({exc.strerror}); "
                          "point EMBER_CACHE or cache_dir=<dir> at one") from None


def preflight(cfg: DictConfig) -> Checked:
    from ember.attacks import ATTACKS, check_attack_settings
    from ember.methods import get_method

    _resolve_all(cfg)
    validate(cfg)
    _check_cache_dir(cache_root(cfg))
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
    check_attack_settings(cfg.attacks, concepts)
    check_lm_eval_tasks(list(cfg.eval.lm_eval_tasks or []), cfg.eval.lm_eval_include_path)
    starter = starter_store(cfg)
    store.preload(names)  # every data file the job will read: a malformed one fails before any model loads
    starter.preload()
    sizes = peek_model_config(cfg)
    if "hidden_size" in sizes:
        validate_against_model(cfg, sizes["hidden_size"])
    if "num_hidden_layers" in sizes:
        check_method_layers(cfg, sizes["num_hidden_layers"], sizes.get("intermediate_size"))
        check_attack_layers(cfg, sizes["num_hidden_layers"])
    warn_large_model_on_cpu(cfg)
    return Checked(store=store, starter=starter, concepts=concepts)
