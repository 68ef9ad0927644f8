"""Result files in the job directory (atomic, with completion status) and the W&B mirror."""

from __future__ import annotations

import json
import logging
import platform
import re
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from ember.errors import ConfigError
from ember.locking import atomic_write_json, atomic_write_text
from ember.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

PACKAGES = ("torch", "transformers", "hydra-core", "omegaconf", "lm_eval", "wandb", "pandas", "peft",
            "sentence-transformers", "ember-erasure")


def environment_info() -> dict[str, Any]:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT_ROOT, capture_output=True,
                                    text=True, timeout=5).stdout.strip())
    except Exception:
        commit, dirty = None, None
    import torch

    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
            "git_commit": commit, "git_dirty": dirty, "cuda": torch.cuda.is_available(),
            "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
            "torch_threads": torch.get_num_threads()}


class JobFiles:
    """One job directory: per-concept stage results, each a JSON written atomically with a status."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def concept_dir(self, concept_slug: str) -> Path:
        d = self.root / concept_slug
        d.mkdir(parents=True, exist_ok=True)
        return d

    def failure_path(self, concept_slug: str) -> Path:
        """``FAILED.txt``: the traceback of a concept that raised (removed when a later launch finishes it)."""
        return self.concept_dir(concept_slug) / "FAILED.txt"

    def stage_path(self, concept_slug: str, stage: str) -> Path:
        return self.concept_dir(concept_slug) / f"{stage}.json"

    # results kept while a stage runs (each attack, the relearning before its control): a crash in the
    # middle of a stage loses only the piece in progress; ``context`` says what a result depends on
    def partial_path(self, concept_slug: str, name: str) -> Path:
        return self.concept_dir(concept_slug) / "partial" / f"{name}.json"

    def read_partial(self, concept_slug: str, name: str, context: str) -> dict[str, Any] | None:
        """The kept result, or None when there is none, it does not parse, or it was made under another context."""
        try:
            rec = json.loads(self.partial_path(concept_slug, name).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return rec.get("result") if isinstance(rec, dict) and rec.get("context") == context else None

    def write_partial(self, concept_slug: str, name: str, context: str, result: dict[str, Any]) -> None:
        atomic_write_json(self.partial_path(concept_slug, name), {"context": context, "result": result})

    def clear_partials(self, concept_slug: str, prefix: str) -> None:
        for p in self.partial_path(concept_slug, prefix).parent.glob(f"{prefix}*.json"):
            p.unlink(missing_ok=True)

    def stage_done(self, concept_slug: str, stage: str, data: str | None = None, settings: str | None = None) -> bool:
        """The stage finished (complete, skipped or failed) on this data and these settings: a record
        written from other data (``data``: ``pipeline.job_data_key``) or other settings
        (``settings``: ``pipeline.stage_settings_keys``), both stored by :meth:`write_stage`, is stale."""
        p = self.stage_path(concept_slug, stage)
        if not p.exists():
            return False
        try:
            rec = json.loads(p.read_text())
        except (json.JSONDecodeError, OSError):
            return False
        if data is not None and rec.get("data", data) != data:  # records without one predate the check
            log.warning("%s: the data this stage read changed since it ran (the concept's, or the texts its data "
                        "set shares: backgrounds, control facts, instructions): recomputing it", p)
            return False
        if settings is not None and rec.get("settings", settings) != settings:
            log.warning("%s: the settings or the code this stage depends on changed since it ran (an edited "
                        "config default, a fix to a scorer, to EMBER or to the base method?): recomputing it", p)
            return False
        return rec.get("status") in ("complete", "skipped", "failed")

    def read_stage(self, concept_slug: str, stage: str) -> dict[str, Any] | None:
        p = self.stage_path(concept_slug, stage)
        try:
            return json.loads(p.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_stage(self, concept_slug: str, stage: str, result: dict[str, Any], status: str = "complete",
                    data: str | None = None, settings: str | None = None) -> None:
        # The stage status is the pipeline's. A result's own "status" (the relearning result carries
        # "ok"/"diverged") must not replace it: it did, so relearn.json never read as finished and
        # every rerun redid the relearning. It is kept as "result_status".
        rec = {"status": status, "stage": stage, **{k: v for k, v in result.items() if k != "status"}}
        if "status" in result:
            rec["result_status"] = result["status"]
        if data is not None:
            rec["data"] = data
        if settings is not None:
            rec["settings"] = settings
        atomic_write_json(self.stage_path(concept_slug, stage), rec)

    def write_table(self, concept_slug: str, name: str, rows: list[dict[str, Any]]) -> Path:
        p = self.concept_dir(concept_slug) / f"{name}.csv"
        atomic_write_text(p, pd.DataFrame(rows).to_csv(index=False))
        return p

    def write_meta(self, cfg: DictConfig, overrides: list[str]) -> None:
        atomic_write_text(self.root / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_json(self.root / "meta.json", {"overrides": overrides, "environment": environment_info()})


RUN_ID_FILE = "ember-run-id"  # under <job dir>/wandb/, beside W&B's own run directories
_RUN_ID = re.compile(r"[a-z0-9]{1,64}")


def wandb_run_id(job_dir: Path) -> str:
    """The W&B run id of a job directory: made once, kept in ``<job dir>/wandb/ember-run-id`` and read
    back on every later launch there, so a job resumed after a crash, a kill or a Slurm requeue
    continues its W&B run instead of opening a second one with the same name.

    The id is random (16 characters of [0-9a-f]; W&B allows up to 64 of [a-z0-9]), not derived from
    the path, so it stays unique where a path would not: the same path on two machines logging to one
    project, or a job directory deleted and run again from scratch (a new run, not the old one's
    history continued).
    """
    path = Path(job_dir).resolve() / "wandb" / RUN_ID_FILE
    try:
        stored = path.read_text().strip()
    except OSError:
        stored = ""
    if _RUN_ID.fullmatch(stored):
        return stored
    run_id = uuid.uuid4().hex[:16]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, run_id + "\n")
    return run_id


class WandbLogger:
    """One W&B run per job directory; a no-op when ``logger=none``.

    The run id is the job directory's (``wandb_run_id``) and ``resume="allow"``: a relaunch of an
    unfinished job continues the same run (online: the same run page; offline: each launch writes an
    ``offline-run-<time>-<id>`` directory with that one id, and ``wandb sync`` uploads them to one run).
    A stage computed in a launch is logged as it finishes (summary and history); a stage finished in
    an earlier launch has its metrics put in the run's summary (:meth:`replay`), so a job run first
    without ``logger=wandb`` can be sent to W&B later by relaunching it with the logger on. The
    per-question and relearning-curve tables are logged only by the launch that computes them.
    """

    def __init__(self, cfg: DictConfig, job_dir: Path, job_name: str, concepts: list[str]):
        self.run = None
        if cfg.logger.name != "wandb" or cfg.logger.mode == "disabled":
            return
        import wandb

        tags = [f"model:{cfg.model.name}", f"method:{cfg.method.name}", f"ember:{'on' if cfg.ember.enabled else 'off'}",
                *[f"concept:{c}" for c in concepts], *list(cfg.logger.tags)]
        try:
            self.run = wandb.init(
                project=cfg.logger.project, entity=cfg.logger.entity, mode=cfg.logger.mode, dir=str(job_dir),
                config=OmegaConf.to_container(cfg, resolve=True), group=cfg.experiment_name, name=job_name,
                job_type="ember-job", tags=[t[:64] for t in tags], reinit="finish_previous",
                id=wandb_run_id(job_dir), resume="allow",
            )
        except (wandb.errors.Error, OSError) as exc:
            raise ConfigError(
                f"logger=wandb could not open a run ({type(exc).__name__}: {exc}); with logger.mode=online run "
                "`wandb login` or set WANDB_API_KEY, or use logger.mode=offline (then `wandb sync`)") from exc

    def summary(self, prefix: str, metrics: dict[str, Any], history: bool = True) -> None:
        if self.run is None:
            return
        flat = {f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float, bool)) and v is not None}
        self.run.summary.update(flat)
        if history:
            self.run.log(flat)

    def replay(self, concept_slug: str, flat: dict[str, Any]) -> None:
        """Put the metrics of stages finished in an earlier launch (``collect_concept``'s
        ``<stage>/<metric>`` keys) into the run's summary, without adding history steps."""
        self.summary(concept_slug, flat, history=False)

    def table(self, key: str, rows: list[dict[str, Any]]) -> None:
        if self.run is None or not rows:
            return
        import wandb

        df = pd.DataFrame(rows)
        self.run.log({key: wandb.Table(dataframe=df.astype({c: str for c in df.columns if df[c].dtype == object}))})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
