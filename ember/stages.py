"""The names and order of a job's stages (the pipeline module runs them)."""

STAGES = ("baseline", "features", "erase", "evaluate", "attacks", "relearn")
