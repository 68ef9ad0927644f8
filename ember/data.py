"""Concept data: the release-format reader, the shipped starter set, splits, option shuffling.

Both the paper's release (``data.release_dir``) and the starter set shipped in
``ember/data/starter`` use the release schema (../shared/ember-release/PROVENANCE.md). Every file
is validated on read; a problem raises :class:`DataError` naming the file and the key. Options of
multiple-choice questions are shuffled deterministically per question (the raw files list the
correct answer first).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ember.errors import DataError

log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def _warn_once(msg: str, *args: Any) -> None:
    """Log a data warning once per process (a concept is read by preflight, preload and the stages)."""
    text = msg % args if args else msg
    if text not in _WARNED:
        _WARNED.add(text)
        log.warning("%s", text)

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
    aliases: tuple[str, ...] = ()  # other accepted wordings of ``a`` (optional ``aliases`` in the file)

    @property
    def answers(self) -> tuple[str, ...]:
        """Every accepted answer: ``a`` first, then its aliases."""
        return (self.a, *self.aliases)


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


def _match_name(name: str, known: Sequence[str]) -> str | None:
    """The known concept ``name`` means: exact, else equal up to case and spaces, else the one concept
    whose slug matches case-insensitively (``harry_potter``); None when none (or several) match."""
    if name in known:
        return name
    for key in (_norm, lambda s: slugify(s).casefold()):
        hits = [k for k in known if key(k) == key(name)]
        if len(hits) == 1:
            return hits[0]
    return None


def slugify(name: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in name)
    while "__" in out:
        out = out.replace("__", "_")
    return out.strip("_")


def question_id(concept: str, split: str, q: str, repeat: int = 0) -> str:
    """The id of a question: a digest of (concept, split, text). ``repeat`` > 0 marks the n-th later
    occurrence of the same text in one split, so that it still gets an id of its own."""
    key = f"{concept}\x1f{split}\x1f{q}" + (f"\x1f{repeat}" if repeat else "")
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def _norm(name: str) -> str:
    """A key or name compared loosely: case-folded, inner whitespace collapsed, ends stripped."""
    return " ".join(name.split()).casefold()


def _close(name: str, keys: Iterable[str]) -> list[str]:
    """Keys that look like ``name``: equal up to case and spaces first, then difflib's close matches."""
    keys = list(keys)
    same = [k for k in keys if _norm(k) == _norm(name) or slugify(k).casefold() == slugify(name).casefold()]
    if same:
        return same
    by_norm: dict[str, list[str]] = {}
    for k in keys:
        by_norm.setdefault(_norm(k), []).append(k)
    return [k for m in difflib.get_close_matches(_norm(name), list(by_norm), n=3, cutoff=0.6) for k in by_norm[m]]


def _hint(name: str, keys: Iterable[str], in_file: bool = True) -> str:
    """``; did you mean ...?`` for the keys that look like ``name`` (empty when none does); for a key of a
    data file (``in_file``) that differs only in case or spaces, the rename that fixes it."""
    near = _close(name, keys)
    if not near:
        return ""
    if in_file and len(near) == 1 and _norm(near[0]) == _norm(name) and near[0] != name:
        return f"; the key {near[0]!r} differs from {name!r} only in case or spaces: rename it to {name!r}"
    return "; did you mean " + " or ".join(repr(k) for k in near) + "?"


def _missing_key(path: Path, name: str, keys: Iterable[str], what: str) -> DataError:
    keys = list(keys)
    return DataError(f"{path}: key {name!r}: {what}; keys in the file: {keys}{_hint(name, keys)}")


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
        text = path.read_bytes().decode("utf-8-sig")  # a leading byte-order mark is harmless: accept it
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start}); re-save the file as UTF-8") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        msg = f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        if exc.msg == "Extra data" and exc.lineno >= 2:
            msg += ("; this looks like JSON Lines (one document per line): the release schema wants one JSON "
                    "document (wrap the records in a list [...] separated by commas)")
        raise DataError(msg) from exc


def _expect(cond: bool, path: Path, key: str, what: str) -> None:
    if not cond:
        raise DataError(f"{path}: key '{key}': {what}")


def _str_list(value: Any, path: Path, key: str, min_len: int = 1) -> list[str]:
    _expect(isinstance(value, list), path, key, f"expected a list of strings, got {type(value).__name__}")
    _expect(len(value) >= min_len, path, key, f"expected at least {min_len} entries, got {len(value)}")
    for i, v in enumerate(value):
        _expect(isinstance(v, str) and v.strip() != "", path, f"{key}[{i}]", "expected a non-empty string")
    return list(value)


def _qid(seen: dict[str, int], path: Path, key: str, concept: str, split: str, q: str, i: int) -> str:
    """The question's id; a text already seen in this split is reported and gets an id of its own
    (ids key per-question rows and predictions, so two questions must never share one)."""
    n = seen.get(q, 0)
    seen[q] = n + 1
    qid = question_id(concept, split, q, n)
    if n:
        _warn_once("%s: key '%s[%d]': repeated question id %s in split %s: the text %r occurs %d times; "
                    "this occurrence is kept under id %s, but the split holds the question more than once: "
                    "drop or reword the repeat", path, key, i, question_id(concept, split, q), split, q, n + 1, qid)
    return qid


