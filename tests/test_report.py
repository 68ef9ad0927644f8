"""The report's tables and plots, from hand-written job directories (no model is loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ember.report import build_report


def _stage(concept: Path, stage: str, metrics: dict, status: str = "complete", **extra) -> None:
    concept.mkdir(parents=True, exist_ok=True)
    (concept / f"{stage}.json").write_text(json.dumps({"status": status, "stage": stage, "metrics": metrics, **extra}))


def _config(job: Path, ember: bool, method: str = "rmu", overrides: list[str] | None = None) -> None:
    job.mkdir(parents=True, exist_ok=True)
    (job / "config.yaml").write_text(f"model: {{name: m}}\nmethod: {{name: {method}}}\n"
                                     f"ember: {{enabled: {str(ember).lower()}, delta: null}}\nseed: 1\n")
    (job / "meta.json").write_text(json.dumps({"overrides": overrides} if overrides is not None else {}))


def _job(root, name: str, ember: bool, attacks: dict[str, tuple[float, float, float]], curve: list[float],
         erased: float = 0.3) -> None:
    job = root / name
    _config(job, ember)
    concept = job / "Harry_Potter"
    # evaluate's qa_acc (0.4) is scored as eval.mc_mode says; the attacks' erased accuracy (``erased``) by
    # log-likelihood, as the attacks score
    _stage(concept, "evaluate", {"efficacy": 0.5}, scores={"qa_acc": 0.4})
    metrics, per_attack = {}, {}
    for a, (acc, ctrl, rec) in attacks.items():
        metrics.update({f"{a}_acc": acc, f"{a}_control_acc": ctrl, f"{a}_recovered": rec})
        per_attack[a] = {"accuracy": acc, "control_accuracy": ctrl, "erased_accuracy": erased, "base_accuracy": 0.9,
                         "reference_scorer": "loglik (measured for the attacks)", "recovered_fraction": rec}
    _stage(concept, "attacks", metrics, attacks=per_attack)
    pd.DataFrame({"epoch": range(len(curve)), "qa_acc": curve, "retain_acc": [0.8] * len(curve)}).to_csv(
        concept / "relearn_curve.csv", index=False)
    _stage(concept, "relearn", {"relearn_acc": curve[-1]})


def test_attack_and_relearning_tables(tmp_path) -> None:
    _job(tmp_path, "off", False, {"jailbreak": (0.6, 0.95, 0.4), "gcg": (0.5, 0.8, 0.2)}, [0.4, 0.6, 0.7])
    _job(tmp_path, "on", True, {"jailbreak": (0.45, 0.95, 0.1)}, [0.4, 0.45, 0.5])
    res = build_report(tmp_path, tmp_path / "out")
    att = pd.read_csv(tmp_path / "out" / "report_attacks.csv")
    assert len(att) == 3  # (off: gcg, jailbreak), (on: jailbreak)
    row = att[(att.ember == "w/ EMBER") & (att.attack == "jailbreak")].iloc[0]
    assert (row.accuracy, row.control, row.recovered, row.base) == (0.45, 0.95, 0.1, 0.9)
    rel = pd.read_csv(tmp_path / "out" / "report_relearn.csv")
    assert len(rel) == 6  # one row per (job, epoch)
    assert rel[rel.ember == "w/o EMBER"].sort_values("epoch").qa_acc.tolist() == [0.4, 0.6, 0.7]
    assert "Relearning curves" in res["markdown"] and "Attacks" in res["markdown"]
    # only method/EMBER vary (no overrides recorded): the paper table's rows and leading columns as ever
    table = pd.read_csv(tmp_path / "out" / "report.csv")
    assert list(table.columns[:4]) == ["model", "method", "ember", "n"] and "failed" not in table
    assert "harmonic_alpaca" not in table  # no stage wrote it here


def test_attack_erased_column_is_the_attack_scorers(tmp_path) -> None:
    """The erased column is attacks.json's erased_accuracy (log-likelihood), not evaluate's qa_acc."""
    _job(tmp_path, "on", True, {"jailbreak": (0.45, 0.95, 0.1)}, [0.4, 0.5], erased=0.3)
    build_report(tmp_path, tmp_path / "out")
    row = pd.read_csv(tmp_path / "out" / "report_attacks.csv").iloc[0]
    assert row.erased == 0.3 and row.base == 0.9  # evaluate/qa_acc is 0.4
    assert row.scorer.startswith("loglik")


def test_attack_table_says_how_many_rows_its_recovered_mean_covers(tmp_path) -> None:
    """A probe (or a job with no gap) has no recovered fraction: the mean is over the others, and
    ``n_recovered`` says over how many."""
    _job(tmp_path, "a", True, {"probe": (0.5, 0.65, float("nan")), "jailbreak": (0.45, 0.95, 0.1)}, [0.4])
    _job(tmp_path, "b", True, {"probe": (0.4, 0.65, float("nan")), "jailbreak": (0.5, 0.95, float("nan"))}, [0.4])
    build_report(tmp_path, tmp_path / "out")
    att = pd.read_csv(tmp_path / "out" / "report_attacks.csv").set_index("attack")
    assert (att.loc["jailbreak", "n"], att.loc["jailbreak", "n_recovered"], att.loc["jailbreak", "recovered"]) == (2, 1, 0.1)
    assert att.loc["probe", "n_recovered"] == 0 and pd.isna(att.loc["probe", "recovered"])


def test_ablation_rows_per_delta(tmp_path) -> None:
    """experiment=ablation_delta: one row per ember.delta (numeric order), not one averaged row."""
    for i, (delta, eff) in enumerate([(10, 0.6), (2, 0.3), (100, 0.9)]):
        job = tmp_path / "multirun" / str(i)
        _config(job, True, method="none", overrides=["experiment=ablation_delta", f"ember.delta={delta}", "seed=1"])
        for concept, shift in (("A", 0.0), ("B", 0.1)):
            _stage(job / concept, "evaluate", {"efficacy": eff + shift, "specificity": 1 - eff, "coherence": 0.9,
                                                "harmonic": 0.5, "harmonic_alpaca": eff / 2}, scores={"qa_acc": 0.1})
    res = build_report(tmp_path, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "report.csv")
    assert table["ember.delta"].tolist() == [2, 10, 100]
    assert table["efficacy"].round(6).tolist() == [0.35, 0.65, 0.95] and (table["n"] == 2).all()
    assert table["harmonic_alpaca"].round(6).tolist() == [0.15, 0.3, 0.45]
    assert "seed" not in table and "experiment" not in table
    assert "| ember.delta |" in (tmp_path / "out" / "report.md").read_text()
    # the trade-off plot comes from the jobs' evaluate metrics: no delta_grid.csv at a fixed delta
    assert not list(tmp_path.rglob("delta_grid.csv"))
    assert str(tmp_path / "out" / "delta_tradeoff.png") in res["plots"]
    assert (tmp_path / "out" / "delta_tradeoff.png").stat().st_size > 0


def test_rank_ablation_and_method_sweep_columns(tmp_path) -> None:
    """Any varying override is a column (ablation_rank); one told apart by method/EMBER already is not."""
    for rank in (100, 400):
        for ember in (False, True):
            job = tmp_path / f"r{rank}_{ember}"
            _config(job, ember, overrides=[f"ember.factorization.rank={rank}", f"ember={'on' if ember else 'off'}",
                                           "method=rmu"])
            _stage(job / "A", "evaluate", {"efficacy": rank / 1000})
    build_report(tmp_path, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "report.csv")
    assert list(table.columns[:5]) == ["model", "method", "ember", "ember.factorization.rank", "n"]
    assert len(table) == 4


def test_failed_stages_are_not_averaged(tmp_path) -> None:
    """A diverged relearning (status failed) and a failed erase are counted, not averaged in."""
    job = tmp_path / "job"
    _config(job, True)
    for concept, acc in (("A", 0.5), ("B", 0.9)):
        _stage(job / concept, "evaluate", {"efficacy": 0.5})
        _stage(job / concept, "relearn", {"relearn_acc": acc, "relearn_recovered": acc / 2},
               status="complete" if concept == "A" else "failed")
        pd.DataFrame({"epoch": [0, 1], "qa_acc": [0.3, acc]}).to_csv(job / concept / "relearn_curve.csv", index=False)
    _stage(job / "C", "erase", {"delta": 0.0}, status="failed")
    for stage in ("evaluate", "relearn"):
        _stage(job / "C", stage, {}, status="skipped")
    res = build_report(tmp_path, tmp_path / "out")
    row = pd.read_csv(tmp_path / "out" / "report.csv").iloc[0]
    assert row.relearn_acc == 0.5 and row.relearn_recovered == 0.25  # B's diverged relearning left out
    assert row.n == 2 and row.failed == 2  # A and B have numbers; B and C have a stage that did not complete
    rel = pd.read_csv(tmp_path / "out" / "report_relearn.csv")
    assert rel.qa_acc.tolist() == [0.3, 0.5] and (rel.n == 1).all()
    assert "failed:" in res["markdown"]


def test_relearn_control_and_recovered(tmp_path) -> None:
    """relearn_recovered and the control accuracy in the paper table; the control curve in the relearn table."""
    job = tmp_path / "job"
    _config(job, True)
    concept = job / "A"
    _stage(concept, "evaluate", {"efficacy": 0.5, "harmonic_alpaca": 0.4})
    _stage(concept, "relearn", {"relearn_acc": 0.5, "relearn_control_acc": 0.9, "relearn_recovered": 0.5},
           control_accuracy=0.9, control_curve=[{"epoch": 0, "qa_acc": 0.7}, {"epoch": 1, "qa_acc": 0.9}],
           base_accuracy=0.7, erased_accuracy=0.3, recovered_fraction=0.5)
    pd.DataFrame({"epoch": [0, 1], "qa_acc": [0.3, 0.5], "retain_acc": [0.8, 0.8]}).to_csv(
        concept / "relearn_curve.csv", index=False)
    res = build_report(tmp_path, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "report.csv")
    assert {"relearn_recovered", "relearn_control_acc", "harmonic_alpaca"} <= set(table.columns)
    assert table.relearn_recovered[0] == 0.5 and table.relearn_control_acc[0] == 0.9
    rel = pd.read_csv(tmp_path / "out" / "report_relearn.csv")
    assert rel.control_qa_acc.tolist() == [0.7, 0.9]
    assert rel.recovered.round(6).tolist() == [0.0, 0.5]  # (0.5 - 0.3) / (0.7 - 0.3) after the last epoch
    assert str(tmp_path / "out" / "relearn_curves.png") in res["plots"]


def _choices(job: Path, **chosen: str) -> None:
    """The option Hydra chose per config group, as a real job's .hydra/hydra.yaml records it."""
    (job / ".hydra").mkdir(parents=True, exist_ok=True)
    lines = ["hydra:", "  runtime:", "    choices:"] + [f"      {g}: {o}" for g, o in chosen.items()]
    (job / ".hydra" / "hydra.yaml").write_text("\n".join(lines) + "\n")


