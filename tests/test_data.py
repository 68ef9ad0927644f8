"""The release-format reader: validation names the file and key; option shuffling is deterministic."""

from __future__ import annotations

import json
import logging
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
        ("open_questions.json", lambda d: d["Baseball"]["QA_test"][2].update(aliases="Babe"),
         "Baseball.QA_test[2].aliases"),
        ("open_questions.json", lambda d: d["Baseball"]["QA_test"][2].update(aliases=["Babe", " "]),
         "Baseball.QA_test[2].aliases"),
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


# --------------------------------------------------------------------------------------------------
# audit fixes: loose key matching, hints, JSON quirks, repeated questions, preload


@pytest.fixture
def data_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """Warnings of ember.data, with its once-per-process memory cleared."""
    import ember.data

    monkeypatch.setattr(ember.data, "_WARNED", set())
    caplog.set_level(logging.WARNING, logger="ember.data")
    return caplog


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "ember.data")


def _starter_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "starter"
    shutil.copytree(STARTER_DIR, dst)
    return dst


def test_key_terms_lookup_ignores_case_and_spaces(tmp_path: Path, data_log) -> None:
    root = _starter_copy(tmp_path)
    terms = json.loads((root / "key_terms.json").read_text())
    hp = terms["Harry Potter"]
    _edit(root / "key_terms.json", lambda d: d.update({"harry potter ": d.pop("Harry Potter")}))
    assert ConceptStore(root).concept("Harry Potter").key_terms == hp
    assert _warnings(data_log) == ""


def test_key_terms_missing_entry_warns_with_the_keys(tmp_path: Path, data_log, release_dir: Path) -> None:
    root = _starter_copy(tmp_path)
    _edit(root / "key_terms.json", lambda d: d.update({"Hary Poter": d.pop("Harry Potter")}))
    assert ConceptStore(root).concept("Harry Potter").key_terms == ["Harry Potter"]
    msg = _warnings(data_log)
    assert "key_terms.json" in msg and "'Harry Potter'" in msg and "Star Wars" in msg and "Hary Poter" in msg
    # a store without key_terms.json (the release) keeps the concept's name, silently
    data_log.clear()
    assert ConceptStore(release_dir).concept("Baseball").key_terms == ["Baseball"]
    assert _warnings(data_log) == ""


def test_key_terms_keys_equal_up_to_case_are_rejected(tmp_path: Path) -> None:
    root = _starter_copy(tmp_path)
    _edit(root / "key_terms.json", lambda d: d.update({"HARRY POTTER": ["x"]}))
    with pytest.raises(DataError, match="key_terms.json: key 'HARRY POTTER'.*'Harry Potter'"):
        ConceptStore(root).concept("Harry Potter")


@pytest.mark.parametrize("fname, what", [("mc_questions.json", "no questions"),
                                         ("relearn_paragraphs.json", "no relearning paragraphs"),
                                         ("open_questions.json", "no open questions")])
def test_mismatched_concept_key_lists_keys_and_the_fix(tmp_path: Path, fname: str, what: str) -> None:
    root = _starter_copy(tmp_path)
    _edit(root / fname, lambda d: d.update({"Harry Potter ": d.pop("Harry Potter")}))
    with pytest.raises(DataError) as exc:
        ConceptStore(root).concept("Harry Potter")
    msg = str(exc.value)
    assert fname in msg and what in msg and "keys in the file: [" in msg and "'Star Wars'" in msg
    assert "'Harry Potter '" in msg and "rename it to 'Harry Potter'" in msg


def test_mismatched_concept_key_suggests_close_match(tmp_path: Path) -> None:
    root = _starter_copy(tmp_path)
    _edit(root / "mc_questions.json", lambda d: d.update({"Hary Potter": d.pop("Harry Potter")}))
    with pytest.raises(DataError, match="did you mean 'Hary Potter'"):
        ConceptStore(root).concept("Harry Potter")


def test_concept_without_open_questions_warns(tmp_path: Path, data_log) -> None:
    root = _starter_copy(tmp_path)
    _edit(root / "open_questions.json", lambda d: d.pop("Harry Potter"))
    assert ConceptStore(root).concept("Harry Potter").open == {}
    msg = _warnings(data_log)
    assert "open_questions.json" in msg and "'Harry Potter'" in msg and "Star Wars" in msg


def test_resolve_names_slugs_hints_and_other_set(release_dir: Path) -> None:
    from types import SimpleNamespace

    from ember.data import open_store

    store = ConceptStore(STARTER_DIR, label="the starter set")
    assert store.resolve_names(["harry_potter", " star  wars", "ANCIENT_EGYPT"]) == \
        ["Harry Potter", "Star Wars", "Ancient Egypt"]
    with pytest.raises(DataError, match="did you mean 'Harry Potter'"):
        store.resolve_names(["Hary Potter"])
    data = SimpleNamespace(starter_dir=str(STARTER_DIR), release_dir=str(release_dir), option_seed=42, neutral_seed=42)
    starter = open_store(SimpleNamespace(concepts=SimpleNamespace(source="starter"), data=data))
    with pytest.raises(DataError) as exc:
        starter.resolve_names(["baseball"])
    assert "release concept" in str(exc.value) and """concepts=release 'concepts.names=["Baseball"]'""" in str(exc.value)
    release = open_store(SimpleNamespace(concepts=SimpleNamespace(source="release"), data=data))
    with pytest.raises(DataError, match="starter concept.*concepts=starter"):
        release.resolve_names(["Star Wars"])
    with pytest.raises(DataError) as exc:
        release.resolve_names(["Quidditch"])
    assert "concepts=" not in str(exc.value)


