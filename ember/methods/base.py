"""The base-method protocol and registry.

A method is a class registered by name plus a ``conf/method/<name>.yaml`` with its ``params``
(hyper-parameters), ``grid`` (the paper-size search grid) and ``quick_grid`` (a CPU-sized grid).
``apply`` edits the model in place (the pipeline hands it a fresh copy, with the EMBER edit
already applied when ``ember=on``) and returns a report. Adding a method = a new module here and
a YAML file; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ember.errors import ConfigError


@dataclass
class MethodContext:
    """What a method may use: the model (edited in place), its tokenizer and facts, and data."""

    model: nn.Module
    tokenizer: Any
    facts: Any  # ember.models.ModelFacts
    forget_texts: list[str]  # the concept's sentences
    retain_texts: list[str]  # neutral sentences
    concept: str
    seed: int = 42
    progress: bool = False
    cache: Any = None  # ember.cache.ArtifactCache for reusable artefacts (reference log-probs, MLP factors)
    master_weights: bool = False  # train bf16/fp16 weights through fp32 copies (model.master_weights)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodReport:
    name: str
    params: dict[str, Any]
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    status: str = "ok"  # ok | diverged
    reason: str = ""
    seconds: float = 0.0
    changed_parameters: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


class Method:
    """Subclass, set ``name``, implement ``apply``. ``params`` come from ``method.params``."""

    name: str = ""
    defaults: dict[str, Any] = {}
    #: modules besides its own whose code its results depend on (``code_versions.method_code_version``)
    code_modules: tuple[str, ...] = ()

    def __init__(self, params: dict[str, Any] | None = None):
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ConfigError(f"method.params: unknown key(s) {unknown} for method '{self.name}'; "
                              f"known: {sorted(self.defaults)}")
        self.params = {**self.defaults, **params}
        self.check_params()

    def check_params(self) -> None:
        """Raise ConfigError naming ``method.params.<key>`` for an impossible value."""

    def check_against_model(self, n_layers: int, d_mlp: int | None = None) -> None:
        """Raise ConfigError when a setting does not fit a model with ``n_layers`` blocks and MLP width
        ``d_mlp`` (None: unknown) (run by preflight, before any model loads). Methods with layer
        settings resolve them here."""

    def apply(self, ctx: MethodContext) -> MethodReport:
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, params: dict[str, Any] | None = None) -> Method:
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r} unknown; registered methods: {sorted(METHODS)}")
    return METHODS[name](params)


@register_method
class NoMethod(Method):
    """``method=none``: no base method (with ``ember=on`` this is EMBER alone)."""

    name = "none"
    defaults: dict[str, Any] = {}

    def apply(self, ctx: MethodContext) -> MethodReport:
        return MethodReport(name=self.name, params={})


def loss_guard(max_factor: float = 50.0) -> Callable[[float, float | None], str | None]:
    """A check for NaN/inf or exploding losses: returns a reason string when training must stop."""
    import math

    def check(loss: float, first: float | None) -> str | None:
        if not math.isfinite(loss):
            return f"loss became {loss}"
        if first is not None and abs(first) > 1e-8 and abs(loss) > max_factor * abs(first) + 1e3:
            return f"loss exploded ({loss:.4g} vs {first:.4g} at the start)"
        return None

    return check