def test_rows_are_the_options_hydra_chose_not_the_sections_names(tmp_path) -> None:
    """relearn=short and relearn=full both have name: full, rmu_paper_llama's name is rmu, ember=paper is
    enabled like ember=on: each was once averaged into one row with its twin."""
    jobs = {"a": ("rmu", "on", "short", []), "b": ("rmu", "on", "full", ["relearn=full"]),
            "c": ("rmu", "paper", "short", ["ember=paper"]), "d": ("rmu_paper_llama", "on", "short",
                                                                    ["method=rmu_paper_llama"])}
    for name, (method, ember, relearn, overrides) in jobs.items():
        job = tmp_path / name
        _config(job, True, method="rmu", overrides=overrides)
        _choices(job, model="m", method=method, ember=ember, relearn=relearn)
        _stage(job / "A", "evaluate", {"efficacy": 0.1 * (ord(name) - 96)})
    build_report(tmp_path, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "report.csv")
    assert len(table) == 4 and (table["n"] == 1).all()
    got = {(r.method, r.ember, r.relearn): round(r.efficacy, 6) for r in table.itertuples()}
    assert got == {("rmu", "w/ EMBER", "short"): 0.1, ("rmu", "w/ EMBER", "full"): 0.2,
                   ("rmu", "w/ EMBER (paper)", "short"): 0.3, ("rmu_paper_llama", "w/ EMBER", "short"): 0.4}


