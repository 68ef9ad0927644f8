"""Base methods (GA, GradDiff, NPO, RMU, SNMF) on the tiny random Llama: what each one touches,
what it moves, the loss guard and the parameter checks. The whole file runs in well under a minute."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ember.errors import ConfigError
from ember.methods import METHODS, MethodContext, get_method
from ember.methods.rmu import RMU, control_vector, masked_mse
from ember.methods.training import (
    BatchCycler,
    layer_output,
    make_batches,
    mean_nll,
    resolve_layer,
    resolve_layer_range,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"

CONCEPT = ["Harry Potter waved his wand at Hogwarts.", "Hermione cast a spell in the Great Hall.",
           "The wizard Dumbledore led the school of magic.", "Ron Weasley played Quidditch with his broom.",
           "Voldemort sought the Philosopher's Stone.", "Hagrid kept a dragon egg in his hut."] * 2
NEUTRAL = ["The bakery opened at seven in the morning.", "Rainfall was heavy in the valley last spring.",
           "The committee approved the new budget for roads.", "A quiet train crossed the wide river bridge.",
           "The museum added a gallery of modern sculpture.", "Farmers harvested wheat before the storm."] * 2

FAST = {"batch_size": 6, "max_length": 32}


def ctx_for(tiny, model=None, **kw) -> MethodContext:
    return MethodContext(model=model if model is not None else copy.deepcopy(tiny.model), tokenizer=tiny.tokenizer,
                         facts=tiny.facts, forget_texts=CONCEPT, retain_texts=NEUTRAL, concept="Harry Potter",
                         seed=42, **kw)


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    after = model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


@torch.no_grad()
def nll(tiny, model, texts) -> float:
    bs = make_batches(tiny.tokenizer, texts, 6, 32)
    return sum(float(mean_nll(model, b)) for b in bs) / len(bs)


# --------------------------------------------------------------------------------------------------
# registry, configs, parameter checks


def test_registered_and_configs_valid() -> None:
    for name in ("ga", "graddiff", "npo", "rmu", "snmf"):
        assert name in METHODS
    for path in sorted(CONF.glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        method = get_method(cfg["name"], cfg.get("params"))
        for grid in ("grid", "quick_grid"):
            for key, values in (cfg.get(grid) or {}).items():
                assert key in method.defaults, f"{path.name}: {grid}.{key} is not a parameter"
                for v in values:  # every grid value passes the checks on its own
                    get_method(cfg["name"], {**(cfg.get("params") or {}), key: v})


def test_hydra_composed_params_work() -> None:
    """The pipeline passes ``cfg.method.params`` (OmegaConf containers, overrides parsed by Hydra)."""
    from tests.conftest import compose

    cfg = compose(["method=rmu", "method.params.layer=7", "method.params.layer_ids=[5,6,7]", "method.params.lr=1e-4"])
    rmu = get_method(cfg.method.name, cfg.method.params)
    assert rmu.params["layer_ids"] == [5, 6, 7] and rmu.resolve_layers(30) == (7, [5, 6, 7])
    snmf = get_method("snmf", compose(["method=snmf"]).method.params)
    assert snmf.params["in_layers"] == [0.0, 0.32]
    with pytest.raises(ConfigError, match=r"method\.params\.layer="):
        get_method("rmu", compose(["method=rmu", "method.params.layer=2.5"]).method.params)


@pytest.mark.parametrize("name,key,value", [
    ("ga", "lr", -1.0), ("ga", "steps", 0), ("ga", "trainable", "model.(layers"), ("ga", "layers", [0.5]),
    ("graddiff", "retain_weight", -1.0), ("npo", "beta", 0.0), ("rmu", "layer", 1.5), ("rmu", "layer_ids", []),
    ("rmu", "steps", 2.5), ("rmu", "param_names", "mlp.down_proj.weight"), ("rmu", "padding_side", "middle"),
    ("snmf", "coverage_thresh", 2.0),
    ("snmf", "in_delta", -1.0), ("snmf", "occurrence_labels", "words"), ("snmf", "out_layers", [0.9, "x"]),
])
def test_bad_params_name_the_key(name: str, key: str, value) -> None:
    with pytest.raises(ConfigError, match=rf"method\.params\.{key}="):
        get_method(name, {key: value})


def test_unknown_key_rejected() -> None:
    with pytest.raises(ConfigError, match=r"method\.params"):
        get_method("rmu", {"steering": 3.0})


def test_apply_time_checks_name_the_key(tiny) -> None:
    with pytest.raises(ConfigError, match=r"method\.params\.trainable="):
        get_method("ga", {"trainable": r"nothing\.matches"}).apply(ctx_for(tiny, model=tiny.model))
    with pytest.raises(ConfigError, match=r"method\.params\.layer="):
        RMU({"layer": 7}).resolve_layers(tiny.facts.n_layers)  # the tiny model has 2 layers
    with pytest.raises(ConfigError, match=r"method\.params\.layer_ids="):
        RMU({"layer": 0, "layer_ids": [1]}).resolve_layers(2)  # trains a layer after the hooked one


def test_layers_relative_to_depth() -> None:
    assert resolve_layer(0.25, 30, "layer") == 7  # SmolLM2: WMDP's 5,6,7
    assert RMU({}).resolve_layers(30) == (7, [5, 6, 7])
    assert RMU({}).resolve_layers(18)[0] == 4  # Gemma-3-270M
    assert [RMU({"layer": f}).resolve_layers(26)[0] for f in (0.22, 0.28, 0.34)] == [6, 7, 9]  # Gemma-2-2B
    assert [RMU({"layer": f}).resolve_layers(32)[0] for f in (0.22, 0.28, 0.34)] == [7, 9, 11]  # Llama: the paper's
    assert RMU({"layer": 7}).resolve_layers(26) == (7, [5, 6, 7])  # ints are absolute
    assert RMU({"layer": 1, "layer_ids": [0.0, 1]}).resolve_layers(2) == (1, [0, 1])
    assert resolve_layer(1.0, 18, "x") == 17 and resolve_layer(0.0, 18, "x") == 0
    assert resolve_layer_range([0.0, 0.32], 26, "x") == list(range(0, 9))  # paper Gemma range (0, 8)
    assert resolve_layer_range([0.36, 0.68], 32, "x") == list(range(11, 22))  # paper Llama range (11, 21)


def test_batch_schedule_is_predictable() -> None:
    cyc = BatchCycler([None] * 4, seed=3)  # type: ignore[list-item]
    plan = cyc.schedule(10)
    assert [cyc.next()[0] for _ in range(10)] == plan
    assert sorted(plan[:4]) == [0, 1, 2, 3] and sorted(plan[4:8]) == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------------
# training methods


def test_ga_raises_forget_loss_and_touches_only_trainable(tiny) -> None:
    ctx = ctx_for(tiny)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    nll0 = nll(tiny, ctx.model, CONCEPT)
    report = get_method("ga", {**FAST, "steps": 6, "lr": 1e-2, "layers": [1, 1]}).apply(ctx)
    assert report.status == "ok" and report.steps == 6
    expected = {f"model.layers.1.mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
    assert set(report.changed_parameters) == expected
    assert changed(before, ctx.model) == expected
    assert nll(tiny, ctx.model, CONCEPT) > nll0 + 0.3
    assert not any(p.requires_grad for p in ctx.model.parameters())  # flags restored


def test_graddiff_keeps_retain_loss_bounded(tiny) -> None:
    """GA and GradDiff, same seed/steps/lr: GA's ascent drags the retain NLL up with the forget NLL
    (the random model treats both corpora alike); GradDiff descends on retain at every step, so its
    retain NLL must not end above where it started (0.05 nats of slack for batch noise) while its
    forget NLL still rises."""
    common = {**FAST, "steps": 6, "lr": 1e-2}
    r0, f0 = nll(tiny, tiny.model, NEUTRAL), nll(tiny, tiny.model, CONCEPT)
    ga = ctx_for(tiny)
    get_method("ga", common).apply(ga)
    gd = ctx_for(tiny)
    report = get_method("graddiff", {**common, "retain_weight": 1.0}).apply(gd)
    assert report.status == "ok"
    r_ga, r_gd = nll(tiny, ga.model, NEUTRAL), nll(tiny, gd.model, NEUTRAL)
    assert r_gd <= r0 + 0.05
    assert r_gd < r_ga
    assert nll(tiny, gd.model, CONCEPT) > f0 + 0.3


def test_npo_reference_logprobs_computed_once(tiny) -> None:
    ctx = ctx_for(tiny)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    calls = {"n": 0}
    ctx.model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    steps = 5
    report = get_method("npo", {**FAST, "steps": steps, "lr": 1e-2, "layers": [0, 0]}).apply(ctx)
    assert report.status == "ok"
    n_ref = report.extra["reference_batches"]
    assert n_ref == 2  # 12 sentences / 6 per batch, both visited within 5 steps
    assert calls["n"] == n_ref + 2 * steps  # reference passes once up front; then forget + retain per step
    assert report.losses[0] == pytest.approx(2 / 0.1 * torch.log(torch.tensor(2.0)).item() + report.extra[
        "loss_parts"][0]["retain_nll"], rel=1e-4)  # log ratio 0 at the first step: -(2/beta) logsigmoid(0)
    assert report.extra["loss_parts"][-1]["log_ratio"] < 0  # forget sequences became less likely
    assert changed(before, ctx.model) == {f"model.layers.0.mlp.{m}_proj.weight" for m in ("gate", "up", "down")}


def test_rmu_steers_layer_toward_control_vector(tiny) -> None:
    ctx = ctx_for(tiny)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    c = 5.0
    u = control_vector(tiny.facts.d_model, ctx.seed)

    @torch.no_grad()
    def toward(model) -> tuple[float, float, float]:
        cos, mse, keep = [], [], []
        for b in make_batches(tiny.tokenizer, CONCEPT, 6, 32):
            h = layer_output(model, 1, b)
            cos.append(float(torch.nn.functional.cosine_similarity(h[b.attention_mask.bool()], u[None], dim=-1).mean()))
            mse.append(float(masked_mse(h, (c * u).expand_as(h), b.attention_mask)))
        for b in make_batches(tiny.tokenizer, NEUTRAL, 6, 32):
            keep.append(float(masked_mse(layer_output(model, 1, b), layer_output(tiny.model, 1, b), b.attention_mask)))
        return sum(cos) / len(cos), sum(mse) / len(mse), max(keep)

    cos0, mse0, _ = toward(ctx.model)
    report = get_method("rmu", {**FAST, "layer": 1.0, "steering_coeff": c, "alpha": 10.0, "lr": 1e-2,
                                "steps": 8}).apply(ctx)
    assert report.status == "ok" and report.extra["layer"] == 1 and report.extra["layer_ids"] == [0, 1]
    expected = {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    assert changed(before, ctx.model) == expected == set(report.changed_parameters)
    cos1, mse1, retain_drift = toward(ctx.model)
    assert cos1 > cos0 + 0.3 and mse1 < mse0
    assert retain_drift < 0.1 * mse0  # retain activations stay near the frozen model's
    assert report.extra["loss_parts"][0]["retain_mse"] == 0.0  # the frozen pass = the model as handed in


def test_rmu_pads_on_the_side_asked(tiny) -> None:
    """``padding_side: left`` is the reference's tokenizer; with ``mask_padding: false`` (the reference's
    MSE over every position) the padding positions count, so the side changes the loss."""
    right = make_batches(tiny.tokenizer, CONCEPT[:6], 6, 32)[0]
    left = make_batches(tiny.tokenizer, CONCEPT[:6], 6, 32, padding_side="left")[0]
    assert (right.attention_mask[:, 0] == 1).all() and (left.attention_mask[:, -1] == 1).all()
    assert not (left.attention_mask[:, 0] == 1).all()  # a shorter row is padded at the front
    assert torch.equal(left.attention_mask.sum(1), right.attention_mask.sum(1))
    first = {}
    for side in ("right", "left"):
        rep = get_method("rmu", {**FAST, "layer": 1, "steps": 1, "mask_padding": False, "steering_coeff": 0.0,
                                 "padding_side": side}).apply(ctx_for(tiny))
        assert rep.status == "ok"  # padding-only attention rows at the front stay finite
        first[side] = rep.extra["loss_parts"][0]["forget_mse"]
    assert first["left"] != pytest.approx(first["right"], rel=1e-4)


def test_rmu_one_pass_by_default(tiny) -> None:
    report = get_method("rmu", {**FAST, "layer": 0, "lr": 1e-4, "steps": None}).apply(ctx_for(tiny))
    assert report.steps == 2 and report.extra["layer_ids"] == [0]  # min(12/6, 12/6) batches


# --------------------------------------------------------------------------------------------------
# divergence guard


def test_exploding_lr_ends_diverged(tiny) -> None:
    report = get_method("ga", {**FAST, "steps": 4, "lr": 1e30}).apply(ctx_for(tiny))
    assert report.status == "diverged"
    assert "step" in report.reason and ("nan" in report.reason.lower() or "inf" in report.reason.lower()
                                        or "exploded" in report.reason or "non-finite" in report.reason)


def test_hooked_nan_ends_diverged(tiny) -> None:
    ctx = ctx_for(tiny)
    ctx.model.model.layers[0].register_forward_hook(lambda _m, _i, out: out * float("nan"))
    for name, params in (("rmu", {"layer": 1}), ("npo", {"steps": 2}), ("graddiff", {"steps": 2})):
        report = get_method(name, {**FAST, **params}).apply(ctx)
        assert report.status == "diverged" and report.steps == 0, name
        assert "step 0" in report.reason and "nan" in report.reason.lower(), report.reason
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    report = get_method("snmf", {**SNMF_FAST, "in_layers": [1, 1], "out_layers": [1, 1]}).apply(ctx)
    assert report.status == "diverged" and "NaN" in report.reason
    assert changed(before, ctx.model) == set()


# --------------------------------------------------------------------------------------------------
# SNMF


SNMF_FAST = {"rank": 12, "max_iter": 200, "plateau_patience": 10, "ratio_thresh": 1.0, "batch_size": 12}


def test_snmf_delta_zero_is_bit_exact_noop(tiny) -> None:
    ctx = ctx_for(tiny)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    report = get_method("snmf", {**SNMF_FAST, "in_delta": 0.0, "out_delta": 0.0}).apply(ctx)
    assert report.status == "ok" and report.changed_parameters == []
    assert changed(before, ctx.model) == set()


def test_snmf_edits_only_targeted_layers_and_caches(tiny, tmp_path) -> None:
    from ember.cache import ArtifactCache

    cache = ArtifactCache(tmp_path)
    ctx = ctx_for(tiny, cache=cache)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    params = {**SNMF_FAST, "in_layers": [1, 1], "out_layers": [1.0, 1.0], "in_delta": 2.0, "out_delta": 1.0}
    report = get_method("snmf", params).apply(ctx)
    assert report.extra["k_features_mlp_in"] > 0 and report.extra["k_features_mlp_out"] > 0
    expected = {"model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    assert set(report.changed_parameters) == expected == changed(before, ctx.model)
    assert cache.builds == 1  # one layer factored, one layer at a time

    # the same settings on a fresh copy reuse the cached factors and give the same edit
    ctx2 = ctx_for(tiny, cache=cache)
    get_method("snmf", params).apply(ctx2)
    assert cache.hits == 1 and cache.builds == 1
    assert all(torch.equal(ctx.model.state_dict()[k], ctx2.model.state_dict()[k]) for k in expected)

    # out side only: up_proj stays untouched
    ctx3 = ctx_for(tiny, cache=cache)
    r3 = get_method("snmf", {**params, "in_delta": 0.0}).apply(ctx3)
    assert set(r3.changed_parameters) == {"model.layers.1.mlp.down_proj.weight"}
    assert changed(before, ctx3.model) == {"model.layers.1.mlp.down_proj.weight"}


def test_snmf_labels_occurrences_by_sentence_as_the_reference() -> None:
    """Spec 1.1/2.3: each occurrence carries its sentence's label, so a feature that fires on a token shared
    by both sets only inside concept sentences is a concept feature (token labels would exclude it)."""
    from ember.methods.snmf import SNMF, feature_ratios, occurrence_labels

    ids = torch.tensor([5, 7, 9, 5, 8, 9])
    from_concept = torch.tensor([True, True, True, False, False, False])
    G = torch.zeros(6, 1)
    G[2, 0], G[5, 0] = 1.0, 0.1  # token 9 occurs in both sets; the feature fires on it 10x more in concept text
    by_default = occurrence_labels(ids, from_concept, set(), SNMF.defaults["occurrence_labels"])
    assert float(feature_ratios(G, by_default)["ratio_abs"][0]) == pytest.approx(10.0, rel=1e-6)
    assert float(feature_ratios(G, occurrence_labels(ids, from_concept, set(), "token"))["ratio_abs"][0]) == 0.0
    for preset in ("snmf", "snmf_paper_gemma2", "snmf_paper_llama"):
        params = OmegaConf.load(CONF / f"{preset}.yaml").params
        assert (params.occurrence_labels, params.activation_dtype) == ("sentence", "float32"), preset


def test_snmf_collects_bf16_activations_in_float32_and_restores_the_weights(tiny) -> None:
    from ember.methods.snmf import collect_mlp_hidden

    bf16 = copy.deepcopy(tiny.model).to(torch.bfloat16)
    before = {k: v.clone() for k, v in bf16.state_dict().items()}
    upcast = copy.deepcopy(bf16).float()  # the same (bf16-representable) weights, computed in float32
    want = collect_mlp_hidden(upcast, tiny.tokenizer, CONCEPT, 1, 6, 32)
    got = collect_mlp_hidden(bf16, tiny.tokenizer, CONCEPT, 1, 6, 32, "float32")
    native = collect_mlp_hidden(bf16, tiny.tokenizer, CONCEPT, 1, 6, 32, "model")
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert (native[0] - want[0]).abs().max() > 1e-4  # bf16 computation really differs
    assert all(v.dtype == torch.bfloat16 for v in bf16.state_dict().values() if v.is_floating_point())
    assert changed(before, bf16) == set()
