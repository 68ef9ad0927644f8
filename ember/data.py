"""Concept data: the release-format reader, the shipped starter set, splits, option shuffling.

Both the paper's release (``data.release_dir``) and the starter set shipped in
``ember/data/starter`` use the release schema (../shared/ember-release/PROVENANCE.md). Every file
is validated on read; a problem raises :class:`DataError` naming the file and the key. Options of
multiple-choice questions are shuffled deterministically per question (the raw files list the
correct answer first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ember.errors import DataError

MC_SPLITS = ("QA_train", "QA_test", "SimdomQA_train", "SimdomQA_test")


@dataclass(frozen=True)
class MCQuestion:
    qid: str
    q: str
    options: tuple[str, ...]  # shuffled
    answer: int  # index of the correct option in ``options``

    @property
    def correct_answer(self) -> str:
        return self.options[self.answer]


@dataclass(frozen=True)
class OpenQuestion:
    qid: str
    q: str
    a: str


@dataclass
class ConceptData:
    name: str
    sentences: list[str]
    mc: dict[str, list[MCQuestion]]
    open: dict[str, list[OpenQuestion]]
    relearn: list[str]
    key_terms: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return slugify(self.name)

    def fingerprint(self) -> str:
        """A digest of everything the concept holds (questions with their shuffled options, paragraphs,
        key terms): part of the cache key of anything computed from it."""
        return hashlib.sha256(repr(dataclasses.astuple(self)).encode()).hexdigest()[:16]

    def stats(self) -> dict[str, int]:
        out = {"sentences": len(self.sentences), "relearn_paragraphs": len(self.relearn),
               "key_terms": len(self.key_terms)}
        out.update({f"mc/{k}": len(v) for k, v in self.mc.items()})
        out.update({f"open/{k}": len(v) for k, v in self.open.items()})
        return out


def slugify(name: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in name)
    while "__" in out:
        out = out.replace("__", "_")
    return out.strip("_")


def question_id(concept: str, split: str, q: str) -> str:
    return hashlib.sha1(f"{concept}\x1f{split}\x1f{q}".encode()).hexdigest()[:12]


def shuffle_options(qid: str, correct: str, options: list[str], seed: int) -> tuple[tuple[str, ...], int]:
    """Deterministic per-question permutation from (seed, question id)."""
    rng = random.Random(f"{seed}:{qid}")
    perm = list(range(len(options)))
    rng.shuffle(perm)
    shuffled = tuple(options[i] for i in perm)
    return shuffled, shuffled.index(correct)


# --------------------------------------------------------------------------------------------------
# validated JSON reading


def _read_json(path: Path) -> Any:
    if not path.exists():
        raise DataError(f"{path}: file not found (check data.release_dir / data.starter_dir)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start}); re-save the file as UTF-8") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc


def _expect(cond: bool, path: Path, key: str, what: str) -> None:
    if not cond:
        raise DataError(f"{path}: key '{key}': {what}")


def _str_list(value: Any, path: Path, key: str, min_len: int = 1) -> list[str]:
    _expect(isinstance(value, list), path, key, f"expected a list of strings, got {type(value).__name__}")
    _expect(len(value) >= min_len, path, key, f"expected at least {min_len} entries, got {len(value)}")
    for i, v in enumerate(value):
        _expect(isinstance(v, str) and v.strip() != "", path, f"{key}[{i}]", "expected a non-empty string")
    return list(value)


def _mc_items(items: Any, path: Path, key: str, concept: str, split: str, seed: int) -> list[MCQuestion]:
    _expect(isinstance(items, list), path, key, f"expected a list of questions, got {type(items).__name__}")
    _expect(len(items) > 0, path, key, "the split is empty")
    out = []
    for i, it in enumerate(items):
        k = f"{key}[{i}]"
        _expect(isinstance(it, dict), path, k, "expected an object with 'q', 'correct_answer', 'options'")
        for f_ in ("q", "correct_answer", "options"):
            _expect(f_ in it, path, f"{k}.{f_}", "missing")
        _expect(isinstance(it["q"], str) and it["q"].strip(), path, f"{k}.q", "expected a non-empty string")
        _expect(isinstance(it["correct_answer"], str), path, f"{k}.correct_answer", "expected a string")
        opts = it["options"]
        _expect(isinstance(opts, list) and len(opts) >= 2 and all(isinstance(o, str) for o in opts),
                path, f"{k}.options", "expected a list of at least 2 strings")
        _expect(it["correct_answer"] in opts, path, f"{k}.options",
                f"does not contain the correct answer {it['correct_answer']!r}")
        _expect(len(set(opts)) == len(opts), path, f"{k}.options", "options must be distinct")
        qid = question_id(concept, split, it["q"])
        shuffled, ans = shuffle_options(qid, it["correct_answer"], list(opts), seed)
        out.append(MCQuestion(qid=qid, q=it["q"], options=shuffled, answer=ans))
    return out


def _open_items(items: Any, path: Path, key: str, concept: str, split: str) -> list[OpenQuestion]:
    _expect(isinstance(items, list), path, key, "expected a list of {q, a}")
    _expect(len(items) > 0, path, key, "the split is empty")
    out = []
    for i, it in enumerate(items):
        k = f"{key}[{i}]"
        _expect(isinstance(it, dict) and isinstance(it.get("q"), str) and isinstance(it.get("a"), str),
                path, k, "expected an object with string fields 'q' and 'a'")
        out.append(OpenQuestion(qid=question_id(concept, split, it["q"]), q=it["q"], a=it["a"]))
    return out


# --------------------------------------------------------------------------------------------------
# a data directory in the release schema


class ConceptStore:
    """A directory in the release schema (the paper's release or the shipped starter set)."""

    def __init__(self, root: str | Path, option_seed: int = 42, neutral_seed: int = 42, label: str = "data"):
        self.root = Path(root).expanduser()
        self.option_seed = option_seed
        self.neutral_seed = neutral_seed
        self.label = label
        if not self.root.is_dir():
            raise DataError(
                f"{self.root}: concept data directory not found. Set data.release_dir=/path/to/ember-release "
                "(the paper's data) or use concepts=starter (shipped with the package)."
            )

    def _file(self, name: str) -> Path:
        return self.root / name

    @cached_property
    def _sentences(self) -> dict[str, list[str]]:
        path = self._file("concept_sentences.json")
        raw = _read_json(path)
        _expect(isinstance(raw, list), path, "<root>", "expected a list of {concept, sentences}")
        out: dict[str, list[str]] = {}
        for i, entry in enumerate(raw):
            _expect(isinstance(entry, dict), path, f"[{i}]", "expected an object")
            _expect(isinstance(entry.get("concept"), str), path, f"[{i}].concept", "missing or not a string")
            out[entry["concept"]] = _str_list(entry.get("sentences"), path, f"[{i}].sentences")
        return out

    @property
    def concept_names(self) -> list[str]:
        return list(self._sentences)

    def resolve_names(self, names: list[str]) -> list[str]:
        """Check requested concept names exist; an empty request means every concept found."""
        known = self.concept_names
        if not names:
            return known
        lower = {k.lower(): k for k in known}
        out = []
        for n in names:
            if n in known:
                out.append(n)
            elif n.lower() in lower:
                out.append(lower[n.lower()])
            else:
                raise DataError(
                    f"concepts.names: unknown concept {n!r} in {self.label} ({self.root}); known: {known}"
                )
        return out

    @cached_property
    def neutral(self) -> list[str]:
        """Neutral sentences, permuted with a seeded ``random.Random(seed).sample`` as the reference."""
        path = self._file("neutral_sentences.json")
        raw = _read_json(path)
        _expect(isinstance(raw, list) and raw, path, "<root>", "expected a non-empty list of {title, sentence}")
        sents = []
        for i, it in enumerate(raw):
            _expect(isinstance(it, dict) and isinstance(it.get("sentence"), str) and it["sentence"].strip(),
                    path, f"[{i}].sentence", "missing or not a non-empty string")
            sents.append(it["sentence"])
        return random.Random(self.neutral_seed).sample(sents, len(sents))

    @cached_property
    def _mc(self) -> dict[str, Any]:
        path = self._file("mc_questions.json")
        raw = _read_json(path)
        _expect(isinstance(raw, dict), path, "<root>", "expected {concept: {split: [questions]}}")
        return raw

    @cached_property
    def _open(self) -> dict[str, Any]:
        path = self._file("open_questions.json")
        if not path.exists():
            return {}
        raw = _read_json(path)
        _expect(isinstance(raw, dict), path, "<root>", "expected {concept: {split: [questions]}}")
        return raw

    @cached_property
    def _relearn(self) -> dict[str, Any]:
        path = self._file("relearn_paragraphs.json")
        raw = _read_json(path)
        _expect(isinstance(raw, dict), path, "<root>", "expected {concept: {RelearnParagraphs: [str]}}")
        return raw

    @cached_property
    def _key_terms(self) -> dict[str, list[str]]:
        path = self._file("key_terms.json")
        if not path.exists():
            return {}
        raw = _read_json(path)
        _expect(isinstance(raw, dict), path, "<root>", "expected {concept: [terms]}")
        return {k: _str_list(v, path, k) for k, v in raw.items()}

    def concept(self, name: str) -> ConceptData:
        if name not in self._sentences:
            raise DataError(f"concepts.names: unknown concept {name!r} in {self.root}; known: {self.concept_names}")
        mc_path = self._file("mc_questions.json")
        _expect(name in self._mc, mc_path, name, "no questions for this concept")
        entry = self._mc[name]
        _expect(isinstance(entry, dict), mc_path, name, "expected {split: [questions]}")
        mc = {}
        for split in MC_SPLITS:
            _expect(split in entry, mc_path, f"{name}.{split}", "missing split")
            mc[split] = _mc_items(entry[split], mc_path, f"{name}.{split}", name, split, self.option_seed)
        open_q: dict[str, list[OpenQuestion]] = {}
        if name in self._open:
            op_path = self._file("open_questions.json")
            _expect(isinstance(self._open[name], dict), op_path, name, "expected {split: [questions]}")
            for split in MC_SPLITS:
                _expect(split in self._open[name], op_path, f"{name}.{split}", "missing split")
                open_q[split] = _open_items(self._open[name][split], op_path, f"{name}.{split}", name, split)
        rl_path = self._file("relearn_paragraphs.json")
        _expect(name in self._relearn, rl_path, name, "no relearning paragraphs for this concept")
        _expect(isinstance(self._relearn[name], dict), rl_path, name, "expected {RelearnParagraphs: [str]}")
        _expect("RelearnParagraphs" in self._relearn[name], rl_path, f"{name}.RelearnParagraphs", "missing")
        relearn = _str_list(self._relearn[name].get("RelearnParagraphs"), rl_path, f"{name}.RelearnParagraphs")
        return ConceptData(
            name=name, sentences=self._sentences[name], mc=mc, open=open_q, relearn=relearn,
            key_terms=self._key_terms.get(name, [name]),
        )

    def all_sentences_except(self, name: str) -> list[str]:
        return [s for k, v in self._sentences.items() if k != name for s in v]

    @cached_property
    def instructions(self) -> list[str]:
        path = self._file("instructions.json")
        return _str_list(_read_json(path), path, "<root>") if path.exists() else []

    @cached_property
    def control_facts(self) -> list[MCQuestion]:
        path = self._file("control_facts.json")
        if not path.exists():
            return []
        return _mc_items(_read_json(path), path, "<root>", "control", "control", self.option_seed)

    @cached_property
    def general_text(self) -> list[str]:
        path = self._file("general_text.json")
        return _str_list(_read_json(path), path, "<root>") if path.exists() else []

    @cached_property
    def heldout_text(self) -> list[str]:
        """General text that nothing is fitted on (the perplexity term of retention reads it)."""
        path = self._file("heldout_text.json")
        return _str_list(_read_json(path), path, "<root>") if path.exists() else []


def background_sentences(kinds: Sequence[str], store: ConceptStore, starter: ConceptStore, concept: str) -> list[str]:
    """The factorization's background (``ember.background``): ``neutral`` (the store's neutral sentences),
    ``other_concepts`` (every other concept's sentences), ``general`` (the starter set's general text)."""
    out: list[str] = []
    for kind in kinds:
        if kind == "neutral":
            out += store.neutral
        elif kind == "other_concepts":
            out += store.all_sentences_except(concept)
        elif kind == "general":
            out += starter.general_text
    return out


def open_store(cfg: Any) -> ConceptStore:
    """The store that ``concepts.source`` names (starter or release)."""
    if cfg.concepts.source == "starter":
        return ConceptStore(cfg.data.starter_dir, cfg.data.option_seed, cfg.data.neutral_seed, label="the starter set")
    return ConceptStore(cfg.data.release_dir, cfg.data.option_seed, cfg.data.neutral_seed, label="data.release_dir")


def starter_store(cfg: Any) -> ConceptStore:
    """The shipped starter set (instructions and control facts come from here for every source)."""
    return ConceptStore(cfg.data.starter_dir, cfg.data.option_seed, cfg.data.neutral_seed, label="the starter set")