def _mc_items(items: Any, path: Path, key: str, concept: str, split: str, seed: int) -> list[MCQuestion]:
    _expect(isinstance(items, list), path, key, f"expected a list of questions, got {type(items).__name__}")
    _expect(len(items) > 0, path, key, "the split is empty")
    out = []
    seen: dict[str, int] = {}
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
        qid = _qid(seen, path, key, concept, split, it["q"], i)
        shuffled, ans = shuffle_options(qid, it["correct_answer"], list(opts), seed)
        out.append(MCQuestion(qid=qid, q=it["q"], options=shuffled, answer=ans))
    return out


def _open_items(items: Any, path: Path, key: str, concept: str, split: str) -> list[OpenQuestion]:
    _expect(isinstance(items, list), path, key, "expected a list of {q, a}")
    _expect(len(items) > 0, path, key, "the split is empty")
    out = []
    seen: dict[str, int] = {}
    for i, it in enumerate(items):
        k = f"{key}[{i}]"
        _expect(isinstance(it, dict) and isinstance(it.get("q"), str) and isinstance(it.get("a"), str),
                path, k, "expected an object with string fields 'q' and 'a'")
        aliases = it.get("aliases", [])
        _expect(isinstance(aliases, list) and all(isinstance(x, str) and x.strip() for x in aliases),
                path, f"{k}.aliases", "expected a list of non-empty strings (other accepted wordings of 'a')")
        out.append(OpenQuestion(qid=_qid(seen, path, key, concept, split, it["q"], i), q=it["q"], a=it["a"],
                                aliases=tuple(aliases)))
    return out


def _warn_leak(path: Path, concept: str, train: Sequence[MCQuestion | OpenQuestion],
               test: Sequence[MCQuestion | OpenQuestion]) -> None:
    """Warn when a question of QA_test also appears (up to case and spaces) in QA_train."""
    seen = {_norm(q.q) for q in train}
    both = [q.q for q in test if _norm(q.q) in seen]
    if both:
        _warn_once("%s: key '%s': %d question(s) of QA_test also appear in QA_train (train/test leak: the "
                    "training split fits on what the test split scores), e.g. %r; remove them from one split",
                    path, concept, len(both), both[0])


# --------------------------------------------------------------------------------------------------
# a data directory in the release schema


