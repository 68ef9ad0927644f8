"""Published architectures of the paper's models, for randomly initialised stand-ins of the same shape.

No weights can be downloaded here, but cost (memory, factorization time, evaluation throughput)
depends only on a model's shape. ``model=gemma2_2b_shape`` or ``model=llama31_8b_shape`` builds a
model with the exact hyper-parameters below and random weights, so a paper-size run can be sized
and timed (``make bench ARGS='--only paper_scale'``) before the real weights are at hand. Scores
from such a model are meaningless; only its costs are real.

The numbers are the public ``config.json`` values of google/gemma-2-2b-it and
meta-llama/Llama-3.1-8B-Instruct.
"""

from __future__ import annotations

from typing import Any

from ember.errors import ConfigError

#: model_type for transformers.AutoConfig.for_model, and the architecture's hyper-parameters
PAPER_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma2_2b": ("gemma2", dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
        sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )),
    "llama31_8b": ("llama", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=False,
    )),
}


def _lookup(shape: str) -> tuple[str, dict[str, Any]]:
    if shape not in PAPER_SHAPES:
        raise ConfigError(f"model.shape='{shape}' unknown; choose one of {sorted(PAPER_SHAPES)}")
    return PAPER_SHAPES[shape]


def shape_config(shape: str, tokenizer_size: int, special_ids: dict[str, int | None]) -> Any:
    """The transformers config of a paper shape.

    The vocabulary is the published one, widened to the stand-in tokenizer's size if that is larger
    (Gemma-3's 262,144 ids for the Gemma-2 shape's 256,000), so every id the tokenizer makes exists."""
    from transformers import AutoConfig

    model_type, params = _lookup(shape)
    params = {**params, "vocab_size": max(params["vocab_size"], tokenizer_size)}
    return AutoConfig.for_model(model_type, **params, **{k: v for k, v in special_ids.items() if v is not None})


def shape_sizes(shape: str) -> dict[str, Any]:
    """A paper shape's transformers config values (``hidden_size``, ``num_hidden_layers``,
    ``intermediate_size``, ...), without building anything."""
    return dict(_lookup(shape)[1])
