"""SNMF: the training-free MLP weight edit of reference-spec 4.1 on Semi-NMF features (spec 1.3).

For every layer in the configured range(s), one layer at a time:

1. collect the gated-MLP hidden state (the input of ``down_proj``, i.e. ``act(gate(x)) * up(x)``)
   for every kept token occurrence of the concept's and the neutral sentences (padding and special
   tokens dropped), with a forward pre-hook that stops the forward pass there; computed in float32
   as the reference's TransformerLens model does (a bf16 model's upstream weights are upcast for the
   collection and restored bit for bit afterwards; ``activation_dtype: model`` keeps the model's dtype);
2. fit ``A ~= F G^T`` (``A``: d_mlp x N occurrences; F sparse and signed, G non-negative) with
   :func:`ember.factorize.semi_nmf`; the factors and per-feature statistics are cached in the job's
   ``ArtifactCache`` keyed by a fingerprint of every weight upstream of that MLP, the layer, the
   data and the fit settings, and the activations are freed before the next layer;
3. select features with ``ratio_abs = mean G over concept occurrences / (mean G over neutral
   occurrences + 1e-8) >= ratio_thresh`` (each occurrence labelled by the sentence it comes from, as
   in the reference, spec 1.1 and 2.3; ``occurrence_labels: token`` labels by token id like the
   embedding track instead: concept-only vs neutral-only tokens, "both" excluded);
4. restrict each feature's neuron support ``F[:,k] != 0`` with the coverage filter (spec 2.5);
5. directions from the weights as handed in: ``f_in = F[:,k]^T W_up`` and ``f_out = W_down F[:,k]``.

Then (after every layer is planned, so every statistic comes from the unedited MLPs) the edits, with
``f^ = f / (||f|| + 1e-8)`` and J the feature's masked neurons, applied feature by feature, all in-side
edits first, then all out-side edits:

    W_up[J, :]   <- W_up[J, :]   - delta_in  * (W_up[J, :] f^) f^T
    W_down[:, J] <- W_down[:, J] - delta_out * f^ (f^T W_down[:, J])

delta = 1 projects the direction out of those neurons; larger deltas reverse it. A delta of 0 skips
its side entirely (both 0: the model is not touched, bit for bit). gate_proj is never touched.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ember.errors import DataError
from ember.factorize import semi_nmf
from ember.features import BACKGROUND_ONLY, CONCEPT_ONLY, label_tokens
from ember.methods.base import Method, MethodContext, MethodReport, register_method
from ember.methods.training import (
    StopForward,
    bad_param,
    check_layer_range,
    check_non_negative,
    check_positive,
    check_positive_int,
    make_batches,
    model_device,
    plain_params,
    require,
    resolve_layer_range,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# activations


@contextmanager
def upcast_upstream(model: nn.Module, layer: int) -> Iterator[None]:
    """Compute in float32 up to decoder layer ``layer``: the embeddings' and blocks 0..layer's floating
    parameters are swapped for float32 copies and the original tensors put back afterwards (bit for bit,
    also after an error). A float32 model is left alone."""
    from ember.models import decoder_layers

    modules = [model.get_input_embeddings(), *decoder_layers(model)[: layer + 1]]
    params = {id(q): q for m in modules for q in m.parameters()
              if q.is_floating_point() and q.dtype != torch.float32}
    saved = {k: q.data for k, q in params.items()}
    try:
        for q in params.values():
            q.data = q.data.float()
        yield
    finally:
        for k, q in params.items():
            q.data = saved[k]


@torch.no_grad()
def collect_mlp_hidden(model: nn.Module, tokenizer: Any, texts: list[str], layer: int, batch_size: int,
                       max_length: int, dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gated-MLP hidden states of one layer for every kept token occurrence, computed in float32 (the
    reference's) or, with ``dtype="model"``, in the model's own dtype.

    Returns ``(acts (N x d_mlp) float32 CPU, token ids (N,), text index (N,))``."""
    if dtype == "float32":
        with upcast_upstream(model, layer):
            return collect_mlp_hidden(model, tokenizer, texts, layer, batch_size, max_length, "model")
    from ember.models import decoder_layers

    down = decoder_layers(model)[layer].mlp.down_proj
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    box: dict[str, torch.Tensor] = {}

    def pre_hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        box["a"] = args[0]
        raise StopForward

    acts, ids_out, src = [], [], []
    handle = down.register_forward_pre_hook(pre_hook)
    try:
        for start, b in zip(range(0, len(texts), batch_size),
                            make_batches(tokenizer, texts, batch_size, max_length, model_device(model)), strict=True):
            try:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            except StopForward:
                pass
            ids = b.input_ids.cpu()
            keep = (b.attention_mask.cpu() == 1) & ~torch.isin(ids, special)
            acts.append(box.pop("a").float().cpu()[keep])
            ids_out.append(ids[keep])
            rows = torch.arange(start, start + ids.shape[0])[:, None].expand_as(ids)
            src.append(rows[keep])
    finally:
        handle.remove()
    return torch.cat(acts), torch.cat(ids_out), torch.cat(src)


