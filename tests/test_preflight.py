"""Preflight reads a packaged model's dimensions without loading it, so size checks fail before any load."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.errors import ConfigError
from tests.conftest import compose


@pytest.mark.parametrize("preset, dims", [("smollm2_135m", (576, 30)), ("gemma3_270m", (640, 18))])
def test_peek_dims_reads_the_gguf_header_with_an_empty_cache(preset, dims, tmp_path: Path, monkeypatch) -> None:
    from ember.preflight import peek_dims

    monkeypatch.setenv("EMBER_CACHE", str(tmp_path))
    cfg = compose([f"model={preset}"])
    assert Path(cfg.cache_dir) == tmp_path
    assert peek_dims(cfg) == dims
    assert list(tmp_path.iterdir()) == []  # nothing converted or assembled


@pytest.mark.parametrize("preset, d_model", [("smollm2_135m", 576), ("gemma3_270m", 640)])
def test_rank_above_d_model_fails_in_preflight_with_an_empty_cache(preset, d_model, tmp_path: Path,
                                                                   monkeypatch) -> None:
    from ember.preflight import preflight

    monkeypatch.setenv("EMBER_CACHE", str(tmp_path))
    cfg = compose([f"model={preset}", f"ember.factorization.rank={d_model + 1}"])
    with pytest.raises(ConfigError, match=r"ember\.factorization\.rank") as exc:
        preflight(cfg)
    assert f"({d_model})" in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_peek_dims_of_a_missing_package_is_unknown(tmp_path: Path, monkeypatch) -> None:
    from ember.preflight import peek_dims

    monkeypatch.setenv("EMBER_CACHE", str(tmp_path))
    assert peek_dims(compose(["model.package=no_such_model_pkg"])) == (None, None)
    assert peek_dims(compose(["model=gemma3_270m", "model.assemble=no_such_model_pkg:assemble"])) == (None, None)


def test_gguf_header_reader_rejects_what_is_not_gguf(tmp_path: Path) -> None:
    from ember.gguf_header import gguf_header_dims

    p = tmp_path / "x.gguf"
    p.write_bytes(b"NOPE" + bytes(64))
    assert gguf_header_dims([p]) == (None, None)
    p.write_bytes(b"GGUF")  # truncated
    with pytest.raises(EOFError):
        gguf_header_dims([p])


@pytest.mark.parametrize("overrides, key", [
    (["attacks.incontext.source=[bogus]"], "attacks.incontext.source"),
    (["attacks.incontext.k=999"], "attacks.incontext.k=999"),
    (["attacks.incontext.selection=randm"], "attacks.incontext.selection"),
    (["attacks.token_evasion.variants=[bogus]"], "attacks.token_evasion.variants"),
    (["attacks.token_evasion.fallback=keyterms"], "attacks.token_evasion.fallback"),
    (["attacks.jailbreak.templates=[nope]"], "attacks.jailbreak.templates"),
    (["+attacks.jailbreak.templatez=[a]"], "attacks.jailbreak: unknown key"),
    (["attacks=all", "attacks.gcg.steps=0"], "attacks.gcg.steps"),
    (["attacks=all", "+attacks.gcg.train_offset=10000"], "attacks.gcg.train_offset"),
    (["attacks=all", "attacks.probe.folds=1"], "attacks.probe.folds"),
])
def test_attack_settings_fail_in_preflight(overrides, key, tmp_path: Path, monkeypatch) -> None:
    """A misspelt or impossible attack setting fails before any model loads (it used to fail only when the
    attacks stage ran, after baseline, features, erase and evaluate)."""
    from ember.preflight import preflight

    monkeypatch.setenv("EMBER_CACHE", str(tmp_path))
    with pytest.raises(ConfigError) as exc:
        preflight(compose(overrides))
    assert key in str(exc.value)
    assert list(tmp_path.iterdir()) == []  # no model converted or loaded


def test_every_attack_preset_passes_preflight_settings_checks() -> None:
    from ember.attacks import SETTINGS_CHECKS, check_attack_settings
    from ember.data import open_store

    cfg = compose(["concepts=starter_all"])
    store = open_store(cfg)
    concepts = [store.concept(n) for n in store.resolve_names(list(cfg.concepts.names))]
    assert len(concepts) >= 3
    for preset in ("all", "prompting", "none"):
        check_attack_settings(compose([f"attacks={preset}"]).attacks, concepts)  # raises if a preset is wrong
    assert set(SETTINGS_CHECKS) == {"jailbreak", "incontext", "token_evasion", "gcg", "probe"}


def test_an_unknown_lm_eval_task_fails_in_preflight_with_suggestions(tmp_path: Path, monkeypatch) -> None:
    from ember.preflight import check_lm_eval_tasks, preflight

    monkeypatch.setenv("EMBER_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=r"eval\.lm_eval_tasks: lm-eval has no task 'mmlu_stemm'.*mmlu_stem"):
        preflight(compose(["eval.lm_eval_tasks=[mmlu_stemm]"]))
    check_lm_eval_tasks(["mmlu_stem", "hellaswag"])  # known tasks pass


def test_an_unwritable_cache_dir_or_an_unset_variable_names_the_key(tmp_path: Path, monkeypatch) -> None:
    from ember.preflight import preflight

    a_file = tmp_path / "afile"
    a_file.write_text("x")
    monkeypatch.setenv("EMBER_CACHE", str(a_file))
    with pytest.raises(ConfigError, match=r"cache_dir=.*afile.*EMBER_CACHE.*not a writable directory"):
        preflight(compose([]))
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EMBER_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match=r"data\.release_dir: .*EMBER_TEST_UNSET"):
        preflight(compose(["data.release_dir=${oc.env:EMBER_TEST_UNSET}"]))


@pytest.mark.parametrize("preset, d_mlp", [("smollm2_135m", 1536), ("gemma3_270m", 2048), ("gemma2_2b_shape", 9216),
                                           ("tiny_random", 128)])
def test_snmf_rank_above_the_mlp_width_fails_in_preflight(preset, d_mlp, tmp_path: Path, monkeypatch) -> None:
    """SNMF factorizes d_mlp x N activations: a rank above d_mlp used to fail only when the erase stage ran
    (after the baseline, the features and the delta grid). The width comes from the GGUF header, the
    shape or the preset, with an empty cache."""
    from ember.preflight import peek_model_config, preflight

    monkeypatch.setenv("EMBER_CACHE", str(tmp_path))
    assert peek_model_config(compose([f"model={preset}"]))["intermediate_size"] == d_mlp
    with pytest.raises(ConfigError, match=rf"method\.params\.rank={d_mlp + 1}.*d_mlp={d_mlp}"):
        preflight(compose([f"model={preset}", "ember=off", "method=snmf", f"method.params.rank={d_mlp + 1}"]))
