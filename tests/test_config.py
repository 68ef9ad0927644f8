"""Every config composes; mistyped keys and bad values fail at start naming the key."""

from __future__ import annotations

import itertools

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ember.config import validate
from ember.errors import ConfigError
from ember.paths import CONF_DIR, job_tag
from tests.conftest import compose

GROUPS = ["model", "concepts", "ember", "method", "eval", "relearn", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_and_validates(group: str) -> None:
    opts = options(group)
    assert opts, f"conf/{group} is empty"
    for opt in opts:
        cfg = compose([f"{group}={opt}"])
        validate(cfg)
        assert cfg[group] is not None


def test_every_experiment_composes() -> None:
    exps = options("experiment")
    assert exps, "conf/experiment is empty"
    for exp in exps:
        cfg = compose([f"experiment={exp}"])
        validate(cfg)
        assert cfg.experiment_name == exp, (exp, cfg.experiment_name)  # each once ran as "main" (config.yaml)


def test_defaults_are_the_main_job() -> None:
    cfg = compose()
    assert cfg.model.name == "smollm2_135m"
    assert cfg.concepts.source == "starter" and list(cfg.concepts.names) == ["Harry Potter"]
    assert cfg.ember.enabled is True


def test_ember_on_off_and_method_combinations_compose() -> None:
    import ember.methods as methods

    for ember, method in itertools.product(options("ember"), options("method")):
        cfg = compose([f"ember={ember}", f"method={method}"])
        assert cfg.method.name in methods.METHODS and method.startswith(cfg.method.name)


@pytest.mark.parametrize(
    "override, key",
    [
        ("ember.factorization.rnk=3", "rnk"),
        ("model.dtyp=float32", "dtyp"),
        ("eval.mc_mod=letter", "mc_mod"),
    ],
)
def test_mistyped_key_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException) as exc:
        compose([override])
    assert key in str(exc.value) or key in str(exc.value.__cause__)


@pytest.mark.parametrize(
    "override",
    ["ember.factorization.rank=abc", "seed=1.5x", "eval.batch_size=many", "ember.enabled=maybe"],
)
def test_wrong_type_fails_at_compose(override: str) -> None:
    with pytest.raises(ConfigCompositionException) as exc:
        compose([override])
    assert override.split("=")[0].split(".")[-1] in str(exc.value.__cause__) + str(exc.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("ember.factorization.sparsity=0", "ember.factorization.sparsity"),
        ("ember.factorization.sparsity=1.5", "ember.factorization.sparsity"),
        ("ember.factorization.rank=0", "ember.factorization.rank"),
        ("ember.delta=-1", "ember.delta"),
        ("ember.delta_grid=[]", "ember.delta_grid"),
        ("eval.mc_mode=guess", "eval.mc_mode"),
        ("eval.perplexity_source=web", "eval.perplexity_source"),
        ("relearn.lr=0", "relearn.lr"),
        ("concepts.source=internet", "concepts.source"),
        ("model.size_class=huge", "model.size_class"),
        ("stages=[baseline,dance]", "stages"),
        # counts where 0 or a negative number used to mean "all" or "all but n" (xs[:n]) without a word
        ("eval.max_questions=-1", "eval.max_questions"),
        ("eval.max_questions=0", "eval.max_questions"),
        ("eval.coherence_n=-5", "eval.coherence_n"),
        ("eval.perplexity_n=0", "eval.perplexity_n"),
        ("eval.llm_threads=0", "eval.llm_threads"),
        ("method.top_k_validate=0", "method.top_k_validate"),
        ("ember.factorization.tol=-1", "ember.factorization.tol"),
        ("ember.factorization.plateau_patience=0", "ember.factorization.plateau_patience"),
        ("relearn.max_grad_norm=-1", "relearn.max_grad_norm"),
        ("relearn.divergence_factor=-1", "relearn.divergence_factor"),
        # settings that used to fail only when their stage ran, or as a raw traceback
        ("relearn=lora;relearn.lora_rank=0", "relearn.lora_rank"),
        ("relearn=lora;relearn.lora_alpha=0", "relearn.lora_alpha"),
        ("eval.open_qa=true;eval.open_judge=llm", "eval.llm_endpoint"),
        ("eval.coherence_judge=llm", "eval.llm_endpoint"),
        ("ember.selector.name=ratio+llm", "ember.selector.llm_endpoint"),
        ("model.dtype=bf16", "model.dtype"),
        ("model.device=gpu", "model.device"),
        ("ember.factorization.device=tpu", "ember.factorization.device"),
        ("eval.gate_skip=[simdom]", "eval.gate_skip"),  # not a retention term's name
        ("eval.gate_skip=[simdom_frac,control_frac];eval.perplexity=false", "eval.gate_skip"),  # nothing left to gate
    ],
)
def test_out_of_range_value_names_the_key(override: str, key: str) -> None:
    cfg = compose(override.split(";"))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_unknown_group_option_lists_the_choices() -> None:
    with pytest.raises(ConfigCompositionException) as exc:
        compose(["model=gpt5"])
    assert "smollm2_135m" in str(exc.value)


