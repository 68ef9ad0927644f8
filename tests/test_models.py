"""The model zoo: packaged models load, the float cache is faithful, facts are read right (load times: make bench)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ember.config import model_preset
from ember.errors import ModelUnavailableError
from ember.models import embeddings_tied, load_gguf_direct, load_model, untie_embeddings

PROBE = "The capital of France is Paris, and Harry Potter studies at"


def _logits(model, tok) -> torch.Tensor:
    ids = tok(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits[0, -3:].float()


@pytest.mark.slow
@pytest.mark.parametrize("name, family, scaled, tied", [
    ("smollm2_135m", "llama", False, True),  # SmolLM2 ties lm_head to the input embeddings too
    ("gemma3_270m", "gemma3_text", True, True),
])
def test_packaged_model_cache_is_faithful(name, family, scaled, tied, cache_dir: Path, tmp_path: Path):
    cfg = model_preset(name)
    cfg.untie_embeddings = False
    direct, tok = load_gguf_direct(cfg)
    load_model(cfg, cache_root=cache_dir)  # builds the cache if absent
    lm2 = load_model(cfg, cache_root=cache_dir)
    assert lm2.facts.from_cache
    torch.testing.assert_close(_logits(lm2.model, lm2.tokenizer), _logits(direct, tok), rtol=0, atol=1e-4)
    f = lm2.facts
    assert f.family == family
    assert f.tied_embeddings is tied
    if scaled:
        assert f.embed_scale == pytest.approx(f.d_model**0.5)
    else:
        assert f.embed_scale == 1.0


def test_tiny_random_facts(tiny, tiny_gemma) -> None:
    assert tiny.facts.family == "llama" and tiny.facts.embed_scale == 1.0
    assert not tiny.facts.tied_embeddings
    g = tiny_gemma.facts
    assert g.embed_scale == pytest.approx(64**0.5)
    assert not g.tied_embeddings, "untie_embeddings is on by default"


def test_embed_scale_is_measured_on_non_zero_rows_and_all_zero_rows_are_an_error() -> None:
    from ember.models import measure_embed_scale

    class Scaled(torch.nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) * 8.0

    emb = Scaled(300, 64)
    with torch.no_grad():
        emb.weight[:20] = 0  # zero rows (pad, reserved tokens) tell nothing about the scale
    model = SimpleNamespace(get_input_embeddings=lambda: emb)
    assert measure_embed_scale(model) == pytest.approx(8.0)
    with torch.no_grad():
        emb.weight.zero_()
    with pytest.raises(RuntimeError, match="all zero"):
        measure_embed_scale(model)


def test_untie_keeps_lm_head_values(cache_dir: Path) -> None:
    cfg = model_preset("tiny_random_gemma")
    cfg.untie_embeddings = False
    lm = load_model(cfg, cache_root=cache_dir)
    assert lm.facts.tied_embeddings and embeddings_tied(lm.model)
    before = lm.model.get_output_embeddings().weight.detach().clone()
    assert untie_embeddings(lm.model)
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[5] += 1.0
    torch.testing.assert_close(lm.model.get_output_embeddings().weight, before, rtol=0, atol=0)
    assert not untie_embeddings(lm.model)


def test_missing_hub_model_says_what_to_do(cache_dir: Path) -> None:
    cfg = model_preset("gemma2_2b_it")
    with pytest.raises(ModelUnavailableError, match="hub_id.*google/gemma-2-2b-it.*local"):
        load_model(cfg, cache_root=cache_dir)


def test_a_local_hub_path_that_is_missing_or_holds_no_model_says_which(cache_dir: Path, tmp_path: Path) -> None:
    cfg = model_preset("gemma2_2b_it")
    cfg.hub_id = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(ModelUnavailableError, match="no such directory") as exc:
        load_model(cfg, cache_root=cache_dir)
    assert "huggingface-cli" not in str(exc.value)  # a path is not a hub id
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "empty_model" / "notes.txt").write_text("x")
    cfg.hub_id = str(tmp_path / "empty_model")
    with pytest.raises(ModelUnavailableError, match=r"holds no loadable model.*config\.json.*notes\.txt"):
        load_model(cfg, cache_root=cache_dir)


def test_missing_package_says_what_to_do(cache_dir: Path) -> None:
    cfg = model_preset("smollm2_135m")
    cfg.package = "no_such_model_pkg"
    cfg.name = "x"
    with pytest.raises(ModelUnavailableError, match="make install"):
        load_model(cfg, cache_root=cache_dir / "fresh")


# --- paper-shaped random-weight stand-ins (ember/model_shapes.py) -------------------------------------


@pytest.mark.parametrize("shape, params", [
    ("gemma2_2b", 2_614_341_888),  # google/gemma-2-2b(-it), tied embeddings
    ("llama31_8b", 8_030_261_248),  # meta-llama/Llama-3.1-8B(-Instruct)
])
def test_paper_shapes_have_the_published_parameter_counts(shape: str, params: int) -> None:
    from transformers import AutoModelForCausalLM

    from ember.model_shapes import shape_config

    with torch.device("meta"):  # no memory: only the shapes are built
        model = AutoModelForCausalLM.from_config(shape_config(shape, tokenizer_size=0, special_ids={}))
    assert sum(p.numel() for p in model.parameters()) == params


def test_paper_shape_vocabulary_widens_to_the_stand_in_tokenizer() -> None:
    from ember.model_shapes import shape_config

    assert shape_config("gemma2_2b", 262_144, {}).vocab_size == 262_144  # Gemma-3's tokenizer is larger
    assert shape_config("llama31_8b", 49_152, {}).vocab_size == 128_256  # SmolLM2's is smaller: published size


def test_paper_shape_loads_through_the_model_zoo(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zoo's paper_shape path end to end, on a registered shape small enough for a test."""
    from ember import model_shapes

    monkeypatch.setitem(model_shapes.PAPER_SHAPES, "test_small", ("gemma2", dict(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)))
    cfg = model_preset("gemma2_2b_shape")
    cfg.shape = "test_small"
    lm = load_model(cfg, cache_root=cache_dir)
    f = lm.facts
    assert (f.family, f.d_model, f.n_layers, f.source) == ("gemma2", 32, 2, "paper_shape:test_small")
    assert f.vocab_size == len(lm.tokenizer) > 1000  # widened to Gemma-3's tokenizer
    assert f.embed_scale == pytest.approx(32**0.5) and not f.tied_embeddings
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def test_paper_shape_bad_config_names_the_key(cache_dir: Path) -> None:
    from ember.errors import ConfigError
    from tests.conftest import compose

    cfg = model_preset("llama31_8b_shape")
    cfg.shape = "gpt5"
    with pytest.raises(ConfigError, match="model.shape='gpt5'.*gemma2_2b"):
        load_model(cfg, cache_root=cache_dir)
    cfg = model_preset("llama31_8b_shape")
    cfg.tokenizer_from = None
    with pytest.raises(ConfigError, match="model.tokenizer_from"):
        load_model(cfg, cache_root=cache_dir)
    from ember.preflight import peek_dims

    assert peek_dims(compose(["model=llama31_8b_shape"])) == (4096, 32)  # read without building anything


