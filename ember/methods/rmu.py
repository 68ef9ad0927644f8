"""Representation misdirection for unlearning (RMU; Li et al. 2024, WMDP), reference-spec 4.2.

Hook the residual stream after decoder layer ``layer``. With ``u`` a random unit vector (uniform on
[0, 1)^d then normalised, as upstream, drawn from a ``torch.Generator`` seeded by the job seed) and
``c = steering_coeff``, each step minimises

    MSE(h_updated(forget batch), c * u) + alpha * MSE(h_updated(retain batch), h_frozen(retain batch))

with AdamW (eps 1e-6, no weight decay: the old ``transformers.AdamW`` upstream uses) on the
parameters called ``param_names`` (default ``mlp.down_proj.weight``) of the layers ``layer_ids``,
selected by name. The frozen model is the model as handed in (after the EMBER edit when on): only
the trained tensors differ, so their original values are kept and the frozen pass runs the same
modules with them swapped in (``torch.func.functional_call``); no second model is loaded. Forward
passes stop at the hooked layer (later layers cannot change the loss).

Layers are relative to depth by default (see ``ember.methods.training``): ``layer: 0.25`` and
``layer_ids: null`` (= the hooked layer and the two before it, the pattern of every paper setting).
``steps: null`` = one pass, ``min(#forget batches, #retain batches)`` steps, as in the reference; the
default (24 steps at lr 1e-3) is calibrated for SmolLM2-135M on a CPU, where one pass at the paper's
learning rates does not move the model (docs/methods.md).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.func import functional_call

from ember.errors import DataError
from ember.methods.base import Method, MethodContext, MethodReport, register_method
from ember.methods.training import (
    BatchCycler,
    StepOutput,
    TokenBatch,
    bad_param,
    check_layer_spec,
    check_non_negative,
    check_positive,
    check_positive_int,
    layer_output,
    make_batches,
    model_device,
    named_in_layers,
    plain_params,
    require,
    resolve_layer,
    seeded_shuffle,
    train_loop,
)


def control_vector(d_model: int, seed: int) -> torch.Tensor:
    """The unit control direction u (float32, CPU): uniform on [0, 1)^d, normalised."""
    gen = torch.Generator().manual_seed(int(seed))
    u = torch.rand(d_model, generator=gen)
    return u / u.norm()


def masked_mse(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over hidden units and (non-padding, when ``mask`` is given) positions."""
    sq = (h.float() - target.float()).pow(2).mean(-1)  # B x T
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype)
    return (sq * m).sum() / m.sum().clamp_min(1)


