"""A job's stages: their names and order, which ones a job writes, and the settings none of them depends on."""

from typing import Any

STAGES = ("baseline", "features", "erase", "evaluate", "attacks", "relearn")

#: keys inside the sections a stage depends on (pipeline.STAGE_SECTIONS) that say where data lives or how
#: work is batched, not what a stage computes; left out of the stage hashes, the job directory name and the report
#: (the data's content has its own fingerprint)
NON_RESULT_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("release_dir", "starter_dir"),
    "eval": ("batch_size", "letter_batch_size", "llm_threads", "llm_timeout_s", "llm_api_key_env"),
}


def stages_wanted(cfg: Any) -> list[str]:
    """The stages a job writes a record for: ``cfg.stages`` less the features with EMBER off, the attacks
    with none enabled and relearning with ``relearn=none``."""
    out = [s for s in cfg.stages if s != "features" or cfg.ember.enabled]
    if not (cfg.attacks or {}).get("enabled"):
        out = [s for s in out if s != "attacks"]
    if cfg.relearn.name == "none":
        out = [s for s in out if s != "relearn"]
    return out