def test_job_tag_is_readable_and_safe() -> None:
    assert job_tag("") == "defaults"
    assert job_tag("ember=off,method=ga") == "ember=off,method=ga"
    assert "/" not in job_tag("data.release_dir=/a/b")
    long = job_tag("x=" + "a" * 300)
    assert len(long) <= 120 and long != job_tag("x=" + "a" * 299 + "b")


@pytest.mark.parametrize(
    "override, key, hint",
    [
        ("method.search=qiuck", "method.search", "'quick'"),  # would silently run the full grid
        ("eval.frac_on=bogus", "eval.frac_on", "'p_correct'"),  # would give NaN efficacy
        ("eval.open_judge=bogus", "eval.open_judge", "'llm'"),
        ("eval.coherence_judge=bogus", "eval.coherence_judge", "'llm'"),
        ("ember.selector.name=bogus", "ember.selector.name", "'ratio'"),  # from the SELECTORS registry
        ("ember.selector.name=ratio+purty", "ember.selector.name", "'purity'"),
        ("ember.coherence_gate=1.5", "ember.coherence_gate", "[0, 1]"),
        ("ember.coherence_gate=-0.1", "ember.coherence_gate", "[0, 1]"),
        ("method.retention_gate=2", "method.retention_gate", "[0, 1]"),
        ("ember.selector.purity_thresh=1.5", "ember.selector.purity_thresh", "[0, 1]"),
        ("ember.selector.exclusivity_thresh=-1", "ember.selector.exclusivity_thresh", "[0, 1]"),
        ("ember.selector.anchor_thresh=20", "ember.selector.anchor_thresh", "[0, 1]"),
        ("ember.selector.llm_confidence=85", "ember.selector.llm_confidence", "[0, 1]"),
        ("eval.f1_threshold=50", "eval.f1_threshold", "[0, 1]"),
        ("save_erased_weights_max_gib=-1", "save_erased_weights_max_gib", ">= 0"),
    ],
)
def test_misspelt_choice_or_fraction_out_of_range_names_key_value_and_fix(override: str, key: str, hint: str) -> None:
    cfg = compose([override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as exc:
        validate(cfg)
    value = override.split("=", 1)[1]
    assert value.split("+")[-1] in str(exc.value) and hint in str(exc.value), str(exc.value)


def test_combined_selectors_and_every_choice_validate() -> None:
    from ember.config import CHOICES

    for name in ("ratio+anchor", "ratio+"):  # select_features ignores an empty part too
        cfg = compose([f"ember.selector.name={name}"])
        validate(cfg)
        assert cfg.ember.selector.name == name
    assert CHOICES
    for key, (choices, _) in CHOICES.items():
        for choice in choices:
            cfg = compose([f"{key}={choice}", "eval.llm_endpoint=http://localhost:8000/v1"])  # llm judges need one
            validate(cfg)
            assert OmegaConf.select(cfg, key) == choice, (key, choice)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_on_a_machine_without_it_fails_before_any_load() -> None:
    for override in ("model.device=cuda", "ember.factorization.device=cuda:0"):
        with pytest.raises(ConfigError, match="no CUDA device is visible"):
            validate(compose([override]))
    validate(compose(["model.device=cpu", "ember.factorization.device=auto"]))  # what works here passes


def test_settings_that_change_no_result_keep_the_job_directorys_name() -> None:
    """stages.NON_RESULT_KEYS (data paths, batch sizes, the LLM judge's plumbing) are left out of the
    stage hashes; they must stay out of the directory name too, or a relaunch with a smaller batch after
    an out-of-memory error would start over in a new directory."""
    from ember.stages import NON_RESULT_KEYS

    excluded = set(OmegaConf.load(CONF_DIR / "config.yaml").hydra.job.config.override_dirname.exclude_keys)
    missing = {f"{section}.{key}" for section, keys in NON_RESULT_KEYS.items() for key in keys} - excluded
    assert missing == set()
