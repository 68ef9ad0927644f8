"""The Hydra entry point: ``python -m ember [overrides]`` runs one job; ``-m`` sweeps.

``python -m ember --cfg job`` prints the composed config; ``python -m ember.report <dir>`` turns
a sweep directory into tables and plots.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

import ember.config  # noqa: F401  (registers the schemas and resolvers)
from ember.errors import EmberError
from ember.paths import CONF_DIR

log = logging.getLogger("ember")


if not CONF_DIR.is_dir():  # a non-editable install: the configs live in the clone, not the package
    sys.exit(f"ember: no configs at {CONF_DIR}; install ember from a clone with `pip install -e .`")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ember.pipeline import run_job

    try:
        return run_job(cfg)
    except EmberError as exc:
        log.error("error: %s", exc)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # recorded by Hydra and by the sweep summary; the other jobs go on
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
