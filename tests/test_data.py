"""The release-format reader: validation names the file and key; option shuffling is deterministic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ember.data import MC_SPLITS, ConceptStore, shuffle_options
from ember.errors import DataError
from ember.paths import STARTER_DIR


def test_release_reader_reads_every_concept(release_dir: Path) -> None:
    store = ConceptStore(release_dir)
    assert len(store.concept_names) == 14
    hp = store.concept("Harry Potter")
    assert len(hp.sentences) == 300
    assert all(len(hp.mc[s]) == 50 for s in MC_SPLITS)
    assert len(store.neutral) == 300
    assert len(hp.relearn) > 100


def test_unknown_concept_is_named(release_dir: Path) -> None:
    store = ConceptStore(release_dir)
    with pytest.raises(DataError, match="Quidditch"):
        store.resolve_names(["Quidditch"])
    assert store.resolve_names(["harry potter"]) == ["Harry Potter"]
    assert store.resolve_names([]) == store.concept_names


def test_shuffle_is_deterministic_and_not_always_raw(release_dir: Path) -> None:
    a = ConceptStore(release_dir).concept("Baseball").mc["QA_test"]
    b = ConceptStore(release_dir).concept("Baseball").mc["QA_test"]
    assert [q.options for q in a] == [q.options for q in b]
    positions = [q.answer for q in a]
    assert len(set(positions)) == 4, "the correct answer should land in every position"
    assert sum(p == 0 for p in positions) < len(positions) / 2
    c = ConceptStore(release_dir, option_seed=7).concept("Baseball").mc["QA_test"]
    assert [q.options for q in a] != [q.options for q in c]
    opts, ans = shuffle_options("x", "right", ["right", "w1", "w2", "w3"], 42)
    assert opts[ans] == "right" and sorted(opts) == sorted(["right", "w1", "w2", "w3"])


def _copy(release_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "rel"
    shutil.copytree(release_dir, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    dst.chmod(0o755)
    return dst


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "fname, mutate, expect",
    [
        ("mc_questions.json", lambda d: d["Baseball"].pop("QA_test"), "Baseball.QA_test"),
        ("mc_questions.json", lambda d: d["Baseball"]["QA_train"][3].pop("options"), "Baseball.QA_train[3].options"),
        ("mc_questions.json", lambda d: d["Baseball"]["QA_train"][5].update(options=["a", "b", "c", "d"]), "does not contain the correct answer"),
        ("mc_questions.json", lambda d: d["Baseball"].update(QA_train=[]), "empty"),
        ("mc_questions.json", lambda d: d["Baseball"]["QA_train"][0].update(q=17), "Baseball.QA_train[0].q"),
        ("relearn_paragraphs.json", lambda d: d.pop("Baseball"), "relearn_paragraphs.json: key 'Baseball'"),
        ("concept_sentences.json", lambda d: d[0].update(sentences="oops"), "[0].sentences"),
        ("neutral_sentences.json", lambda d: d[4].pop("sentence"), "[4].sentence"),
    ],
)
def test_malformed_files_name_file_and_key(release_dir: Path, tmp_path: Path, fname, mutate, expect) -> None:
    root = _copy(release_dir, tmp_path)
    _edit(root / fname, mutate)
    store = ConceptStore(root)
    with pytest.raises(DataError) as exc:
        store.concept("Baseball")
        _ = store.neutral
    msg = str(exc.value)
    assert fname in msg and expect in msg


def test_non_utf8_and_bad_json_are_named(release_dir: Path, tmp_path: Path) -> None:
    root = _copy(release_dir, tmp_path)
    (root / "mc_questions.json").write_bytes(b'{"x": "\xff\xfe"}')
    with pytest.raises(DataError, match="mc_questions.json: not valid UTF-8"):
        ConceptStore(root).concept("Baseball")
    (root / "mc_questions.json").write_text('{"x": [1, 2')
    with pytest.raises(DataError, match="mc_questions.json: invalid JSON at line 1"):
        ConceptStore(root).concept("Baseball")


def test_missing_directory_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.release_dir"):
        ConceptStore(tmp_path / "nope")


def test_starter_set_meets_its_sizes() -> None:
    store = ConceptStore(STARTER_DIR)
    names = store.concept_names
    assert "Harry Potter" in names and len(names) >= 3
    for name in names:
        c = store.concept(name)
        assert len(c.sentences) >= 150, name
        assert all(len(c.mc[s]) >= 40 for s in MC_SPLITS), name
        assert all(len(c.open[s]) >= 40 for s in MC_SPLITS), name
        assert len(c.relearn) >= 40, name
        assert len(c.key_terms) >= 5, name
    assert len(store.neutral) >= 150
    assert len(store.instructions) >= 60
    assert len(store.control_facts) >= 40
