"""The names and order of a job's stages (the pipeline module runs them)."""

from typing import Any

STAGES = ("baseline", "features", "erase", "evaluate", "attacks", "relearn")


def stages_wanted(cfg: Any) -> list[str]:
    """The stages a job writes a record for: ``cfg.stages`` less the features with EMBER off, the attacks
    with none enabled and relearning with ``relearn=none``."""
    out = [s for s in cfg.stages if s != "features" or cfg.ember.enabled]
    if not (cfg.attacks or {}).get("enabled"):
        out = [s for s in out if s != "attacks"]
    if cfg.relearn.name == "none":
        out = [s for s in out if s != "relearn"]
    return out
