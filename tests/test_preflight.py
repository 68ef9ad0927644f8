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
