"""The selection study's resume: a point counts only for the data it was measured on."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("ember_selection_study", ROOT / "experiments" / "selection_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_a_point_is_redone_and_dropped_from_the_report_when_its_data_changed(tmp_path: Path) -> None:
    study = _study()
    path = tmp_path / "points.jsonl"
    rows = [{"key": "m|starter:A|naive_zero", "concept": "starter:A", "data": "old", "v": 1},
            {"key": "m|starter:A|naive_mean", "concept": "starter:A", "v": 2},  # written before points had tags
            {"key": "m|starter:B|naive_zero", "concept": "starter:B", "data": "b1", "v": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    points = study.Points(path)
    assert not points.done("m|starter:A|naive_zero", "new") and points.done("m|starter:B|naive_zero", "b1")
    assert not points.done("m|starter:A|naive_mean", "new")
    points.add({"key": "m|starter:A|naive_zero", "concept": "starter:A", "data": "new", "v": 4})
    assert points.done("m|starter:A|naive_zero", "new")
    reread = study.Points(path)  # the appended row wins on the next start too
    kept = study.current_rows(reread.rows, {"starter:A": "new", "starter:B": "b1"})
    assert sorted(r["v"] for r in kept) == [3, 4]


def test_the_data_tag_follows_every_text_a_point_reads(tmp_path: Path) -> None:
    study = _study()
    root = tmp_path / "starter"
    shutil.copytree(study.STARTER, root)

    def tag() -> str:
        starter = study.ConceptStore(root, label="copy")
        return study.concept_ref("starter", "Harry Potter", starter, starter).data_tag()

    first = tag()
    assert tag() == first
    facts = json.loads((root / "control_facts.json").read_text())
    facts[0]["correct_answer"], facts[0]["options"] = facts[0]["options"][1], facts[0]["options"][::-1]
    (root / "control_facts.json").write_text(json.dumps(facts))
    second = tag()
    assert second != first  # a control fact is part of every concept's specificity
    general = json.loads((root / "general_text.json").read_text())
    (root / "general_text.json").write_text(json.dumps(general[1:]))  # the general background lost a sentence
    assert tag() != second


def test_report_only_without_points_leaves_the_committed_tables_alone(tmp_path: Path, monkeypatch) -> None:
    """A fresh clone has no outputs/study: --report-only used to rewrite docs/study as empty tables."""
    import pytest

    study = _study()
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("the committed tables\n")
    monkeypatch.setattr(study, "OUT", tmp_path / "outputs")
    monkeypatch.setattr(study, "DOCS", docs)
    with pytest.raises(SystemExit, match="nothing to report"):
        study.main(["--report-only"])
    assert (docs / "results.md").read_text() == "the committed tables\n" and not (docs / "points.csv").exists()
