"""The Hydra entry point: ``python -m ember [overrides]`` runs one job; ``-m`` sweeps.

``python -m ember --cfg job`` prints the composed config; ``python -m ember.report <dir>`` turns
a sweep directory into tables and plots.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import ember.config  # noqa: F401  (registers the schemas and resolvers)
from ember.callbacks import record_job_status
from ember.errors import EmberError, JobBusyError
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
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            raise  # recorded by Hydra and by the sweep summary; the other jobs go on
        # a clean exit code instead of Hydra's traceback; Hydra calls no on_job_end for SystemExit,
        # so the job's failure is recorded here (not a refused launch's: the running process records it)
        if not isinstance(exc, JobBusyError):
            record_job_status(Path(hc.runtime.output_dir), f"{type(exc).__name__}: {exc}", list(hc.overrides.task))
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
