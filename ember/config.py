"""Typed config schemas (Hydra ConfigStore) and checks that fail at start, naming the key.

Each config group in ``conf/`` is validated against a dataclass here, so a mistyped key or a
value of the wrong type fails when Hydra composes the config. Range checks that a type cannot
express (a negative delta, a sparsity outside (0, 1]) live in :func:`validate`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ember.errors import ConfigError
from ember.paths import CONF_DIR, register_resolvers

register_resolvers()


@dataclass
class TinyModelConfig:
    d_model: int = 64
    d_mlp: int = 128
    n_layers: int = 2
    n_heads: int = 4
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = "packaged"  # packaged | hub | tiny_random | paper_shape
    hub_id: str | None = None
    package: str | None = None
    gguf_file: str | None = None
    assemble: str | None = None  # "module:function" returning the GGUF path
    arch: str | None = None  # tiny_random only: llama | gemma3
    tokenizer_from: str | None = None  # tiny_random, paper_shape: a preset whose tokenizer to use, or a saved-tokenizer dir
    shape: str | None = None  # paper_shape only: gemma2_2b | llama31_8b (ember/model_shapes.py)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)  # tiny_random; tiny.seed seeds paper_shape too
    dtype: str = "float32"
    device: str = "auto"
    use_chat_template: bool = True
    untie_embeddings: bool = True
    master_weights: bool = False  # methods and relearning train bf16/fp16 weights through fp32 copies (off: as the reference)
    size_class: str = "small"  # small (runs on a CPU) | large (paper-size: preflight warns when it would run on a CPU)


@dataclass
class ConceptsConfig:
    source: str = "starter"  # starter | release
    names: list[str] = field(default_factory=lambda: ["Harry Potter"])  # empty list = every concept found


@dataclass
class DataConfig:
    release_dir: str = "${ember_root:}/../shared/ember-release"
    starter_dir: str = "${ember_pkg:}/data/starter"
    option_seed: int = 42
    neutral_seed: int = 42


@dataclass
class SelectorConfig:
    name: str = "ratio"  # ratio | purity | semantic | llm | exclusivity | anchor; combine with "+"
    ratio_thresh: float = 2.0
    purity_thresh: float = 0.5
    semantic_thresh: float = 0.35
    semantic_top_tokens: int = 20
    exclusivity_thresh: float = 0.5
    anchor_thresh: float = 0.05  # anchor: share of a feature's concept-only |G| mass on key-term tokens
    anchor_min_tokens: int = 1  # anchor: key-term tokens a feature must hold
    llm_endpoint: str | None = None
    llm_model: str = "gpt-4o-mini"
    llm_confidence: float = 0.85
    llm_top_tokens: int = 20


@dataclass
class FactorizationConfig:
    rank: int = 100
    sparsity: float = 0.01
    reg: float = 1e-4
    reg_tries: int = 4
    tol: float = 1e-4
    patience: int = 500
    max_iter: int = 20000
    stopping: str = "plateau"  # reference (absolute tol + patience) | plateau (relative, short patience)
    plateau_rel_tol: float = 1e-4
    plateau_patience: int = 25
    seed: int = 42
    device: str = "auto"
    # float64: the fit (and so the chosen features) does not depend on the BLAS thread count; in float32
    # 1 and 2 threads gave different features on SmolLM2 (docs/design.md "Factorization precision")
    dtype: str = "float64"


@dataclass
class EmberConfig:
    enabled: bool = True
    factorization: FactorizationConfig = field(default_factory=FactorizationConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    background: list[str] = field(default_factory=lambda: ["neutral"])  # neutral | other_concepts
    delta: float | None = None  # fixed delta; null = pick from delta_grid once per concept (cached)
    delta_grid: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 200.0])
    retention_gate: float = 0.9
    coherence_gate: float = 0.9


@dataclass
class MethodConfig:
    name: str = "none"
    params: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    quick_grid: dict[str, list[Any]] = field(default_factory=dict)
    search: str = "none"  # none (use params) | quick | full
    top_k_validate: int = 15
    retention_gate: float = 0.7


@dataclass
class EvalConfig:
    mc_mode: str = "loglik"  # loglik | letter
    prompt_template: str = "Question: {q}\nAnswer:"
    batch_size: int = 16
    max_questions: int | None = None  # per split; null = all
    open_qa: bool = False
    open_judge: str = "local"  # local | llm
    open_max_new_tokens: int = 24
    f1_threshold: float = 0.5
    llm_endpoint: str | None = None
    llm_model: str = "gpt-4o-mini"
    coherence: bool = True
    coherence_n: int = 30
    coherence_max_new_tokens: int = 40
    perplexity: bool = True
    perplexity_n: int = 60
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: int | None = None
    # retention terms the delta and method-grid gates leave out (they still enter specificity);
    # eval=paper: [simdom_frac], as the paper gates on MMLU (here also its stand-ins) alone
    gate_skip: list[str] = field(default_factory=list)
    # added with the evaluation suite (docs/evaluation.md)
    use_chat: bool = True  # chat-wrap generation prompts when the tokenizer has a template
    share_prefix: bool = True  # loglik MC: run the question once, fan its KV cache out to the options
    letter_batch_size: int = 1  # letter MC: 1 = one question at a time, as the reference
    frac_on: str = "acc"  # acc | p_correct: the MC score the kept fractions use
    coherence_judge: str = "local"  # local (MiniLM relevance + base-model fluency) | llm (0-2 ratings)
    perplexity_source: str = "auto"  # auto = heldout (heldout_text.json) | general | neutral
    perplexity_max_length: int = 256
    lm_eval_include_path: str | None = None  # a folder of extra lm-eval task YAMLs
    llm_api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the endpoint's key, if any
    llm_temperature: float = 0.0
    llm_threads: int = 8
    llm_timeout_s: float = 60.0


@dataclass
class RelearnConfig:
    name: str = "none"  # none | full | lora
    epochs: int = 2
    max_paragraphs: int = 100
    batch_size: int = 1
    max_length: int = 256
    lr: float = 1e-5
    weight_decay: float = 0.01
    lora_rank: int = 16
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    max_grad_norm: float = 1.0
    divergence_factor: float = 20.0
    in_place: bool = False  # relearn the model passed in rather than a deep copy
    merge_lora: bool = True  # lora: merge the adapter into the relearned model
    control: bool = True  # also relearn the unedited model (cached): the attack's control and the recovered fraction


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: str = "ember"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    tags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    """The root config. Groups compose into the typed fields below."""

    model: ModelConfig = field(default_factory=ModelConfig)
    concepts: ConceptsConfig = field(default_factory=ConceptsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ember: EmberConfig = field(default_factory=EmberConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    attacks: dict[str, Any] = field(default_factory=dict)
    relearn: RelearnConfig = field(default_factory=RelearnConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 42
    overwrite: bool = False
    cache_dir: str = "${oc.env:EMBER_CACHE,${oc.env:HOME}/.cache/ember}"
    stages: list[str] = field(
        default_factory=lambda: ["baseline", "features", "erase", "evaluate", "attacks", "relearn"]
    )
    progress: bool = True
    experiment_name: str = "default"
    # keep the erased model in the job directory (changed parameters only) so a resumed job skips erasure
    save_erased_weights: bool = True
    # ...unless the difference is larger than this (GiB): GA/GradDiff/NPO train every MLP, ~10 GiB on an 8B model
    save_erased_weights_max_gib: float = 4.0


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)


register_configs()


# --------------------------------------------------------------------------------------------------
# range checks


#: keys whose values the code dispatches on without a conf/ group (a misspelt value would fall through
#: to another branch: a full grid, NaN efficacy): key -> (the accepted values, what they mean)
CHOICES: dict[str, tuple[tuple[str, ...], str]] = {
    "method.search": (("none", "quick", "full"),
                      "none trains method.params, quick searches method.quick_grid, full method.grid"),
    "eval.frac_on": (("acc", "p_correct"), "the multiple-choice score the kept fractions use"),
    "eval.open_judge": (("local", "llm"), "local (answer match / token F1) or llm (an OpenAI-compatible endpoint)"),
    "eval.coherence_judge": (("local", "llm"),
                             "local (MiniLM relevance + base-model fluency) or llm (the endpoint's 0-2 ratings)"),
}

#: keys that are fractions or shares: only values in [0, 1] mean anything (above 1 nothing passes)
FRACTIONS: tuple[str, ...] = (
    "ember.retention_gate", "ember.coherence_gate", "method.retention_gate",
    "ember.selector.purity_thresh", "ember.selector.exclusivity_thresh", "ember.selector.anchor_thresh",
    "ember.selector.llm_confidence", "eval.f1_threshold",
)


def _require(cond: bool, key: str, value: Any, fix: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: {fix}")


def _get(cfg: Any, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), cfg)


def _check_selector(name: Any) -> None:
    """``ember.selector.name``: registered selectors (ember/features.py SELECTORS), combined with '+'."""
    from ember.features import SELECTORS, selector_parts

    parts = selector_parts(name)  # as select_features reads it
    unknown = [p for p in parts if p not in SELECTORS]
    _require(bool(parts) and not unknown, "ember.selector.name", name,
             f"unknown selector(s) {unknown}; choose from {sorted(SELECTORS)}, combined with '+' (e.g. ratio+anchor)")


def validate(cfg: DictConfig | RunConfig) -> None:
    """Check values a type cannot express; raise ConfigError naming the key and the fix."""
    f = cfg.ember.factorization
    _require(f.rank >= 1, "ember.factorization.rank", f.rank, "use a positive integer (e.g. 100)")
    _require(0.0 < f.sparsity <= 1.0, "ember.factorization.sparsity", f.sparsity, "use a fraction in (0, 1], e.g. 0.01")
    _require(f.reg > 0, "ember.factorization.reg", f.reg, "use a positive ridge term, e.g. 1e-4")
    _require(f.reg_tries >= 1, "ember.factorization.reg_tries", f.reg_tries, "use at least 1")
    _require(f.max_iter >= 1, "ember.factorization.max_iter", f.max_iter, "use at least 1")
    _require(f.patience >= 1, "ember.factorization.patience", f.patience, "use at least 1")
    _require(f.stopping in ("reference", "plateau"), "ember.factorization.stopping", f.stopping, "use 'reference' or 'plateau'")
    e = cfg.ember
    if e.delta is not None:
        _require(e.delta >= 0, "ember.delta", e.delta, "use a non-negative number, or null to pick from ember.delta_grid")
    _require(len(e.delta_grid) > 0, "ember.delta_grid", list(e.delta_grid), "give at least one delta")
    _require(all(d >= 0 for d in e.delta_grid), "ember.delta_grid", list(e.delta_grid), "deltas must be non-negative")
    _require(e.factorization.dtype in ("float32", "float64"), "ember.factorization.dtype", e.factorization.dtype,
             "use float64 (reproducible across thread counts) or float32 (half the time)")
    for key in FRACTIONS:
        _require(0 <= _get(cfg, key) <= 1, key, _get(cfg, key), "use a fraction in [0, 1]")
    for key, (choices, meaning) in CHOICES.items():
        _require(_get(cfg, key) in choices, key, _get(cfg, key), f"choose one of {list(choices)}: {meaning}")
    _check_selector(e.selector.name)
    for b in e.background:
        _require(b in ("neutral", "other_concepts", "general"), "ember.background", list(e.background),
                 "each entry must be one of neutral, other_concepts, general")
    _require(cfg.model.size_class in ("small", "large"), "model.size_class", cfg.model.size_class,
             "use small (runs on a CPU) or large (paper-size, wants a GPU)")
    _require(cfg.concepts.source in ("starter", "release"), "concepts.source", cfg.concepts.source,
             "use 'starter' (shipped) or 'release' (data.release_dir)")
    _require(cfg.eval.mc_mode in ("loglik", "letter"), "eval.mc_mode", cfg.eval.mc_mode, "use 'loglik' or 'letter'")
    _require(cfg.eval.perplexity_source in ("auto", "heldout", "general", "neutral"), "eval.perplexity_source",
             cfg.eval.perplexity_source, "use auto, heldout, general or neutral")
    _require(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "use a positive integer")
    _require("{q}" in cfg.eval.prompt_template, "eval.prompt_template", cfg.eval.prompt_template, "it must contain '{q}'")
    _require(cfg.relearn.name in ("none", "full", "lora"), "relearn.name", cfg.relearn.name, "use none, full or lora")
    _require(cfg.relearn.epochs >= 1, "relearn.epochs", cfg.relearn.epochs, "use at least 1")
    _require(cfg.relearn.lr > 0, "relearn.lr", cfg.relearn.lr, "use a positive learning rate")
    for key in ("max_paragraphs", "batch_size", "max_length"):
        _require(getattr(cfg.relearn, key) >= 1, f"relearn.{key}", getattr(cfg.relearn, key), "use a positive integer")
    _require(cfg.logger.mode in ("offline", "online", "disabled"), "logger.mode", cfg.logger.mode,
             "use offline, online or disabled (logger=wandb reads it from $WANDB_MODE when set)")
    _check_counts_and_devices(cfg)
    from ember.stages import STAGES

    for s in cfg.stages:
        _require(s in STAGES, "stages", list(cfg.stages), f"each stage must be one of {list(STAGES)}")


MODEL_DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(value: str) -> str:
    """``auto`` -> ``cuda`` where a CUDA device is visible, else ``cpu``; any other value as given."""
    import torch

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return value


def check_device(key: str, value: str) -> None:
    """``auto``, ``cpu`` or a CUDA device this machine has (``cuda``, ``cuda:0``, ...)."""
    import torch

    if value in ("auto", "cpu"):
        return
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        dev = None
    _require(dev is not None and dev.type in ("cpu", "cuda"), key, value, "use auto, cpu or cuda (cuda:N)")
    if dev is not None and dev.type == "cuda":
        _require(torch.cuda.is_available(), key, value,
                 "no CUDA device is visible here (or torch was built without CUDA); use auto or cpu")
        _require(dev.index is None or dev.index < torch.cuda.device_count(), key, value,
                 f"this machine has {torch.cuda.device_count()} CUDA device(s)")


def _check_counts_and_devices(cfg: DictConfig | RunConfig) -> None:
    """Counts where 0 or a negative number would silently mean something else (``xs[:n]``), the LLM
    endpoints a configured judge or selector needs, and the devices and dtypes."""
    ev = cfg.eval
    _require(ev.max_questions is None or ev.max_questions >= 1, "eval.max_questions", ev.max_questions,
             "use a positive integer, or null for every question")
    for key in ("coherence_n", "perplexity_n", "llm_threads"):
        _require(getattr(ev, key) >= 1, f"eval.{key}", getattr(ev, key), "use a positive integer")
    _require(cfg.method.top_k_validate >= 1, "method.top_k_validate", cfg.method.top_k_validate, "use a positive integer")
    f = cfg.ember.factorization
    _require(f.tol > 0, "ember.factorization.tol", f.tol, "use a positive tolerance, e.g. 1e-4")
    _require(f.plateau_rel_tol > 0, "ember.factorization.plateau_rel_tol", f.plateau_rel_tol, "use a positive tolerance")
    _require(f.plateau_patience >= 1, "ember.factorization.plateau_patience", f.plateau_patience, "use at least 1")
    r = cfg.relearn
    _require(r.max_grad_norm >= 0, "relearn.max_grad_norm", r.max_grad_norm, "use 0 (no clipping) or a positive norm")
    _require(r.divergence_factor > 0, "relearn.divergence_factor", r.divergence_factor, "use a positive factor, e.g. 20")
    if r.name == "lora":
        _require(r.lora_rank >= 1, "relearn.lora_rank", r.lora_rank, "use a positive integer, e.g. 16")
        _require(r.lora_alpha > 0, "relearn.lora_alpha", r.lora_alpha, "use a positive number, e.g. 16")
        _require(len(r.lora_targets) > 0, "relearn.lora_targets", list(r.lora_targets),
                 "name at least one module, e.g. [q_proj, v_proj]")
    needs_llm = (ev.open_qa and ev.open_judge == "llm") or (ev.coherence and ev.coherence_judge == "llm")
    _require(not needs_llm or bool(ev.llm_endpoint), "eval.llm_endpoint", ev.llm_endpoint,
             "the LLM judge (eval.open_judge=llm or eval.coherence_judge=llm) needs an OpenAI-compatible endpoint "
             "URL, or choose a local judge")
    from ember.features import selector_parts

    _require(not (cfg.ember.enabled and "llm" in selector_parts(cfg.ember.selector.name)) or bool(cfg.ember.selector.llm_endpoint),
             "ember.selector.llm_endpoint", cfg.ember.selector.llm_endpoint,
             "the llm selector needs an OpenAI-compatible endpoint URL, or use ratio/anchor")
    _check_gate_skip(ev)
    _require(cfg.model.dtype in MODEL_DTYPES, "model.dtype", cfg.model.dtype, f"choose one of {list(MODEL_DTYPES)}")
    _require(cfg.save_erased_weights_max_gib >= 0, "save_erased_weights_max_gib", cfg.save_erased_weights_max_gib,
             "use a size in GiB >= 0 (0 saves no difference)")
    check_device("model.device", cfg.model.device)
    if cfg.ember.enabled:
        check_device("ember.factorization.device", f.device)


def _check_gate_skip(ev: Any) -> None:
    """``eval.gate_skip``: names of retention terms, leaving at least one measured term to gate on."""
    from ember.evals.metrics import RETENTION_TERMS

    skip = list(ev.gate_skip)
    bad = [k for k in skip if k not in RETENTION_TERMS and not re.fullmatch(r"lmeval_.+_frac", str(k))]
    _require(not bad, "eval.gate_skip", skip,
             f"{bad} name no retention term; use {list(RETENTION_TERMS)} or lmeval_<task>_frac")
    measured = ["simdom_frac", "control_frac", *(["ppl_frac"] if ev.perplexity else []),
                *(f"lmeval_{t}_frac" for t in ev.lm_eval_tasks)]
    _require(any(k not in skip for k in measured), "eval.gate_skip", skip,
             f"it leaves none of the measured retention terms {measured} to gate on; skip fewer")


def validate_against_model(cfg: DictConfig | RunConfig, d_model: int) -> None:
    """Checks that need the loaded model's size."""
    if not cfg.ember.enabled:
        return  # the factorization is not run
    rank = cfg.ember.factorization.rank
    _require(rank <= d_model, "ember.factorization.rank", rank,
             f"the rank must not exceed the model's d_model ({d_model}); the paper uses 100-200")


def model_preset(name: str) -> DictConfig:
    """The ``conf/model/<name>.yaml`` preset merged onto the schema (for code outside a Hydra run)."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise ConfigError(f"model preset '{name}' not found in {path.parent}; known presets: {known}")
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))


def resolve_path(p: str | Path) -> Path:
    return Path(p).expanduser().resolve()