def occurrence_labels(token_ids: torch.Tensor, from_concept: torch.Tensor, special: set[int], mode: str) -> torch.Tensor:
    """1 = concept occurrence, 0 = neutral occurrence, 2 = excluded ("both" tokens in token mode)."""
    if mode == "sentence":
        return from_concept.long()
    con = Counter(token_ids[from_concept].tolist())
    neu = Counter(token_ids[~from_concept].tolist())
    vprime, labels, _ = label_tokens(con, neu, special)
    lut = dict(zip(vprime, labels, strict=True))
    return torch.tensor([lut.get(t, 2) for t in token_ids.tolist()], dtype=torch.long)


def feature_ratios(G: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    g = G.abs().double()
    con, neu = labels == CONCEPT_ONLY, labels == BACKGROUND_ONLY
    zeros = torch.zeros(g.shape[1], dtype=torch.float64)
    mean_con = g[con].mean(0) if con.any() else zeros
    mean_neu = g[neu].mean(0) if neu.any() else zeros
    return {"mean_concept": mean_con.float(), "mean_neutral": mean_neu.float(),
            "ratio_abs": (mean_con / (mean_neu + 1e-8)).float(),
            "n_concept": int(con.sum()), "n_neutral": int(neu.sum())}


def coverage_keep(F: torch.Tensor, features: list[int], thresh: float | None) -> torch.Tensor:
    """Boolean (d_mlp,) neurons kept by the coverage filter over one layer's selected features (spec 2.5)."""
    active = (F[:, features] != 0).any(1)
    if thresh is None or not features:
        return active
    Fk = F[:, features].abs()
    mass = (Fk / Fk.norm(dim=0).clamp_min(1e-12)).sum(1)
    idx = torch.nonzero(mass > 0).squeeze(1)
    order = idx[mass[idx].argsort(descending=True)]
    cum = mass[order].double().cumsum(0)
    k = int(torch.searchsorted(cum, thresh * cum[-1].item())) + 1
    keep = torch.zeros_like(active)
    keep[order[: min(k, len(order))]] = True
    return keep


# --------------------------------------------------------------------------------------------------
# fingerprints for the cache key


class WeightFingerprints:
    """SHA-1 digests of parameter tensors (computed once per tensor per apply)."""

    def __init__(self) -> None:
        self._memo: dict[int, str] = {}

    def tensor(self, t: torch.Tensor) -> str:
        key = id(t)
        if key not in self._memo:
            raw = t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()
            self._memo[key] = hashlib.sha1(raw).hexdigest()
        return self._memo[key]

    def upstream_of_mlp(self, model: nn.Module, layer: int) -> str:
        """Everything that can change the MLP input of ``layer``: embeddings and blocks 0..layer."""
        from ember.models import decoder_layers

        h = hashlib.sha1()
        mods = [("embed", model.get_input_embeddings())] + [
            (f"layer{i}", blk) for i, blk in enumerate(decoder_layers(model)[: layer + 1])]
        for prefix, mod in mods:
            for n, p in mod.named_parameters():
                h.update(f"{prefix}.{n}:{tuple(p.shape)}:{p.dtype}:{self.tensor(p)}".encode())
        return h.hexdigest()[:20]


def texts_digest(concept: list[str], neutral: list[str]) -> str:
    h = hashlib.sha1()
    for group in (concept, neutral):
        h.update(str(len(group)).encode())
        for s in group:
            h.update(s.encode())
            h.update(b"\x1f")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# the method


class FitFailed(Exception):
    """The factorization of a layer could not be computed (reported as a diverged run)."""


@dataclass
class FeatureEdit:
    layer: int
    feature: int
    neurons: torch.Tensor  # indices J into d_mlp
    f_in: torch.Tensor  # unit d_model direction (float32)
    f_out: torch.Tensor


FIT_KEYS = ("rank", "f_sparsity", "reg", "reg_tries", "max_iter", "stopping", "tol", "patience", "plateau_rel_tol",
            "plateau_patience")


@functools.cache
def _fit_code_version() -> str:
    """The code an MLP factorization depends on (this module's activation collection and labels, the Semi-NMF
    fit, the token labels), not the training loop or the grid protocol: the fits are the expensive part."""
    import importlib
    import sys

    from ember.cache import source_digest

    return source_digest([sys.modules[__name__], *(importlib.import_module(m) for m in SNMF.code_modules)])


@register_method
class SNMF(Method):
    name = "snmf"
    code_modules = ("ember.factorize", "ember.features")  # the Semi-NMF fit and the token labels
    defaults: dict[str, Any] = {
        "in_layers": [0.0, 0.32],  # inclusive range (ints or fractions of depth) edited on the up_proj side
        "in_delta": 1.0,  # 0 = no up_proj edit
        "out_layers": [0.0, 0.32],  # range edited on the down_proj side
        "out_delta": 1.0,  # 0 = no down_proj edit
        "ratio_thresh": 2.0,
        "coverage_thresh": 0.95,  # null = the whole support of each feature
        "occurrence_labels": "sentence",  # sentence of origin (the reference's) | token (concept-only vs neutral-only ids)
        "activation_dtype": "float32",  # float32 (the reference's) | model (the model's dtype: less memory on bf16)
        "rank": 100,  # Semi-NMF rank K (paper: 100 Gemma-2-2B, 200 Llama-3.1-8B)
        "f_sparsity": 0.01,  # fraction of d_mlp kept per F column
        "reg": 1e-4,
        "reg_tries": 4,
        "max_iter": 20000,
        "stopping": "plateau",  # plateau (relative, short patience) | reference (abs tol 1e-4, patience 500)
        "tol": 1e-4,
        "patience": 500,
        "plateau_rel_tol": 1e-4,
        "plateau_patience": 25,
        "fit_device": "auto",
        "batch_size": 16,  # activation collection
        "max_length": 128,
    }

    def check_params(self) -> None:
        self.params = p = plain_params(self.params)
        check_layer_range("in_layers", p["in_layers"])
        check_layer_range("out_layers", p["out_layers"])
        check_non_negative(p, "in_delta")
        check_non_negative(p, "out_delta")
        check_non_negative(p, "ratio_thresh")
        c = p["coverage_thresh"]
        require(c is None or (isinstance(c, (int, float)) and not isinstance(c, bool) and 0 < c <= 1),
                "coverage_thresh", c, "use a fraction in (0, 1], or null to keep each feature's whole support")
        require(p["occurrence_labels"] in ("token", "sentence"), "occurrence_labels", p["occurrence_labels"],
                "use 'sentence' (sentence of origin) or 'token' (concept-only vs neutral-only token ids)")
        require(p["activation_dtype"] in ("float32", "model"), "activation_dtype", p["activation_dtype"],
                "use 'float32' (the reference's) or 'model' (the model's own dtype)")
        for k in ("rank", "reg_tries", "max_iter", "patience", "plateau_patience", "batch_size", "max_length"):
            check_positive_int(p, k)
        require(isinstance(p["f_sparsity"], (int, float)) and 0 < p["f_sparsity"] <= 1, "f_sparsity",
                p["f_sparsity"], "use a fraction in (0, 1], e.g. 0.01")
        for k in ("reg", "tol", "plateau_rel_tol"):
            check_positive(p, k)
        require(p["stopping"] in ("plateau", "reference"), "stopping", p["stopping"], "use 'plateau' or 'reference'")
        require(isinstance(p["fit_device"], str), "fit_device", p["fit_device"], "use auto, cpu or cuda")

    # ----------------------------------------------------------------------------------------------

    def _layer_factors(self, ctx: MethodContext, layer: int, texts: list[str], n_concept: int, data_key: str,
                       fps: WeightFingerprints) -> dict[str, Any]:
        p = self.params
        key = {"model": ctx.facts.name, "source": ctx.facts.source, "weights": fps.upstream_of_mlp(ctx.model, layer),
               "layer": layer, "data": data_key, "labels": p["occurrence_labels"], "max_length": p["max_length"],
               "activation_dtype": p["activation_dtype"], "code": _fit_code_version(),
               "seed": ctx.seed, **{k: p[k] for k in FIT_KEYS}}

        def build() -> dict[str, Any]:
            t0 = time.perf_counter()
            acts, ids, src = collect_mlp_hidden(ctx.model, ctx.tokenizer, texts, layer, p["batch_size"], p["max_length"],
                                                  p["activation_dtype"])
            t_collect = time.perf_counter() - t0
            d_mlp, n = acts.shape[1], acts.shape[0]
            if p["rank"] > min(d_mlp, n):
                raise bad_param("rank", p["rank"], f"must not exceed min(d_mlp={d_mlp}, occurrences={n}) at layer {layer}")
            if not torch.isfinite(acts).all():
                raise FitFailed(f"layer {layer}: the MLP activations contain NaN/inf")
            try:
                res = semi_nmf(acts.T, p["rank"], p["f_sparsity"], p["reg"], p["reg_tries"], p["tol"], p["patience"],
                               p["max_iter"], p["stopping"], p["plateau_rel_tol"], p["plateau_patience"], ctx.seed,
                               p["fit_device"], ctx.progress)
            except RuntimeError as exc:  # every ridge value failed (ember.factorize)
                raise FitFailed(f"layer {layer}: {exc}") from exc
            labels = occurrence_labels(ids, src < n_concept, set(ctx.tokenizer.all_special_ids), p["occurrence_labels"])
            stats = feature_ratios(res.G, labels)
            del acts
            log.info("snmf layer %d: %d occurrences, fit %.1fs (%d iterations, %s, rel. residual %.3f)", layer, n,
                     res.seconds, res.n_iter, res.stopped_by, res.relative_residual)
            return {"F": res.F, "stats": stats, "fit": {
                "seconds": res.seconds, "collect_seconds": t_collect, "n_iter": res.n_iter, "best_iter": res.best_iter,
                "stopped_by": res.stopped_by, "relative_residual": res.relative_residual, "occurrences": n,
                "reg_used": res.reg_used}}

        if ctx.cache is None:
            return build()
        from ember.data import slugify

        return ctx.cache.get_or_build("mlp_factors", f"{slugify(ctx.facts.name)}/{slugify(ctx.concept)}/layer{layer}",
                                      key, build)

    def plan(self, ctx: MethodContext, layers: list[int]) -> tuple[dict[int, list[FeatureEdit]], dict[str, Any]]:
        """Factor, select and compute directions for each layer, one layer at a time (no weight changes)."""
        from ember.models import decoder_layers

        p = self.params
        if not ctx.forget_texts or not ctx.retain_texts:
            raise DataError("SNMF needs both concept and neutral sentences; one list is empty")
        texts = list(ctx.forget_texts) + list(ctx.retain_texts)
        data_key = texts_digest(list(ctx.forget_texts), list(ctx.retain_texts))
        fps = WeightFingerprints()
        blocks = decoder_layers(ctx.model)
        plans: dict[int, list[FeatureEdit]] = {}
        info: dict[str, Any] = {"layers": {}}
        for layer in layers:
            payload = self._layer_factors(ctx, layer, texts, len(ctx.forget_texts), data_key, fps)
            F, ratio = payload["F"].float(), payload["stats"]["ratio_abs"]
            selected = [int(k) for k in torch.nonzero(ratio >= p["ratio_thresh"]).squeeze(1).tolist()]
            keep = coverage_keep(F, selected, p["coverage_thresh"])
            mlp = blocks[layer].mlp
            W_up = mlp.up_proj.weight.detach().float()
            W_down = mlp.down_proj.weight.detach().float()
            edits = []
            for k in selected:
                col = F[:, k].to(W_up.device)
                neurons = torch.nonzero((F[:, k] != 0) & keep).squeeze(1)
                if neurons.numel() == 0:
                    continue
                f_in, f_out = col @ W_up, W_down @ col
                edits.append(FeatureEdit(layer, k, neurons.to(W_up.device), f_in / (f_in.norm() + 1e-8),
                                         f_out / (f_out.norm() + 1e-8)))
            plans[layer] = edits
            info["layers"][layer] = {"selected": selected, "neurons_kept": int(keep.sum()),
                                     "max_ratio": float(ratio.max()) if ratio.numel() else 0.0, **payload["fit"]}
        return plans, info

    @staticmethod
    @torch.no_grad()
    def edit_in(up: nn.Linear, e: FeatureEdit, delta: float) -> None:
        W = up.weight
        rows = W[e.neurons].float()  # |J| x d_model
        f = e.f_in.to(rows.device)
        W[e.neurons] = (rows - delta * torch.outer(rows @ f, f)).to(W.dtype)

    @staticmethod
    @torch.no_grad()
    def edit_out(down: nn.Linear, e: FeatureEdit, delta: float) -> None:
        W = down.weight
        cols = W[:, e.neurons].float()  # d_model x |J|
        f = e.f_out.to(cols.device)
        W[:, e.neurons] = (cols - delta * torch.outer(f, f @ cols)).to(W.dtype)

    def check_against_model(self, n_layers: int, d_mlp: int | None = None) -> None:
        if d_mlp is not None:
            require(self.params["rank"] <= d_mlp, "rank", self.params["rank"],
                    f"must not exceed the model's MLP width d_mlp={d_mlp} (the paper: 100 Gemma-2, 200 Llama-3.1)")
        for side in ("in", "out"):
            if self.params[f"{side}_delta"] > 0:
                resolve_layer_range(self.params[f"{side}_layers"], n_layers, f"{side}_layers")

    def apply(self, ctx: MethodContext) -> MethodReport:
        from ember.models import decoder_layers

        start = time.perf_counter()
        p = self.params
        n = ctx.facts.n_layers
        in_layers = resolve_layer_range(p["in_layers"], n, "in_layers") if p["in_delta"] > 0 else []
        out_layers = resolve_layer_range(p["out_layers"], n, "out_layers") if p["out_delta"] > 0 else []
        report = MethodReport(name=self.name, params=dict(p))
        if not in_layers and not out_layers:  # delta 0 on both sides: an exact no-op
            report.extra = {"k_features_mlp_in": 0, "k_features_mlp_out": 0}
            report.seconds = time.perf_counter() - start
            return report
        hits0 = getattr(ctx.cache, "hits", 0)
        try:
            plans, info = self.plan(ctx, sorted(set(in_layers) | set(out_layers)))
        except FitFailed as exc:  # nothing has been written to the model yet
            report.status, report.reason = "diverged", f"semi-NMF fit failed: {exc}"
            report.seconds = time.perf_counter() - start
            return report
        blocks = decoder_layers(ctx.model)
        full = {id(prm): name for name, prm in ctx.model.named_parameters()}
        changed: list[str] = []
        k_in = k_out = 0
        for layer in in_layers:
            for e in plans[layer]:
                self.edit_in(blocks[layer].mlp.up_proj, e, p["in_delta"])
                k_in += 1
            if plans[layer]:
                changed.append(full[id(blocks[layer].mlp.up_proj.weight)])
        for layer in out_layers:
            for e in plans[layer]:
                self.edit_out(blocks[layer].mlp.down_proj, e, p["out_delta"])
                k_out += 1
            if plans[layer]:
                changed.append(full[id(blocks[layer].mlp.down_proj.weight)])
        report.changed_parameters = changed
        report.extra = {"k_features_mlp_in": k_in, "k_features_mlp_out": k_out, "in_layers": in_layers,
                        "out_layers": out_layers, "cache_hits": getattr(ctx.cache, "hits", 0) - hits0, **info}
        report.seconds = time.perf_counter() - start
        if k_in + k_out == 0:
            report.reason = "no feature passed ratio_thresh in the edited layers: the model is unchanged"
        return report