class ConceptStore:
    """A directory in the release schema (the paper's release or the shipped starter set)."""

    def __init__(self, root: str | Path, option_seed: int = 42, neutral_seed: int = 42, label: str = "data",
                 other_sets: Sequence[tuple[str, str | Path]] = ()):
        """``other_sets``: (``concepts.source`` value, directory) of the other concept sets, so that a name
        unknown here but found there gets a hint to switch source (``open_store`` passes them)."""
        self.root = Path(root).expanduser()
        self.option_seed = option_seed
        self.neutral_seed = neutral_seed
        self.label = label
        self.other_sets = [(src, Path(d).expanduser()) for src, d in other_sets]
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
        """Check requested concept names exist; an empty request means every concept found.

        A name matches exactly, else up to case and spaces, else as a slug (``harry_potter``) when exactly
        one concept has that slug. An unknown name fails with close matches and, when another concept
        set (``other_sets``) has it, the override that selects that set."""
        known = self.concept_names
        if not names:
            return known
        out = []
        for n in names:
            match = _match_name(n, known)
            if match is None:
                raise DataError(f"concepts.names: unknown concept {n!r} in {self.label} ({self.root}); "
                                f"known: {known}{_hint(n, known, False)}{self._other_set_hint(n)}")
            out.append(match)
        return out

    def _other_set_hint(self, name: str) -> str:
        for source, root in self.other_sets:
            if root.resolve() == self.root.resolve() or not (root / "concept_sentences.json").is_file():
                continue
            try:
                match = _match_name(name, ConceptStore(root).concept_names)
            except DataError:  # the other set is unreadable: no hint, its own run will say why
                continue
            if match is not None:
                return (f"; {match!r} is a {source} concept ({root}): use "
                        f"concepts={source} 'concepts.names=[\"{match}\"]'")
        return ""

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
        """{concept: terms}; empty when the store has no ``key_terms.json`` (the release has none)."""
        path = self._file("key_terms.json")
        if not path.exists():
            return {}
        raw = _read_json(path)
        _expect(isinstance(raw, dict), path, "<root>", "expected {concept: [terms]}")
        by_norm: dict[str, str] = {}
        for k in raw:
            _expect(k.strip() != "", path, k, "empty concept name")
            _expect(_norm(k) not in by_norm, path, k,
                    f"the same concept as key {by_norm.get(_norm(k))!r} (keys differ only in case or spaces): keep one")
            by_norm[_norm(k)] = k
        return {k: _str_list(v, path, k) for k, v in raw.items()}

    def key_terms(self, name: str) -> list[str]:
        """The concept's key terms from ``key_terms.json`` (keys compared up to case and spaces); ``[name]``
        when the store has no such file, and with a warning when the file has no entry for the concept."""
        terms = self._key_terms
        if name in terms:
            return terms[name]
        for k, v in terms.items():
            if _norm(k) == _norm(name):
                return v
        path = self._file("key_terms.json")
        if not path.exists():
            return [name]
        _warn_once("%s: no key terms for concept %r (keys in the file: %s%s); using [%r] alone, which weakens "
                   "the key-term fallbacks (anchor selector, token-evasion attack): add an entry", path, name,
                   list(terms), _hint(name, terms), name)
        return [name]

    def concept(self, name: str) -> ConceptData:
        if name not in self._sentences:
            raise DataError(f"concepts.names: unknown concept {name!r} in {self.root}; known: "
                            f"{self.concept_names}{_hint(name, self.concept_names, False)}")
        mc_path = self._file("mc_questions.json")
        if name not in self._mc:
            raise _missing_key(mc_path, name, self._mc, "no questions for this concept")
        entry = self._mc[name]
        _expect(isinstance(entry, dict), mc_path, name, "expected {split: [questions]}")
        mc = {}
        for split in MC_SPLITS:
            _expect(split in entry, mc_path, f"{name}.{split}", "missing split")
            mc[split] = _mc_items(entry[split], mc_path, f"{name}.{split}", name, split, self.option_seed)
        _warn_leak(mc_path, name, mc["QA_train"], mc["QA_test"])
        open_q: dict[str, list[OpenQuestion]] = {}
        op_path = self._file("open_questions.json")
        if name in self._open:
            _expect(isinstance(self._open[name], dict), op_path, name, "expected {split: [questions]}")
            for split in MC_SPLITS:
                _expect(split in self._open[name], op_path, f"{name}.{split}", "missing split")
                open_q[split] = _open_items(self._open[name][split], op_path, f"{name}.{split}", name, split)
            _warn_leak(op_path, name, open_q["QA_train"], open_q["QA_test"])
        elif self._open:
            near = [k for k in _close(name, self._open) if _norm(k) == _norm(name)]
            if near:  # a key that differs only in case or spaces is a typo, not a concept without open questions
                raise _missing_key(op_path, name, self._open, "no open questions for this concept")
            _warn_once("%s: no open questions for concept %r (keys in the file: %s%s); open QA is skipped for it",
                       op_path, name, list(self._open), _hint(name, self._open))
        rl_path = self._file("relearn_paragraphs.json")
        if name not in self._relearn:
            raise _missing_key(rl_path, name, self._relearn, "no relearning paragraphs for this concept")
        _expect(isinstance(self._relearn[name], dict), rl_path, name, "expected {RelearnParagraphs: [str]}")
        _expect("RelearnParagraphs" in self._relearn[name], rl_path, f"{name}.RelearnParagraphs", "missing")
        relearn = _str_list(self._relearn[name].get("RelearnParagraphs"), rl_path, f"{name}.RelearnParagraphs")
        return ConceptData(
            name=name, sentences=self._sentences[name], mc=mc, open=open_q, relearn=relearn,
            key_terms=self.key_terms(name),
        )

    def preload(self, names: Sequence[str] = ()) -> None:
        """Read and validate every file the pipeline will read from this store for ``names`` (resolved
        names; ``()`` for just the concept-independent files): the concepts' sentences, questions,
        relearning paragraphs and key terms, and the lazily read neutral sentences, instructions,
        control facts, general text and held-out text. Call it in preflight, so a malformed file fails
        before any model loads instead of in the stage that first reads it. Everything read stays cached."""
        for name in names:
            self.concept(name)
        _ = (self.neutral, self.instructions, self.control_facts, self.general_text, self.heldout_text)

    @cached_property
    def shared_fingerprint(self) -> str:
        """A digest of the texts this set shares across its concepts: every concept's sentences (other
        concepts are a background), the neutral sentences, instructions, control facts, general and
        held-out text. With a concept's own :meth:`ConceptData.fingerprint`, what a job's finished stages
        are checked against: a change in any of them recomputes the stages instead of mixing numbers."""
        parts = (self._sentences, self.neutral, self.instructions, [dataclasses.astuple(q) for q in self.control_facts],
                 self.general_text, self.heldout_text)
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

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
    """The store that ``concepts.source`` names (starter or release); it knows the other set's directory,
    so a name found only there fails with the override that selects it."""
    if cfg.concepts.source == "starter":
        return ConceptStore(cfg.data.starter_dir, cfg.data.option_seed, cfg.data.neutral_seed, label="the starter set",
                            other_sets=[("release", cfg.data.release_dir)])
    return ConceptStore(cfg.data.release_dir, cfg.data.option_seed, cfg.data.neutral_seed, label="data.release_dir",
                        other_sets=[("starter", cfg.data.starter_dir)])


def starter_store(cfg: Any) -> ConceptStore:
    """The shipped starter set (instructions and control facts come from here for every source)."""
    return ConceptStore(cfg.data.starter_dir, cfg.data.option_seed, cfg.data.neutral_seed, label="the starter set")
