"""Append-only JSONL logs that let a long loop (a grid of cells, a delta grid) resume where it stopped.

Each record carries a ``cell`` id and the caller's ``context`` (a digest of everything a score depends
on besides the cell); records from another context are stale and ignored. Each append is flushed and
fsynced, and a torn last line from a killed job is skipped.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("ember")


def read_jsonl(path: Path, context: str) -> dict[str, dict[str, Any]]:
    """Complete records made under ``context``, by cell id (a torn final line from a killed job is skipped)."""
    out: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return out
    stale = 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("context", "") != context:
            stale += 1
            continue
        out[rec["cell"]] = rec
    if stale:
        log.info("%s: %d record(s) from another evaluation context are ignored and scored again", path.name, stale)
    return out


def append_jsonl(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.read_bytes() if path.exists() else b""
    prefix = b"" if not data or data.endswith(b"\n") else b"\n"  # never glue onto a torn line
    with open(path, "ab") as fh:
        fh.write(prefix + (json.dumps(rec, default=str) + "\n").encode())
        fh.flush()
        os.fsync(fh.fileno())
