"""Inter-process file locks and atomic writes for caches shared by concurrent jobs."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


@contextmanager
def cache_lock(path: Path, timeout: float | None = None, say_every: float = 300) -> Iterator[None]:
    """Hold an exclusive lock named after ``path`` (``<path>.lock`` beside it).

    Without ``timeout`` it waits as long as the holder builds (a delta grid on an 8B model can take
    hours; the lock is released if the holder dies), logging every ``say_every`` seconds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    waited = 0.0
    while True:
        step = say_every if timeout is None else min(say_every, max(timeout - waited, 0.0))
        try:
            lock.acquire(timeout=step)
            break
        except Timeout:
            waited += step
            if timeout is not None and waited >= timeout:
                raise
            log.info("waiting for %s: another job is building it (%.0f s so far)", path, waited)
    try:
        yield
    finally:
        lock.release()


def _default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_file_mode()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the complete new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600 files; results are shared like any other file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextmanager
def job_lock(job_dir: Path) -> Iterator[None]:
    """Run a job directory in one process at a time: a second launch into it (a relaunched sweep whose
    Slurm array is still running, an overlapping command) stops at once, saying who holds it. The lock
    is released when the holder exits, however it exits."""
    from ember.errors import JobBusyError

    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    lock, holder = FileLock(str(job_dir / ".running.lock")), job_dir / ".running.json"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            who = json.loads(holder.read_text())
        except (OSError, ValueError):
            who = {}
        raise JobBusyError(f"{job_dir} is being run by another process ({who or 'unknown holder'}): let it finish, "
                         "or stop it and relaunch (finished stages are kept)") from None
    try:
        atomic_write_json(holder, {"pid": os.getpid(), "host": os.uname().nodename,
                                   "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "since": time.time()})
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()
