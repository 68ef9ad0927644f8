"""Hydra callbacks: a summary of finished and failed jobs at the end of a sweep.

``sweep_status.json`` in the sweep directory lists every job as ok, failed (with the reason) or
incomplete, plus the stages that ended ``failed`` inside otherwise finished jobs (a diverged method
or relearning run). It is refreshed after *every* job (``on_job_end``, under a file lock, so parallel
launchers do not race) and again at the end of the sweep. Refreshing per job matters: Hydra's
basic sweeper re-raises the first failed job's exception once the batch has run, and then never
calls ``on_multirun_end``, so a summary written only there would be missing exactly when a job
failed.

The sweep directory is ``outputs/<experiment_name>``: its summary covers every job there, those of
earlier sweeps of the same experiment included. A sweep over ``experiment=`` writes each
experiment's jobs (and summary) under its own directory; the end-of-sweep printout lists each.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("ember")

JOB_STATUS = "job_status.json"  # written into each job directory by ``on_job_end``


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job directory below ``sweep_dir``.

    A job directory is one Hydra wrote ``.hydra/`` into (even a job that failed before ember wrote
    anything) or one ember wrote ``meta.json`` into. ``.hydra/config.yaml`` itself is not a job, nor
    is a W&B run's ``files/config.yaml``.
    """
    jobs = {p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir()}
    jobs |= {p.parent for p in sweep_dir.rglob("meta.json")}
    return sorted(j for j in jobs if "wandb" not in j.relative_to(sweep_dir).parts)


def failed_stages(job: Path) -> list[str]:
    """``<concept>/<stage>: <reason>`` for each stage result whose status is ``failed``."""
    out = []
    for p in sorted(job.glob("*/*.json")):
        rec = _read_json(p)
        if isinstance(rec, dict) and rec.get("status") == "failed":
            out.append(f"{p.parent.name}/{p.stem}: {rec.get('reason') or 'no reason recorded'}")
    return out


def record_job_status(job: Path, error: str | None, overrides: list[str]) -> None:
    """Write ``job_status.json`` into a job directory: ``failed`` with ``error``, else ``complete``."""
    from ember.locking import atomic_write_json

    atomic_write_json(Path(job) / JOB_STATUS, {"status": "failed" if error else "complete", "time": time.time(),
                                                "error": error, "overrides": overrides})


def sweep_status(sweep_dir: Path) -> dict[str, list[str]]:
    """Jobs of a sweep directory by status: ok, failed (with reason), incomplete; plus failed stages."""
    status: dict[str, list[str]] = {"ok": [], "failed": [], "incomplete": [], "failed_stages": []}
    for job in job_dirs(Path(sweep_dir)):
        rel = str(job.relative_to(sweep_dir))
        res_p, st_p = job / "results.json", job / JOB_STATUS
        data, st = _read_json(res_p), _read_json(st_p)
        # a failure recorded by on_job_end wins unless a later run of the job wrote newer results
        if isinstance(st, dict) and st.get("status") == "failed" and (
                data is None or res_p.stat().st_mtime <= st_p.stat().st_mtime):
            status["failed"].append(f"{rel}: {st.get('error')}")
        elif not isinstance(data, dict):
            status["incomplete"].append(rel)
        elif data.get("failures"):
            status["failed"].append(f"{rel}: {data['failures']}")
        else:
            status["ok"].append(rel)
        status["failed_stages"] += [f"{rel}: {s}" for s in failed_stages(job)]
    return status


def format_status(sweep_dir: Path, st: dict[str, list[str]]) -> str:
    lines = [f"sweep {sweep_dir}: {len(st['ok'])} ok, {len(st['failed'])} failed, {len(st['incomplete'])} incomplete"
             + (f", {len(st['failed_stages'])} failed stage(s)" if st.get("failed_stages") else "")]
    lines += [f"  FAILED  {x}" for x in st["failed"]] + [f"  INCOMPLETE  {x}" for x in st["incomplete"]]
    lines += [f"  STAGE FAILED  {x}" for x in st.get("failed_stages", [])]
    return "\n".join(lines)


def write_sweep_status(sweep_dir: Path) -> dict[str, list[str]]:
    from ember.locking import atomic_write_json, cache_lock

    sweep_dir = Path(sweep_dir)
    with cache_lock(sweep_dir / "sweep_status.json", timeout=120):
        st = sweep_status(sweep_dir)
        atomic_write_json(sweep_dir / "sweep_status.json", st)
    return st


class SweepSummary(Callback):
    def __init__(self) -> None:
        self._sweep_dirs: list[Path] = []  # the jobs' own sweep directories (those run in this process)
        self._started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.time()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Record this job's outcome in its directory and refresh the sweep's summary."""
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        try:
            from ember.errors import JobBusyError

            job = Path(config.hydra.runtime.output_dir)
            failed = job_return.status == JobStatus.FAILED
            exc = getattr(job_return, "_return_value", None) if failed else None
            if isinstance(exc, JobBusyError):
                return  # another process runs this job and records how it ends
            error = (f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error") if failed else None
            record_job_status(job, error, list(job_return.overrides or []))
            if config.hydra.mode == RunMode.MULTIRUN:
                sweep_dir = Path(config.hydra.sweep.dir)
                write_sweep_status(sweep_dir)
                if sweep_dir not in self._sweep_dirs:
                    self._sweep_dirs.append(sweep_dir)
        except Exception as exc:  # the summary must never take a job down with it
            log.warning("could not record the job status: %s", exc)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        main = Path(config.hydra.sweep.dir)
        # jobs run by joblib workers or on Slurm nodes recorded their sweep directories in their own copy of
        # this callback: find them by the summaries they wrote during this sweep (a sweep over experiment=)
        swept = [v for o in (OmegaConf.select(config, "hydra.overrides.task") or []) if str(o).startswith("experiment=")
                 for v in str(o).split("=", 1)[1].split(",")]  # each experiment's name is its directory's
        summaries = [main.parent / e / "sweep_status.json" for e in swept]
        elsewhere = [p.parent for p in summaries if self._started and p.exists() and p.stat().st_mtime >= self._started]
        dirs = list(dict.fromkeys([main, *self._sweep_dirs, *sorted(elsewhere)]))
        has_jobs = {d: bool(job_dirs(d)) for d in dirs}  # one directory scan each
        for sweep_dir in has_jobs:
            if sweep_dir == main and not has_jobs[main] and len(has_jobs) > 1:
                continue  # a sweep over experiment=: the jobs went to each experiment's directory
            st = write_sweep_status(sweep_dir)
            print(format_status(sweep_dir, st))  # stdout only (logging here would print it twice)
        if not any(has_jobs.values()):
            print(f"no job directory under {main}: jobs of a sweep over experiment= go to "
                  "outputs/<experiment_name>/ (python -m ember.report outputs/<experiment_name>)")
