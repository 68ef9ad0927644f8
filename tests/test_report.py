"""The report's attack and relearning tables, from hand-written job directories."""

from __future__ import annotations

import json

import pandas as pd

from ember.report import build_report


def _job(root, name: str, ember: bool, attacks: dict[str, tuple[float, float, float]], curve: list[float]) -> None:
    job = root / name
    concept = job / "Harry_Potter"
    concept.mkdir(parents=True)
    (job / "config.yaml").write_text(f"model: {{name: m}}\nmethod: {{name: rmu}}\nember: {{enabled: {str(ember).lower()}}}\nseed: 1\n")
    (job / "meta.json").write_text("{}")
    (concept / "evaluate.json").write_text(json.dumps({"status": "complete", "metrics": {"efficacy": 0.5},
                                                       "scores": {"qa_acc": 0.4}}))
    metrics = {}
    for a, (acc, ctrl, rec) in attacks.items():
        metrics.update({f"{a}_acc": acc, f"{a}_control_acc": ctrl, f"{a}_recovered": rec})
    (concept / "attacks.json").write_text(json.dumps({"status": "complete", "metrics": metrics}))
    pd.DataFrame({"epoch": range(len(curve)), "qa_acc": curve, "retain_acc": [0.8] * len(curve)}).to_csv(
        concept / "relearn_curve.csv", index=False)


def test_attack_and_relearning_tables(tmp_path) -> None:
    _job(tmp_path, "off", False, {"jailbreak": (0.6, 0.95, 0.4), "gcg": (0.5, 0.8, 0.2)}, [0.4, 0.6, 0.7])
    _job(tmp_path, "on", True, {"jailbreak": (0.45, 0.95, 0.1)}, [0.4, 0.45, 0.5])
    res = build_report(tmp_path, tmp_path / "out")
    att = pd.read_csv(tmp_path / "out" / "report_attacks.csv")
    assert len(att) == 3  # (off: gcg, jailbreak), (on: jailbreak)
    row = att[(att.ember == "w/ EMBER") & (att.attack == "jailbreak")].iloc[0]
    assert (row.accuracy, row.control, row.erased, row.recovered) == (0.45, 0.95, 0.4, 0.1)
    rel = pd.read_csv(tmp_path / "out" / "report_relearn.csv")
    assert len(rel) == 6  # one row per (job, epoch)
    assert rel[rel.ember == "w/o EMBER"].sort_values("epoch").qa_acc.tolist() == [0.4, 0.6, 0.7]
    assert "Relearning curves" in res["markdown"] and "Attacks" in res["markdown"]