@register_method
class RMU(Method):
    name = "rmu"
    defaults: dict[str, Any] = {
        "layer": 0.25,  # hooked layer: fraction of depth (float) or absolute index (int)
        "layer_ids": None,  # trained layers; null = [layer-2, layer-1, layer]
        "param_names": ["mlp.down_proj.weight"],  # trained tensors, by name within each decoder layer
        "steering_coeff": 300.0,  # paper grid {30, 100, 300, 1000}
        "alpha": 10.0,  # retain weight; paper grid (Gemma) {10, 30, 50, 100}
        "lr": 1e-3,  # CPU calibration on SmolLM2 (docs/methods.md); paper grid {1e-5, 1e-4, 3e-4}
        "batch_size": 16,
        "max_length": 512,
        "steps": 24,  # null = one pass over the data (the reference: min(#forget, #retain batches))
        "mask_padding": True,  # false = the reference's MSE over every position, padding included
        "padding_side": "right",  # left = the reference's tokenizer (matters only with mask_padding: false)
        "adam_eps": 1e-6,
        "weight_decay": 0.0,
        "max_grad_norm": None,
    }

    def check_params(self) -> None:
        self.params = p = plain_params(self.params)
        check_layer_spec("layer", p["layer"])
        if p["layer_ids"] is not None:
            ids = p["layer_ids"]
            require(isinstance(ids, (list, tuple)) and len(ids) > 0, "layer_ids", ids,
                    "use a non-empty list of layers (ints or fractions of depth), or null")
            for v in ids:
                check_layer_spec("layer_ids", v)
        names = p["param_names"]
        require(isinstance(names, (list, tuple)) and len(names) > 0 and all(isinstance(n, str) and n for n in names),
                "param_names", names, "use a non-empty list of parameter names inside a decoder layer, "
                "e.g. [mlp.down_proj.weight]")
        for k in ("steering_coeff", "alpha", "weight_decay"):
            check_non_negative(p, k)
        check_positive(p, "lr")
        check_positive(p, "adam_eps")
        check_positive(p, "max_grad_norm", allow_none=True)
        for k in ("batch_size", "max_length"):
            check_positive_int(p, k)
        check_positive_int(p, "steps", allow_none=True)
        require(isinstance(p["mask_padding"], bool), "mask_padding", p["mask_padding"], "use true or false")
        require(p["padding_side"] in ("left", "right"), "padding_side", p["padding_side"], "use left or right")

    def check_against_model(self, n_layers: int, d_mlp: int | None = None) -> None:
        self.resolve_layers(n_layers)

    def resolve_layers(self, n_layers: int) -> tuple[int, list[int]]:
        layer = resolve_layer(self.params["layer"], n_layers, "layer")
        if self.params["layer_ids"] is None:
            ids = sorted({max(0, layer - 2), max(0, layer - 1), layer})
        else:
            ids = sorted({resolve_layer(v, n_layers, "layer_ids") for v in self.params["layer_ids"]})
        if max(ids) > layer:
            raise bad_param("layer_ids", self.params["layer_ids"], f"trained layers {ids} include layers after the "
                            f"hooked layer {layer}; they cannot change its activations")
        return layer, ids

    def apply(self, ctx: MethodContext) -> MethodReport:
        start = time.perf_counter()
        p = self.params
        model = ctx.model
        torch.manual_seed(ctx.seed)
        layer, layer_ids = self.resolve_layers(ctx.facts.n_layers)
        params = named_in_layers(model, layer_ids, p["param_names"], "param_names")
        frozen = {n: t.detach().clone() for n, t in params}  # only the trained tensors, never the whole model
        dev = model_device(model)
        if not ctx.forget_texts or not ctx.retain_texts:
            raise DataError("RMU needs both forget (concept) and retain (neutral) texts; one list is empty")
        # forget and retain texts shuffled with the job seed (the reference: one random.Random(42) for both)
        side = p["padding_side"]
        fb = make_batches(ctx.tokenizer, seeded_shuffle(ctx.forget_texts, ctx.seed), p["batch_size"], p["max_length"],
                          dev, side)
        rb = make_batches(ctx.tokenizer, seeded_shuffle(ctx.retain_texts, ctx.seed + 1), p["batch_size"],
                          p["max_length"], dev, side)
        steps = p["steps"] if p["steps"] is not None else min(len(fb), len(rb))
        # first pass in the order of the shuffled texts (upstream's single pass); later passes reshuffle
        forget, retain = BatchCycler(fb, ctx.seed, in_order=True), BatchCycler(rb, ctx.seed + 1, in_order=True)
        u = control_vector(ctx.facts.d_model, ctx.seed)
        target = (p["steering_coeff"] * u).to(dev)
        mask_pad = p["mask_padding"]

        def frozen_output(b: TokenBatch) -> torch.Tensor:
            # the same modules with the original values of the trained tensors swapped in for this pass
            with torch.no_grad():
                return layer_output(model, layer, b, forward=lambda **kw: functional_call(model, frozen, (), kw))

        def step(_: int) -> StepOutput:
            _, f = forget.next()
            _, r = retain.next()
            h_f = layer_output(model, layer, f)
            f_loss = masked_mse(h_f, target.to(h_f.dtype).expand_as(h_f), f.attention_mask if mask_pad else None)
            h_r = layer_output(model, layer, r)
            h_r0 = frozen_output(r)
            r_loss = masked_mse(h_r, h_r0, r.attention_mask if mask_pad else None)
            loss = f_loss + p["alpha"] * r_loss
            return StepOutput(loss, {"forget_mse": float(f_loss.detach()), "retain_mse": float(r_loss.detach())})

        report = train_loop(self.name, p, params, steps, step, p["lr"], weight_decay=p["weight_decay"],
                            eps=p["adam_eps"], max_grad_norm=p["max_grad_norm"], progress=ctx.progress,
                            extra={"layer": layer, "layer_ids": layer_ids, "control_seed": ctx.seed},
                            master_weights=ctx.master_weights)
        report.seconds = time.perf_counter() - start
        return report