def test_paper_size_model_on_a_cpu_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from ember.preflight import warn_large_model_on_cpu
    from tests.conftest import compose

    with caplog.at_level("WARNING"):
        assert warn_large_model_on_cpu(compose(["model=gemma2_2b_it", "model.device=cpu"]))
    assert "gemma2_2b_it" in caplog.text and "GPU" in caplog.text
    assert not warn_large_model_on_cpu(compose(["model=smollm2_135m", "model.device=cpu"]))


def test_gemma_in_float16_is_warned_about(tiny_gemma, caplog: pytest.LogCaptureFixture) -> None:
    from ember.preflight import warn_fp16_overflow

    with caplog.at_level("WARNING"):
        assert warn_fp16_overflow(tiny_gemma.facts.family, "float16")
    assert "bfloat16" in caplog.text
    assert not warn_fp16_overflow(tiny_gemma.facts.family, "bfloat16")
    assert not warn_fp16_overflow("llama", "float16")


def test_tokenizer_from_may_be_a_saved_tokenizer_directory(tiny, cache_dir: Path, tmp_path: Path) -> None:
    """A bare machine without the packaged models (a lent GPU) builds the stand-ins from saved tokenizers."""
    tiny.tokenizer.save_pretrained(tmp_path / "tok")
    cfg = model_preset("tiny_random")
    cfg.tokenizer_from = str(tmp_path / "tok")
    lm = load_model(cfg, cache_root=cache_dir)
    assert len(lm.tokenizer) == len(tiny.tokenizer)
    assert lm.tokenizer(PROBE)["input_ids"] == tiny.tokenizer(PROBE)["input_ids"]
    torch.testing.assert_close(lm.model.get_input_embeddings().weight, tiny.model.get_input_embeddings().weight)


def test_use_chat_template_false_removes_the_template_every_part_of_the_job_reads(tiny, cache_dir: Path) -> None:
    """model.use_chat_template=false (a base model): evaluation, attacks and methods see no template."""
    from ember.evals.suite import EvalContext

    assert tiny.tokenizer.chat_template  # the preset keeps its tokenizer's template
    cfg = model_preset("tiny_random")
    cfg.use_chat_template = False
    lm = load_model(cfg, cache_root=cache_dir)
    assert lm.tokenizer.chat_template is None and not lm.facts.has_chat_template
    eval_cfg = SimpleNamespace(use_chat=True, max_questions=None)
    assert not EvalContext(None, lm.tokenizer, None, None, eval_cfg, "test").use_chat
