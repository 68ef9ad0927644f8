"""Hydra callbacks: a summary of finished and failed jobs at the end of a sweep."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("ember")


def sweep_status(sweep_dir: Path) -> dict[str, list[str]]:
    """Jobs of a sweep directory by status: ok, failed (with reason), incomplete."""
    status: dict[str, list[str]] = {"ok": [], "failed": [], "incomplete": []}
    for cfg in sorted(sweep_dir.rglob("config.yaml")):
        job = cfg.parent
        rel = str(job.relative_to(sweep_dir))
        res = job / "results.json"
        if not res.exists():
            status["incomplete"].append(rel)
            continue
        try:
            data = json.loads(res.read_text())
        except json.JSONDecodeError:
            status["incomplete"].append(rel)
            continue
        if data.get("failures"):
            status["failed"].append(f"{rel}: {data['failures']}")
        else:
            status["ok"].append(rel)
    return status


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        st = sweep_status(sweep_dir)
        lines = [f"sweep {sweep_dir}: {len(st['ok'])} ok, {len(st['failed'])} failed, {len(st['incomplete'])} incomplete"]
        lines += [f"  FAILED  {x}" for x in st["failed"]] + [f"  INCOMPLETE  {x}" for x in st["incomplete"]]
        msg = "\n".join(lines)
        (sweep_dir / "sweep_status.json").write_text(json.dumps(st, indent=2))
        log.info(msg)
        print(msg)