def test_slug_form_is_not_guessed_when_ambiguous(tmp_path: Path) -> None:
    root = _starter_copy(tmp_path)
    _edit(root / "concept_sentences.json", lambda d: d.append({"concept": "Harry-Potter", "sentences": ["x"]}))
    store = ConceptStore(root)
    assert store.resolve_names(["harry potter"]) == ["Harry Potter"]
    with pytest.raises(DataError, match="unknown concept 'harry_potter'"):
        store.resolve_names(["harry_potter"])


def test_bom_is_accepted_and_json_lines_is_named(tmp_path: Path) -> None:
    root = _starter_copy(tmp_path)
    path = root / "mc_questions.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert ConceptStore(root).concept("Harry Potter").mc["QA_test"]
    sents = root / "concept_sentences.json"
    sents.write_text("\n".join(json.dumps(e) for e in json.loads(sents.read_text())) + "\n")
    with pytest.raises(DataError, match="concept_sentences.json: invalid JSON at line 2.*JSON Lines"):
        _ = ConceptStore(root).concept_names
    sents.write_text('[1, 2] 3')  # extra data on line 1 is not JSON Lines
    with pytest.raises(DataError) as exc:
        _ = ConceptStore(root).concept_names
    assert "JSON Lines" not in str(exc.value)


def test_repeated_question_is_named_and_keeps_ids_unique(tmp_path: Path, data_log) -> None:
    root = _starter_copy(tmp_path)

    def repeat(d):
        d["Harry Potter"]["QA_test"][7] = dict(d["Harry Potter"]["QA_test"][2])
    _edit(root / "mc_questions.json", repeat)
    qs = ConceptStore(root).concept("Harry Potter").mc["QA_test"]
    assert len({q.qid for q in qs}) == len(qs)
    msg = _warnings(data_log)
    assert "mc_questions.json" in msg and "Harry Potter.QA_test[7]" in msg and "split QA_test" in msg
    assert qs[2].qid in msg and "repeated question id" in msg


def test_train_test_leak_warns(tmp_path: Path, data_log) -> None:
    root = _starter_copy(tmp_path)

    def leak(d):
        d["Star Wars"]["QA_train"][0] = dict(d["Star Wars"]["QA_test"][3])
    _edit(root / "mc_questions.json", leak)
    ConceptStore(root).concept("Star Wars")
    msg = _warnings(data_log)
    assert "mc_questions.json" in msg and "'Star Wars'" in msg and "QA_test" in msg and "QA_train" in msg
    assert "leak" in msg


def test_shipped_and_release_data_load_cleanly(release_dir: Path, data_log) -> None:
    for root in (STARTER_DIR, release_dir):
        store = ConceptStore(root)
        store.preload(store.concept_names)
        for name in store.concept_names:
            c = store.concept(name)
            for split, qs in c.mc.items():
                assert len({q.qid for q in qs}) == len(qs), (root, name, split)
    # the release repeats one question text in Culture of Greece QA_train (both files): a warning, no error
    msg = _warnings(data_log)
    assert "Culture of Greece.QA_train[25]" in msg and "leak" not in msg and "key_terms" not in msg
    assert "ember-release" in msg and str(STARTER_DIR) not in msg


@pytest.mark.parametrize("fname, bad", [
    ("neutral_sentences.json", [{"title": "x"}]),
    ("general_text.json", ["ok", 3]),
    ("heldout_text.json", {"not": "a list"}),
    ("instructions.json", []),
    ("control_facts.json", [{"q": "Q?", "correct_answer": "a", "options": ["b", "c"]}]),
])
def test_preload_reads_every_lazy_file(tmp_path: Path, fname: str, bad) -> None:
    root = _starter_copy(tmp_path)
    (root / fname).write_text(json.dumps(bad))
    store = ConceptStore(root)
    store.concept("Harry Potter")  # what preflight read before: passes
    with pytest.raises(DataError, match=fname):
        store.preload(["Harry Potter"])


def test_preload_reads_the_named_concepts(tmp_path: Path) -> None:
    root = _starter_copy(tmp_path)
    _edit(root / "mc_questions.json", lambda d: d["Star Wars"].pop("QA_test"))
    ConceptStore(root).preload(["Harry Potter"])
    with pytest.raises(DataError, match="Star Wars.QA_test"):
        ConceptStore(root).preload(["Harry Potter", "Star Wars"])
