"""Bad input, generated: every case ends in a clear error naming the key or file, before any model loads.

The counts of cases tried are printed (``-s``) and recorded in README's Reliability section.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.errors import EmberError
from ember.paths import STARTER_DIR
from tests.conftest import compose

TRIED = {"config": 0, "data": 0}

# (override key, strategy of bad values, text the error must contain)
NUMERIC_RANGES = [
    ("ember.factorization.sparsity", st.one_of(st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=1.0001, max_value=1e9)), "ember.factorization.sparsity"),
    ("ember.factorization.rank", st.integers(max_value=0), "ember.factorization.rank"),
    ("ember.factorization.rank", st.integers(min_value=577, max_value=10**6), "ember.factorization.rank"),
    ("ember.factorization.reg", st.floats(max_value=0.0, allow_nan=False), "ember.factorization.reg"),
    ("ember.factorization.max_iter", st.integers(max_value=0), "ember.factorization.max_iter"),
    ("ember.delta", st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False), "ember.delta"),
    ("ember.retention_gate", st.one_of(st.floats(max_value=-1e-6, allow_nan=False), st.floats(min_value=1.0001, max_value=1e6)), "ember.retention_gate"),
    ("eval.batch_size", st.integers(max_value=0), "eval.batch_size"),
    ("relearn.lr", st.floats(max_value=0.0, allow_nan=False), "relearn.lr"),
    ("relearn.epochs", st.integers(max_value=0), "relearn.epochs"),
]
WRONG_TYPES = ["ember.factorization.rank", "ember.factorization.sparsity", "seed", "eval.batch_size",
               "relearn.epochs", "ember.enabled", "relearn.lr"]
NAMES = [("model", "model"), ("method", "method"), ("concepts", "concepts"), ("ember", "ember"),
         ("relearn", "relearn"), ("eval", "eval")]


def _preflight(overrides: list[str]) -> Exception:
    from ember.preflight import preflight

    try:
        cfg = compose(overrides)
        preflight(cfg)
    except (ConfigCompositionException, EmberError) as exc:
        return exc
    raise AssertionError(f"no error for {overrides}")


def _text(exc: Exception) -> str:
    return f"{exc} {exc.__cause__ or ''}"


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(NUMERIC_RANGES).flatmap(lambda t: st.tuples(st.just(t[0]), t[1], st.just(t[2]))))
def test_out_of_range_numbers(case) -> None:
    key, value, expect = case
    exc = _preflight([f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}", "model=tiny_random"])
    TRIED["config"] += 1
    assert expect in _text(exc), _text(exc)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.sampled_from(WRONG_TYPES), st.sampled_from(["abc", "[1,2]", "{a: 1}", "1.5.3", "yes please"]))
def test_wrong_types(key: str, value: str) -> None:
    if key == "relearn.lr" and value == "[1,2]":
        value = "abc"
    exc = _preflight([f"{key}={value}"])
    TRIED["config"] += 1
    assert key.split(".")[-1] in _text(exc), _text(exc)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.sampled_from(NAMES), st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12))
def test_unknown_names(group, name: str) -> None:
    g, expect = group
    from ember.paths import CONF_DIR

    if (CONF_DIR / g / f"{name}.yaml").exists():
        return
    if name.lower() in ("null", "true", "false", "nan", "inf", "none"):
        return  # Hydra's grammar reads these as values, not option names (its own error, not ours)
    exc = _preflight([f"{g}={name}"])
    TRIED["config"] += 1
    assert expect in _text(exc) and name in _text(exc)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", min_size=3, max_size=20))
def test_unknown_concepts_and_attacks(name: str) -> None:
    exc = _preflight([f"concepts.names=[{name.strip() or 'x'}]"])
    assert "concepts.names" in _text(exc)
    exc = _preflight(["+attacks.enabled=[" + (name.strip().replace(" ", "_") or "x") + "]"])
    assert "attacks.enabled" in _text(exc)
    param = (name.strip().replace(" ", "_") or "x") + "_p"  # the suffix keeps it off every real parameter
    exc = _preflight(["method=ga", f"+method.params.{param}=3"])
    assert "method.params" in _text(exc) and param in _text(exc)
    TRIED["config"] += 3


@pytest.mark.parametrize("layers", ["[-1]", "all", "[]", "[1.5]", "[true]"])
def test_probe_layers_that_are_no_layer_indices_fail_in_preflight(layers: str) -> None:
    exc = _preflight(["model=tiny_random", "ember=off", "attacks=all", f"attacks.probe.layers={layers}"])
    TRIED["config"] += 1
    assert "attacks.probe.layers" in _text(exc) and "list of layer indices" in _text(exc), _text(exc)


@pytest.mark.parametrize("overrides, key", [
    (["method=rmu", "method.params.layer=5"], "method.params.layer"),  # tiny_random has 2 layers
    (["method=ga", "method.params.layers=[0,7]"], "method.params.layers"),
    (["method=snmf", "method.params.out_layers=[1,3]"], "method.params.out_layers"),
    (["method=rmu", "method.search=quick", "+method.quick_grid.layer=[0,9]"], "grid cell"),
    (["relearn.max_paragraphs=0"], "relearn.max_paragraphs"),
    (["attacks=all", "attacks.probe.layers=[1,3]"], "attacks.probe.layers"),  # 0..2 exist
])
def test_layers_the_model_lacks_and_empty_relearning_fail_in_preflight(overrides, key) -> None:
    exc = _preflight(["model=tiny_random", "ember=off", *overrides])
    TRIED["config"] += 1
    assert key in _text(exc), _text(exc)
    if "relearn" not in key:
        assert "2 layers" in _text(exc), _text(exc)


FILES = ["mc_questions.json", "open_questions.json", "concept_sentences.json", "relearn_paragraphs.json",
         "neutral_sentences.json", "key_terms.json"]


def _mutations(data):
    """Paths to every container in a JSON document (to delete keys, change types, empty lists)."""
    out = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                out.append(path + [k])
                walk(v, path + [k])
        elif isinstance(node, list) and node:
            out.append(path + [0])
            walk(node[0], path + [0])

    walk(data, [])
    return out


@pytest.fixture(scope="module")
def starter_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("starter")
    shutil.copytree(STARTER_DIR, root / "orig")
    return root / "orig"


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(FILES), st.data(), st.sampled_from(["delete", "wrong_type", "empty", "non_utf8", "answer_missing"]))
def test_malformed_data_files(starter_copy: Path, tmp_path_factory, fname: str, data, kind: str) -> None:
    from ember.data import ConceptStore

    root = tmp_path_factory.mktemp("mut")
    shutil.copytree(starter_copy, root / "d")
    path = root / "d" / fname
    doc = json.loads(path.read_text())
    target: list = []
    harmless = False
    if kind == "non_utf8":
        path.write_bytes(path.read_bytes()[:50] + b"\xff\xfe\xfa" + path.read_bytes()[50:])
    elif kind == "answer_missing":
        fname = "mc_questions.json"
        path = root / "d" / fname
        doc = json.loads(path.read_text())
        split = data.draw(st.sampled_from(["QA_train", "QA_test", "SimdomQA_train", "SimdomQA_test"]))
        i = data.draw(st.integers(0, len(doc["Harry Potter"][split]) - 1))
        doc["Harry Potter"][split][i]["correct_answer"] = "definitely not an option"
        path.write_text(json.dumps(doc))
    else:
        paths = _mutations(doc)
        target = data.draw(st.sampled_from(paths))
        parent = doc
        for p in target[:-1]:
            parent = parent[p]
        last = target[-1]
        if kind == "delete" and isinstance(parent, dict):
            del parent[last]
        elif kind == "empty" and isinstance(parent[last], list):
            parent[last] = []
        else:
            parent[last] = 12345 if not isinstance(parent[last], int) else "x"
        path.write_text(json.dumps(doc))
        harmless = _harmless(fname, target, kind)
    store = ConceptStore(root / "d")
    try:
        for n in store.resolve_names([]):
            store.concept(n)
        _ = store.neutral, store.control_facts, store.instructions
    except EmberError as exc:
        TRIED["data"] += 1
        assert fname in str(exc), str(exc)
        return
    TRIED["data"] += 1
    assert kind not in ("non_utf8", "answer_missing") and harmless, f"{kind} at {fname} was not detected"


def _harmless(fname: str, target: list, kind: str) -> bool:
    """Mutations of fields the reader does not use, or of optional per-concept entries."""
    if any(p in ("url", "title") for p in target):
        return True
    return fname in ("open_questions.json", "key_terms.json") and len(target) == 1 and kind == "delete"


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    out = Path(__file__).resolve().parents[1] / "outputs" / "reliability"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bad_input_counts.json").write_text(json.dumps(TRIED))
    print(f"\nbad-input cases tried: config={TRIED['config']}, data={TRIED['data']}")