def test_jobs_and_stages_that_never_finished_are_counted_and_named(tmp_path) -> None:
    """A job that failed before any concept ran, a concept it never reached, and a stage a kill left
    unwritten all count as failed and are named in the report; none vanishes."""
    dead = tmp_path / "dead"
    _config(dead, True)
    (dead / "job_status.json").write_text(json.dumps({"status": "failed", "error": "ConfigError: relearn"}))
    half = tmp_path / "half"
    _config(half, True)
    (half / "config.yaml").write_text((half / "config.yaml").read_text() + "stages: [baseline, evaluate, relearn]\n"
                                      "attacks: {enabled: []}\nrelearn: {name: full}\n")
    _stage(half / "Harry_Potter", "baseline", {})
    _stage(half / "Harry_Potter", "evaluate", {"efficacy": 0.5})  # relearn.json never written
    pd.DataFrame({"epoch": [0, 1], "qa_acc": [0.3, 0.6]}).to_csv(half / "Harry_Potter" / "relearn_curve.csv")
    (half / "results.json").write_text(json.dumps({"failures": {"Star Wars": "not run: ConfigError"}}))
    res = build_report(tmp_path, tmp_path / "out")
    rows = pd.read_csv(tmp_path / "out" / "rows.csv").fillna("")
    assert sorted(zip(rows.job, rows.concept, rows.failed_stages, strict=True)) == [
        ("dead", "-", "job"), ("half", "Harry_Potter", "relearn"), ("half", "Star_Wars", "job")]
    row = pd.read_csv(tmp_path / "out" / "report.csv").iloc[0]
    assert row.n == 1 and row.failed == 3 and row.efficacy == 0.5
    assert "half / Star_Wars: job" in res["markdown"] and "dead / -: job" in res["markdown"]
    assert not (tmp_path / "out" / "report_relearn.csv").exists()  # a curve without its record is no result
