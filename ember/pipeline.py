"""A job's stages and their resumable result files (grows as stages land)."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ember.config import validate
from ember.data import open_store, starter_store

log = logging.getLogger("ember")


def job_dir() -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path.cwd()


def config_summary(cfg: DictConfig) -> str:
    m, e = cfg.model, cfg.ember
    ember_txt = (f"on (K={e.factorization.rank}, sparsity={e.factorization.sparsity}, selector={e.selector.name}, "
                 f"delta={'grid ' + str(list(e.delta_grid)) if e.delta is None else e.delta})" if e.enabled else "off")
    lines = [
        f"model      {m.name} ({m.source}, {m.dtype}, device={m.device})",
        f"concepts   {cfg.concepts.source}: {list(cfg.concepts.names) or 'all'}",
        f"ember      {ember_txt}",
        f"method     {cfg.method.name}",
        f"eval       mc={cfg.eval.mc_mode}, open_qa={cfg.eval.open_qa}, coherence={cfg.eval.coherence}",
        f"relearn    {cfg.relearn.name}",
        f"logger     {cfg.logger.name}",
        f"seed       {cfg.seed}",
        f"stages     {list(cfg.stages)}",
    ]
    return "\n".join(lines)


def run_job(cfg: DictConfig) -> float | None:
    validate(cfg)
    store = open_store(cfg)
    names = store.resolve_names(list(cfg.concepts.names))
    out = job_dir()
    log.info("== ember job ==\n%s\njob dir    %s", config_summary(cfg), out)
    for name in names:
        stats = store.concept(name).stats()
        log.info("concept %-24s %s", name, ", ".join(f"{k}={v}" for k, v in stats.items()))
    log.info("neutral sentences: %d", len(store.neutral))
    st = starter_store(cfg)
    log.info("coherence instructions: %d; control facts: %d", len(st.instructions), len(st.control_facts))
    from ember.config import validate_against_model
    from ember.models import load_model

    lm = load_model(cfg.model, cache_root=Path(cfg.cache_dir))
    validate_against_model(cfg, lm.facts.d_model)
    log.info("model facts: %s", OmegaConf.to_yaml(OmegaConf.create(lm.facts.to_dict())).strip().replace("\n", "; "))
    return None
