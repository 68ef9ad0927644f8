"""A job's stages and their resumable result files.

One job = one (model, method, EMBER on/off, seed) cell over a list of concepts; each concept goes
through ``baseline -> features -> erase -> evaluate -> attacks -> relearn`` from a fresh copy of
the unedited model. Every stage writes ``<job>/<concept>/<stage>.json`` atomically with a status
(plus CSVs where useful); a rerun skips stages already complete unless ``overwrite=true``. The
erased model is rebuilt deterministically when a later stage still has to run.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import traceback
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ember.cache import ArtifactCache
from ember.config import validate_against_model
from ember.data import ConceptData, ConceptStore, background_sentences
from ember.errors import ConfigError, EmberError, ModelUnavailableError
from ember.locking import atomic_write_json, atomic_write_text, job_lock
from ember.paths import cache_root
from ember.seeding import seed_everything
from ember.stages import NON_RESULT_KEYS, stages_wanted
from ember.tracking import JobFiles, WandbLogger

log = logging.getLogger("ember")


def job_dir() -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path.cwd() / "outputs" / "adhoc"


def job_overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def config_summary(cfg: DictConfig) -> str:
    m, e = cfg.model, cfg.ember
    ember_txt = (f"on (K={e.factorization.rank}, sparsity={e.factorization.sparsity}, selector={e.selector.name}, "
                 f"delta={'grid ' + str(list(e.delta_grid)) if e.delta is None else e.delta})" if e.enabled else "off")
    attacks = list(cfg.attacks.get("enabled", [])) if cfg.attacks else []
    return "\n".join([
        f"model      {m.name} ({m.source}, {m.dtype}, device={m.device})",
        f"concepts   {cfg.concepts.source}: {list(cfg.concepts.names) or 'all'}",
        f"ember      {ember_txt}",
        f"method     {cfg.method.name} {OmegaConf.to_container(cfg.method.params) or ''}",
        f"eval       mc={cfg.eval.mc_mode}, open_qa={cfg.eval.open_qa}, coherence={cfg.eval.coherence}",
        f"attacks    {attacks}",
        f"relearn    {cfg.relearn.name}" + ("" if cfg.relearn.name == "none" else
                                             f" ({cfg.relearn.max_paragraphs} paragraphs, {cfg.relearn.epochs} epochs)"),
        f"logger     {cfg.logger.name}",
        f"seed       {cfg.seed}",
    ])


# --------------------------------------------------------------------------------------------------


#: the config sections each stage's result depends on, its upstream stages' included
_ERASED = ("model", "data", "seed", "ember", "method", "eval")
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "baseline": ("model", "data", "eval"),
    "features": ("model", "data", "seed", "ember"),
    "erase": _ERASED,
    "evaluate": _ERASED,
    "attacks": (*_ERASED, "attacks"),
    "relearn": (*_ERASED, "relearn"),
}


def stage_settings_keys(cfg: DictConfig) -> dict[str, str]:
    """Per stage, a hash of the resolved settings it depends on (``STAGE_SECTIONS``) and of the code that
    computes it: a stage record holds it, so a relaunch after a settings change (an edited YAML default:
    the job directory is named by the overrides only) or a code fix recomputes the stage instead of
    reusing it. The scoring code counts for every stage but the factorization; EMBER's code for the
    features stage and every stage after it; the base method's code from the erasure on."""
    from ember.code_versions import job_erasure_code, method_code_version
    from ember.evals.baseline import settings_hash
    from ember.evals.suite import scoring_code_version

    def section(name: str) -> Any:
        value = cfg.get(name)
        value = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in NON_RESULT_KEYS.get(name, ())}
        return value

    resolved = {name: section(name) for names in STAGE_SECTIONS.values() for name in names}
    # every stage but the factorization scores the model: a scorer fix recomputes it instead of setting
    # new numbers beside (or dividing them by) old ones
    scoring, method = scoring_code_version(), method_code_version(cfg.method.name)
    erasure = job_erasure_code(bool(cfg.ember.enabled))

    def code(stage: str) -> dict[str, str]:
        if stage == "baseline":
            return {"scoring_code": scoring}
        if stage == "features":
            return {"erasure_code": erasure}
        return {"scoring_code": scoring, "erasure_code": erasure, "method_code": method}

    return {stage: settings_hash({**{name: resolved[name] for name in names}, **code(stage)})
            for stage, names in STAGE_SECTIONS.items()}


class ConceptRun:
    """The stages for one concept within a job."""

    def __init__(self, cfg: DictConfig, lm: Any, store: ConceptStore, starter: ConceptStore, concept: ConceptData,
                 files: JobFiles, cache: ArtifactCache, logger: WandbLogger, settings_keys: dict[str, str]):
        self.cfg, self.lm, self.store, self.starter, self.concept = cfg, lm, store, starter, concept
        self.files, self.cache, self.logger = files, cache, logger
        self.settings_keys = settings_keys  # :func:`stage_settings_keys`, taken once per job before any stage runs
        self.slug = concept.slug
        self.work: torch.nn.Module | None = None
        self.edited_ids: list[int] = []
        self.timings: dict[str, float] = {}

    # -- helpers -------------------------------------------------------------------------------
    def _want(self, stage: str) -> bool:
        return stage in self.cfg.stages

    @cached_property
    def model_key(self) -> str:
        return model_cache_key(self.lm)

    @cached_property
    def data_key(self) -> str:
        """:func:`job_data_key` (stage records and cache keys hold it), computed once."""
        return job_data_key(self.concept, self.store, self.starter)

    def _done(self, stage: str) -> bool:
        return (not self.cfg.overwrite) and self.files.stage_done(self.slug, stage, self.data_key,
                                                                  self.settings_keys[stage])

    def _finish(self, stage: str, result: dict[str, Any], t0: float, status: str = "complete") -> dict[str, Any]:
        result = {**result, "seconds": round(time.perf_counter() - t0, 3)}
        self.timings[stage] = result["seconds"]
        self.files.write_stage(self.slug, stage, result, status, data=self.data_key,
                               settings=self.settings_keys[stage])
        metrics = result.get("metrics") or {}
        self.logger.summary(f"{self.slug}/{stage}", metrics)
        log.info("[%s] %s %s in %.1fs", self.concept.name, stage, status, result["seconds"])
        return result

    def _progress(self) -> bool:
        import sys

        return bool(self.cfg.progress) and sys.stderr.isatty()

    def background(self) -> list[str]:
        return background_sentences(self.cfg.ember.background, self.store, self.starter, self.concept.name)

    # -- stages --------------------------------------------------------------------------------
    def baseline(self) -> dict[str, Any]:
        from ember.evals.baseline import BaselineCache

        t0 = time.perf_counter()
        bc = BaselineCache(cache_root(self.cfg))
        res = {}
        for split in ("train", "test"):
            res[split] = bc.get_or_compute(
                self.lm.model, self.lm.tokenizer, self.lm.facts, self.concept, self.starter, self.cfg.eval, split,
                progress=self._progress())
        return self._finish("baseline", {"scores": res, "metrics": {f"test_{k}": v for k, v in res["test"].items()
                                                                  if isinstance(v, (int, float))}}, t0)

    def features(self) -> dict[str, Any]:
        from ember.features import CONCEPT_ONLY, compute_embedding_features

        t0 = time.perf_counter()
        e = self.cfg.ember
        feats = compute_embedding_features(
            self.lm.model, self.lm.tokenizer, self.lm.facts, self.concept.name, self.concept.sentences,
            self.background(), e.factorization, self.cache, progress=self._progress())
        ctx, report, selected = self._select(feats)
        self.files.write_table(self.slug, "features", report.to_dict("records"))
        from ember.edit import EditPlan

        plan = EditPlan.from_features(feats, selected)
        toks = [{"id": int(t), "text": self.lm.tokenizer.decode([int(t)]),
                 "norm_c": float(plan.direction[j].norm())} for j, t in enumerate(plan.token_ids)]
        toks.sort(key=lambda r: -r["norm_c"])
        self.files.write_table(self.slug, "edited_tokens", toks)
        n_concept_only = int((feats.labels == CONCEPT_ONLY).sum())
        self._feats, self._plan = feats, plan
        warning = "" if len(plan) else self._no_edit_warning(feats, ctx)
        return self._finish("features", {
            "warning": warning,
            "fit": {k: v for k, v in feats.fit.items() if k != "loss_curve"},
            "loss_curve_head": feats.fit["loss_curve"][:5], "n_vprime": int(feats.vprime.numel()),
            "n_concept_only": n_concept_only, "selected_features": selected,
            "n_edited_tokens": len(plan), "edited_tokens_sample": [t["text"] for t in toks[:40]],
            "metrics": {"n_selected_features": len(selected), "n_edited_tokens": len(plan),
                        "relative_residual": feats.fit["relative_residual"]}}, t0)

    def _select(self, feats: Any) -> tuple[Any, Any, list[int]]:
        """The selector's context, its per-feature report and the selected feature indices."""
        from ember.features import SelectionContext, select_features

        ctx = SelectionContext(self.lm.tokenizer, self.concept.name, list(self.concept.key_terms))
        report = select_features(feats, self.cfg.ember.selector, ctx)
        return ctx, report, [int(k) for k in report.loc[report["selected"], "feature"]]

    def _no_edit_warning(self, feats: Any, ctx: Any) -> str:
        """Say loudly, with the likely cause and the fixes, that EMBER will edit nothing for this concept."""
        from ember.features import CONCEPT_ONLY, key_term_token_ids

        conly = feats.vprime[feats.labels == CONCEPT_ONLY].tolist()
        terms = list(ctx.concept_terms) or [self.concept.name]
        anchors = set(key_term_token_ids(self.lm.tokenizer, terms)) & set(conly)
        msg = (f"[{self.concept.name}] EMBER selected no feature (selector {self.cfg.ember.selector.name!r}; "
               f"{len(conly)} concept-only tokens, {len(anchors)} of them from the key terms {terms[:5]}): "
               f"the edit is a no-op for this concept. Fixes: list key terms whose tokens appear only in "
               f"the concept's sentences in the store's key_terms.json, try another selector "
               f"(ember.selector.name=ratio), or a narrower background (ember.background=[neutral]).")
        log.warning(msg)
        return msg

    def _ensure_plan(self) -> None:
        if hasattr(self, "_plan"):
            return
        if self._done("features"):
            self._rebuild_plan()
        else:
            self.features()

    def _rebuild_plan(self) -> None:
        from ember.edit import EditPlan
        from ember.features import compute_embedding_features

        rec = self.files.read_stage(self.slug, "features")
        feats = compute_embedding_features(
            self.lm.model, self.lm.tokenizer, self.lm.facts, self.concept.name, self.concept.sentences,
            self.background(), self.cfg.ember.factorization, self.cache)
        plan = EditPlan.from_features(feats, rec["selected_features"])
        # the factorization is refitted when its cache entry is gone (another machine, another device type):
        # the recorded indices name features of the old fit, so they are checked against a fresh selection
        again = self._select(feats)[2]
        recorded_tokens = rec.get("n_edited_tokens", len(plan))
        if again != list(rec["selected_features"]) or recorded_tokens != len(plan):
            log.warning("[%s] the refitted factorization selects other features than features.json records "
                        "(%s, not %s): redoing the features stage so that the record describes the edit applied",
                        self.concept.name, again, rec["selected_features"])
            self.features()
            return
        self._feats, self._plan = feats, plan

    def _train_eval_data(self) -> dict[str, Any]:
        """Digests of the train-split evaluation data: part of every key for a choice made by evaluating."""
        from ember.evals.suite import data_settings

        return data_settings(self.lm.tokenizer, self.concept, self.starter, self.cfg.eval, "train")

    def _delta(self, base_train: dict[str, Any]) -> tuple[float, list[dict[str, Any]]]:
        from ember.code_versions import erasure_code_version
        from ember.delta import choose_delta
        from ember.edit import EmbeddingEditor
        from ember.evals.suite import evaluate, relative

        e = self.cfg.ember
        if e.delta is not None:
            return float(e.delta), []
        if len(self._plan) == 0:
            return 0.0, []
        key = {"model": self.model_key, "concept": self.concept.name,
               "tokens": self._plan.token_ids.tolist(), "features": self._plan.features,
               "fact": OmegaConf.to_container(e.factorization, resolve=True), "grid": list(e.delta_grid),
               "gates": [e.retention_gate, e.coherence_gate], "eval": OmegaConf.to_container(self.cfg.eval, resolve=True),
               "data": self.data_key, "code": erasure_code_version(),
               "eval_data": self._train_eval_data()}
        from ember.delta import passes_gates
        from ember.evals.suite import COHERENCE_KEYS, enabled_parts

        parts = enabled_parts(self.cfg.eval)
        cheap = [p for p in parts if p not in ("coherence", "open_qa", "lm_eval")]

        holder: dict[str, Any] = {}
        # every scored delta is logged as it finishes, so an interrupted grid resumes (the choice itself is
        # cached only once the grid is done)
        from ember.cache import key_hash
        from ember.resume_log import append_jsonl, read_jsonl

        progress_log, context = self.files.concept_dir(self.slug) / "delta_grid.jsonl", key_hash(key)
        if self.cfg.overwrite:
            progress_log.unlink(missing_ok=True)
        scored = {float(r["cell"]): r["row"] for r in read_jsonl(progress_log, context).values()}

        def score(delta: float) -> dict[str, Any]:
            if delta in scored:
                log.info("[%s] delta %-6g scored before this job was interrupted: reused", self.concept.name, delta)
                return scored[delta]
            if "model" not in holder:  # built only when the choice is not cached
                holder["model"] = copy.deepcopy(self.lm.model)
                holder["editor"] = EmbeddingEditor(holder["model"], self.lm.facts.embed_scale)
            model = holder["model"]
            holder["editor"].apply(self._plan, delta)
            s = evaluate(model, self.lm.tokenizer, self.concept, self.starter, self.cfg.eval, "train",
                         judge_model=self.lm.model, progress=False, parts=cheap)
            rel = relative(s, base_train)
            # the expensive parts only matter for a delta that passes the retention gate with a score
            if passes_gates(rel, None, (), e.retention_gate, 0.0, self.cfg.eval.gate_skip) and (rel.get("efficacy") or 0) > 0:
                rest = [p for p in parts if p not in cheap]
                if rest:
                    s.update({k: v for k, v in evaluate(
                        model, self.lm.tokenizer, self.concept, self.starter, self.cfg.eval, "train",
                        judge_model=self.lm.model, progress=False, parts=rest).items() if k != "rows"})
                    rel = relative(s, base_train)
            log.info("[%s] delta %-6g efficacy %.3f specificity %.3f coherence %s harmonic %.3f", self.concept.name,
                     delta, rel.get("efficacy", float("nan")), rel.get("specificity", float("nan")),
                     f"{rel.get('coherence', float('nan')):.3f}", rel.get("harmonic", float("nan")))
            row = {k: v for k, v in rel.items() if isinstance(v, (int, float))}
            append_jsonl(progress_log, {"cell": repr(float(delta)), "context": context, "row": row})
            return row

        def build() -> dict[str, Any]:
            choice = choose_delta(list(e.delta_grid), score, None, COHERENCE_KEYS, e.retention_gate,
                                  e.coherence_gate, progress=self._progress(), skip=self.cfg.eval.gate_skip)
            return {"delta": choice.delta, "rows": choice.rows, "reason": choice.reason}

        got = self.cache.get_or_build("delta_choice", f"{self.lm.facts.name}/{self.slug}", key, build)
        holder.clear()
        return float(got["delta"]), got["rows"]

    def _method_params(self) -> dict[str, Any]:
        return OmegaConf.to_container(self.cfg.method.params, resolve=True) or {}

    def _run_method(self, model: torch.nn.Module, params: dict[str, Any]) -> Any:
        from ember.methods import MethodContext, get_method

        seed_everything(self.cfg.seed)
        method = get_method(self.cfg.method.name, params)
        ctx = MethodContext(model=model, tokenizer=self.lm.tokenizer, facts=self.lm.facts,
                            forget_texts=list(self.concept.sentences), retain_texts=list(self.store.neutral),
                            concept=self.concept.name, seed=self.cfg.seed, progress=self._progress(), cache=self.cache,
                            master_weights=bool(self.cfg.model.master_weights))
        model.requires_grad_(False)
        rep = method.apply(ctx)
        model.eval()
        model.requires_grad_(False)
        return rep

    def _edited_copy(self, delta: float) -> torch.nn.Module:
        from ember.edit import EmbeddingEditor

        model = copy.deepcopy(self.lm.model)
        if self.cfg.ember.enabled and delta > 0:
            EmbeddingEditor(model, self.lm.facts.embed_scale).apply(self._plan, delta)
        return model

    def _search_params(self, delta: float) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The paper's grid protocol for the base method (``method.search=quick|full``)."""
        from ember.code_versions import job_erasure_code, method_code_version
        from ember.evals.baseline import settings_hash
        from ember.evals.suite import enabled_parts, evaluate, relative
        from ember.search import method_cells, search

        base = self._method_params()
        if self.cfg.method.search == "none" or self.cfg.method.name == "none":
            return base, None
        base_train = self._base_scores("train")
        # lm-eval tasks (MMLU) are measured in every cell when enabled: the paper's grid gates on them
        grid_parts = [p for p in enabled_parts(self.cfg.eval) if p not in ("coherence", "open_qa")]

        def score_cell(cell: dict[str, Any], with_coherence: bool) -> dict[str, Any]:
            model = self._edited_copy(delta)
            rep = self._run_method(model, {**base, **cell})
            if rep.status != "ok":
                return {"harmonic": 0.0, "harmonic_alpaca": 0.0, "status": rep.status, "reason": rep.reason}
            parts = grid_parts + (["coherence"] if with_coherence and self.cfg.eval.coherence else [])
            s = evaluate(model, self.lm.tokenizer, self.concept, self.starter, self.cfg.eval, "train",
                         judge_model=self.lm.model, parts=parts)
            s.pop("rows", None)
            return relative(s, base_train)

        out_dir = self.files.concept_dir(self.slug)
        if self.cfg.overwrite:  # recompute means every cell too, not only the stage file
            for name in ("grid.jsonl", "grid_validate.jsonl"):
                (out_dir / name).unlink(missing_ok=True)
        context = settings_hash({
            "model": self.model_key, "seed": self.cfg.seed, "delta": delta, "base": base,
            "gate": self.cfg.method.retention_gate,
            "edit": self._plan.token_ids.tolist() if self.cfg.ember.enabled and delta > 0 else [],
            "eval": OmegaConf.to_container(self.cfg.eval, resolve=True),
            "eval_data": self._train_eval_data(), "data": self.data_key,  # data: the texts each cell trains on
            "code": [job_erasure_code(bool(self.cfg.ember.enabled)), method_code_version(self.cfg.method.name)]})
        res = search(method_cells(self.cfg.method), score_cell, None, self.cfg.method.retention_gate,
                     self.cfg.method.top_k_validate, out_dir, self._progress(), context=context,
                     skip=self.cfg.eval.gate_skip)
        log.info("[%s] grid search: best %s (%d/%d cells pass the gate)", self.concept.name, res["best_params"],
                 res["n_passing"], res["n_cells"])
        return {**base, **res["best_params"]}, res

    def erase(self, need_model: bool) -> dict[str, Any] | None:
        from ember.edit import EmbeddingEditor

        done = self._done("erase")
        if done and not need_model:
            return self.files.read_stage(self.slug, "erase")
        if done and not self.cfg.overwrite and self._reload_erased():
            return self.files.read_stage(self.slug, "erase")
        t0 = time.perf_counter()
        seed_everything(self.cfg.seed)
        result: dict[str, Any] = {"ember": bool(self.cfg.ember.enabled)}
        delta = 0.0
        if self.cfg.ember.enabled:
            self._ensure_plan()
            delta, rows = self._delta(self._base_scores("train"))
            result["delta_grid"] = rows
            if rows:
                self.files.write_table(self.slug, "delta_grid", rows)
        params, search_res = self._search_params(delta)
        self.work = copy.deepcopy(self.lm.model)
        if self.cfg.ember.enabled:
            rep = EmbeddingEditor(self.work, self.lm.facts.embed_scale).apply(self._plan, delta, self.lm.tokenizer)
            self.edited_ids = self._plan.token_ids.tolist() if delta > 0 else []
            result["edit"] = rep.summary()
        mrep = self._run_method(self.work, params)
        result["method"] = mrep.to_dict()
        if search_res is not None:
            result["search"] = {k: v for k, v in search_res.items() if k != "validated"}
        edit = result.get("edit", {})
        result["metrics"] = {"delta": edit.get("delta", 0.0),
                             "n_edited_tokens": edit.get("n_tokens", 0) if edit.get("delta", 0.0) > 0 else 0,
                             "method_steps": mrep.steps}
        status = "complete" if mrep.status == "ok" else "failed"
        if status == "failed":  # top-level reason, as every failed stage has (read by the sweep summary)
            result["reason"] = f"method {mrep.name} {mrep.status}: {mrep.reason}"
        result["edited_token_ids"] = self.edited_ids
        if status == "complete" and self.cfg.save_erased_weights:
            from ember.erased_weights import save_diff

            result["erased_weights"] = save_diff(self.files.concept_dir(self.slug) / "erased_weights.safetensors",
                                                 self.lm.model, self.work, self.cfg.save_erased_weights_max_gib)
        if done:  # recomputed because the saved weights were missing or corrupt: save them again
            rec = self.files.read_stage(self.slug, "erase") or {}
            if "erased_weights" in result:
                rec["erased_weights"] = result["erased_weights"]
                self.files.write_stage(self.slug, "erase", rec, rec.get("status", "complete"))
            return rec
        return self._finish("erase", result, t0, status)

    def _reload_erased(self) -> bool:
        """Rebuild the erased model from the saved weight difference of a finished erase stage."""
        from ember.erased_weights import apply_diff, load_diff

        rec = self.files.read_stage(self.slug, "erase") or {}
        saved = rec.get("erased_weights")
        if rec.get("status") != "complete" or not saved or "file" not in saved:  # none, or too large to keep
            return False
        diff = load_diff(self.files.concept_dir(self.slug) / saved["file"], saved.get("sha256"))
        if diff is None:
            return False
        self.work = copy.deepcopy(self.lm.model)
        apply_diff(self.work, diff)
        self.work.eval()
        self.work.requires_grad_(False)
        self.edited_ids = list(rec.get("edited_token_ids", []))
        log.info("[%s] erased model reloaded from %s (%.1f MB)", self.concept.name, saved["file"],
                 saved.get("bytes", 0) / 1e6)
        return True

    def _base_scores(self, split: str) -> dict[str, Any]:
        rec = self.files.read_stage(self.slug, "baseline")
        if rec is None:
            rec = self.baseline()
        return rec["scores"][split]

    def evaluate(self) -> dict[str, Any]:
        from ember.evals.suite import evaluate, relative

        t0 = time.perf_counter()
        scores = evaluate(self.work, self.lm.tokenizer, self.concept, self.starter, self.cfg.eval, "test",
                          judge_model=self.lm.model, progress=self._progress())
        rows = scores.pop("rows", [])
        rel = relative(scores, self._base_scores("test"))
        self.files.write_table(self.slug, "evaluate_questions", rows)
        self.logger.table(f"{self.slug}/questions", rows)
        return self._finish("evaluate", {"scores": scores, "metrics": rel}, t0)

    def attacks(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        spec = self.cfg.attacks or {}
        enabled = list(spec.get("enabled", []))
        erased_acc, base_acc, reference = self._attack_reference_accuracies()
        out, rows, metrics = {}, [], {}
        for name in enabled:
            settings = OmegaConf.to_container(spec.get(name, {}) or {}, resolve=True)
            # each attack's result is kept in the job directory as soon as it is done: a crash in a later
            # attack (or a kill) loses nothing already computed; a resumed job reuses it
            context = self._partial_context(settings)
            done = self._partial_result(f"attack_{name}", context)
            if done is None:
                done = self._one_attack(name, settings, erased_acc, base_acc, reference)
                self.files.write_partial(self.slug, f"attack_{name}", context, done)
            out[name] = done["out"]
            metrics.update(done["metrics"])
            rows += done["rows"]
        if rows:
            self.files.write_table(self.slug, "attack_questions", rows)
        result = self._finish("attacks", {"attacks": out, "metrics": metrics}, t0)
        self.files.clear_partials(self.slug, "attack_")
        return result

    def _one_attack(self, name: str, settings: dict[str, Any], erased_acc: float | None, base_acc: float | None,
                    reference: str) -> dict[str, Any]:
        """One attack on the erased model and its control on the unedited model (cached across jobs)."""
        from ember.attacks import ATTACKS, AttackContext, attack_code_version
        from ember.attacks.base import attack_recovered

        # max_questions: attacks score the same (capped) QA_test questions as baseline/evaluate, so the
        # recovered fraction compares like with like (without it they scored every question)
        ctx = AttackContext(edited_token_ids=self.edited_ids, seed=self.cfg.seed, progress=self._progress(),
                            template=self.cfg.eval.prompt_template, batch_size=self.cfg.eval.batch_size,
                            max_questions=self.cfg.eval.max_questions)
        seed_everything(self.cfg.seed)
        t_attack = time.perf_counter()
        attacked = ATTACKS[name](self.work, self.lm.tokenizer, self.concept, settings, ctx)
        t_attack = time.perf_counter() - t_attack
        key = {"model": self.model_key, "concept": self.concept.name, "attack": name,
               "settings": settings, "edited": self.edited_ids, "seed": self.cfg.seed,
               "max_questions": self.cfg.eval.max_questions, "code": attack_code_version(name),
               "template": self.cfg.eval.prompt_template, "data": self.data_key}

        def control() -> Any:
            seed_everything(self.cfg.seed)
            return ATTACKS[name](self.lm.model, self.lm.tokenizer, self.concept, settings, ctx)

        t_control = time.perf_counter()
        ctrl = self.cache.get_or_build("attack_control", f"{self.lm.facts.name}/{self.slug}", key, control)
        t_control = time.perf_counter() - t_control  # about 0 when the control came from the cache
        rec = attack_recovered(attacked, erased_acc, base_acc)
        log.info("[%s] attack %-14s acc %.3f (control on unedited model %.3f, recovered %.2f) in %.1fs + %.1fs control",
                 self.concept.name, name, attacked.accuracy, ctrl.accuracy, rec, t_attack, t_control)
        return {
            "out": {"accuracy": attacked.accuracy, "control_accuracy": ctrl.accuracy, "erased_accuracy": erased_acc,
                    "base_accuracy": base_acc, "reference_scorer": reference,
                    "recovered_fraction": rec, "per_variant": attacked.per_variant,
                    "control_per_variant": ctrl.per_variant, "extra": attacked.extra,
                    "seconds": round(t_attack, 3), "control_seconds": round(t_control, 3)},
            "metrics": {f"{name}_acc": attacked.accuracy, f"{name}_control_acc": ctrl.accuracy,
                        f"{name}_recovered": rec},
            "rows": [{"attack": name, **r} for r in attacked.rows],
        }

    # -- results kept while a stage runs (crash safety) ------------------------------------------
    def _partial_context(self, settings: dict[str, Any]) -> str:
        """What a kept result depends on: its settings, the erased model (the erase record's bytes: a
        re-erased model invalidates it), the seed and the evaluation settings."""
        import hashlib

        from ember.cache import key_hash

        erase = self.files.stage_path(self.slug, "erase")
        erased = hashlib.sha256(erase.read_bytes()).hexdigest()[:16] if erase.exists() else ""
        return key_hash({"settings": settings, "erase": erased, "seed": self.cfg.seed,
                         "eval": OmegaConf.to_container(self.cfg.eval, resolve=True),
                         "data": self.data_key})

    def _partial_result(self, name: str, context: str) -> dict[str, Any] | None:
        if self.cfg.overwrite:
            return None
        got = self.files.read_partial(self.slug, name, context)
        if got is not None:
            log.info("[%s] %s finished before this job was interrupted: reused", self.concept.name, name)
        return got

    def _attack_reference_accuracies(self) -> tuple[float | None, float | None, str]:
        """The erased and the unedited model's plain QA_test accuracy, scored as the prompting attacks
        score (log-likelihood): the evaluate and baseline stages' numbers when the job scores that way,
        else measured here, so a recovered fraction never mixes two scorers."""
        if self.cfg.eval.mc_mode == "loglik":
            erased = (self.files.read_stage(self.slug, "evaluate") or {}).get("scores", {}).get("qa_acc")
            return erased, self._base_scores("test").get("qa_acc"), "loglik (the evaluate and baseline stages)"
        from ember.attacks import attack_code_version
        from ember.attacks.base import AttackContext, questions

        ctx = AttackContext(template=self.cfg.eval.prompt_template, batch_size=self.cfg.eval.batch_size)
        qs = questions(self.concept, ctx.eval_split, self.cfg.eval.max_questions)
        erased = ctx.score_plain(self.work, self.lm.tokenizer, qs).acc
        # the unedited model's score is the same for every job on this model and concept: cached
        key = {"model": self.model_key, "concept": self.concept.name, "attack": "plain (loglik)",
               "template": self.cfg.eval.prompt_template, "max_questions": self.cfg.eval.max_questions,
               "data": self.data_key, "code": attack_code_version()}
        base = self.cache.get_or_build("attack_control", f"{self.lm.facts.name}/{self.slug}", key,
                                       lambda: ctx.score_plain(self.lm.model, self.lm.tokenizer, qs).acc)
        log.info("[%s] attacks score by log-likelihood; plain accuracy so scored: erased %.3f, unedited %.3f "
                 "(eval.mc_mode=%s is used by evaluate and relearn)", self.concept.name, erased, base,
                 self.cfg.eval.mc_mode)
        return erased, base, "loglik (measured for the attacks)"

    def relearn(self) -> dict[str, Any]:
        from ember.attacks import AttackContext, recovered_fraction
        from ember.attacks.relearn import run_relearn
        from ember.evals.suite import mc_scorer

        t0 = time.perf_counter()
        ctx = AttackContext(seed=self.cfg.seed, template=self.cfg.eval.prompt_template,
                            batch_size=self.cfg.eval.batch_size, progress=self._progress(),
                            max_questions=self.cfg.eval.max_questions,  # the same capped questions as evaluate
                            mc_scorer=mc_scorer(self.cfg.eval, self.lm.tokenizer),
                            master_weights=bool(self.cfg.model.master_weights))
        settings = OmegaConf.to_container(self.cfg.relearn, resolve=True)
        context = self._partial_context(settings)
        res = self._partial_result("relearn", context)  # kept before the control runs (crash safety)
        if res is None:
            seed_everything(self.cfg.seed)
            res = run_relearn(self.work, self.lm.tokenizer, self.concept, settings, ctx).to_dict()
            self.files.write_partial(self.slug, "relearn", context, res)
        curve = res.get("curve", [])
        metrics = dict(res.get("metrics", {}))
        control = self._relearn_control(settings, ctx)
        if control is not None:
            base_curve = control.get("curve", [])
            base_acc = base_curve[0]["qa_acc"] if base_curve else math.nan
            erased_acc = curve[0]["qa_acc"] if curve else math.nan
            rec = recovered_fraction(res["accuracy"], erased_acc, base_acc)
            res.update({"control_accuracy": control["accuracy"], "control_curve": base_curve,
                        "base_accuracy": base_acc, "erased_accuracy": erased_acc, "recovered_fraction": rec})
            metrics.update({"relearn_control_acc": control["accuracy"], "relearn_recovered": rec})
            log.info("[%s] relearning: acc %.3f (control on the unedited model %.3f; erased %.3f, unedited %.3f; "
                     "recovered %.2f)", self.concept.name, res["accuracy"], control["accuracy"], erased_acc,
                     base_acc, rec)
        self.files.write_table(self.slug, "relearn_curve", curve)
        self.logger.table(f"{self.slug}/relearn_curve", curve)
        status = "complete" if res.get("status", "ok") == "ok" else "failed"
        result = self._finish("relearn", {**res, "metrics": metrics}, t0, status)
        self.files.clear_partials(self.slug, "relearn")
        return result

    def _relearn_control(self, settings: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
        """Relearning the unedited model with the same settings and seed (cached across jobs: it does not
        depend on the erasure). None when ``relearn.control`` is off, or ``in_place`` is set (the
        unedited model must stay as it is)."""
        from ember.attacks import attack_code_version
        from ember.attacks.relearn import run_relearn
        from ember.evals.suite import provenance

        if not settings.get("control", True):
            return None
        if settings.get("in_place"):
            log.warning("[%s] relearn.in_place=true: no control run (relearning the unedited model in place would "
                        "change it for later stages); set relearn.control=false to silence this", self.concept.name)
            return None
        key = {"model": self.model_key, "concept": self.concept.name, "attack": "relearn",
               "settings": {k: v for k, v in settings.items() if k != "control"}, "seed": self.cfg.seed,
               "master_weights": bool(self.cfg.model.master_weights),
               "max_questions": self.cfg.eval.max_questions, "template": self.cfg.eval.prompt_template,
               "scorer": {**provenance(self.cfg.eval), "use_chat": self.cfg.eval.use_chat},
               "data": self.data_key,
               "code": attack_code_version("relearn")}

        def control() -> dict[str, Any]:
            seed_everything(self.cfg.seed)
            return run_relearn(self.lm.model, self.lm.tokenizer, self.concept, settings, ctx).to_dict()

        return self.cache.get_or_build("attack_control", f"{self.lm.facts.name}/{self.slug}", key, control)

    # -- driver --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        c = self.cfg
        if self._want("baseline") and not self._done("baseline"):
            self.baseline()
        if c.ember.enabled and self._want("features") and not self._done("features"):
            self.features()
        later = [s for s in ("evaluate", "attacks", "relearn") if self._want(s) and not self._done(s)]
        if self._want("erase") or later:
            self.erase(need_model=bool(later))
            erased = self.files.read_stage(self.slug, "erase") or {}  # as written, with its status
            if erased.get("status") == "failed" and later:
                # A diverged method leaves NaN/exploded weights: evaluating, attacking or relearning that
                # model would record garbage as "complete". Record the later stages as skipped, with why.
                self.work = None
                for s in later:
                    if (s == "attacks" and not (c.attacks or {}).get("enabled")) or (
                            s == "relearn" and c.relearn.name == "none"):
                        continue
                    self._finish(s, {"reason": f"erase failed: {erased.get('reason', '')}", "metrics": {}},
                                 time.perf_counter(), "skipped")
                later = []
        if "evaluate" in later:
            self.evaluate()
        if "attacks" in later and (c.attacks or {}).get("enabled"):
            self.attacks()
        if "relearn" in later and c.relearn.name != "none":
            self.relearn()
        self.work = None
        out = collect_concept(self.files, self.slug)
        # stages finished by an earlier launch: their metrics into the W&B summary (this launch's are logged)
        self.logger.replay(self.slug, {k: v for k, v in out.items() if k.split("/", 1)[0] not in self.timings})
        return out


def collect_concept(files: JobFiles, slug: str) -> dict[str, Any]:
    """The flat metrics of every finished stage of one concept."""
    out: dict[str, Any] = {}
    for stage in ("baseline", "features", "erase", "evaluate", "attacks", "relearn"):
        rec = files.read_stage(slug, stage)
        if rec:
            for k, v in (rec.get("metrics") or {}).items():
                out[f"{stage}/{k}"] = v
            out[f"{stage}/status"] = rec.get("status")
    return out


def format_results(results: dict[str, dict[str, Any]]) -> str:
    keys = [("evaluate/efficacy", "efficacy"), ("evaluate/specificity", "specificity"),
            ("evaluate/coherence", "coherence"), ("evaluate/harmonic", "harmonic"),
            ("erase/delta", "delta"), ("erase/n_edited_tokens", "edited"),
            ("relearn/relearn_acc", "relearn acc"), ("relearn/relearn_retain_acc", "relearn retain")]
    import pandas as pd

    rows = []
    for concept, m in results.items():
        row = {"concept": concept}
        for k, label in keys:
            if k in m:
                row[label] = m[k]
        for k, v in m.items():
            if k.startswith("attacks/") and k.endswith("_acc") and "control" not in k:
                row[k.split("/", 1)[1]] = v
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.to_markdown(index=False, floatfmt=".3f") if not df.empty else "(no results)"


def run_job(cfg: DictConfig) -> float | None:
    from ember.preflight import preflight

    t_job = time.perf_counter()
    checked = preflight(cfg)
    out = job_dir()
    with job_lock(out):  # a relaunched sweep must not run a job that is still running elsewhere
        return _run_locked(cfg, checked, out, t_job)


def _run_locked(cfg: DictConfig, checked: Any, out: Path, t_job: float) -> float | None:
    files = JobFiles(out)
    files.write_meta(cfg, job_overrides())
    log.info("== ember job ==\n%s\njob dir    %s", config_summary(cfg), out)
    for c in checked.concepts:
        log.info("concept %-22s %s", c.name, ", ".join(f"{k}={v}" for k, v in c.stats().items()))
    # opened before the model loads: a W&B setting that cannot work (online without a key) fails in a second
    logger = WandbLogger(cfg, out, out.parent.name + "/" + out.name, [c.name for c in checked.concepts])
    try:
        return _run_logged(cfg, checked, out, t_job, files, logger)
    except BaseException:
        logger.finish(1)  # the W&B run says the job failed, not "finished" at exit (a no-op once finished)
        raise


def _run_logged(cfg: DictConfig, checked: Any, out: Path, t_job: float, files: JobFiles,
                logger: WandbLogger) -> float | None:
    from ember.models import load_model
    from ember.preflight import warn_fp16_overflow

    store, starter, concepts = checked.store, checked.starter, checked.concepts
    settings_keys = stage_settings_keys(cfg)  # the job's config: the same for every concept
    if not cfg.overwrite and all(all_done(cfg, files, c, store, starter, settings_keys) for c in concepts):
        log.info("every stage of every concept is complete in %s (overwrite=true recomputes)", out)
        results = {c.name: collect_concept(files, c.slug) for c in concepts}
        for c in concepts:
            logger.replay(c.slug, results[c.name])
            files.failure_path(c.slug).unlink(missing_ok=True)  # an earlier launch's
        return _finish_job(cfg, out, logger, results, {}, t_job, nothing_run=True)
    seed_everything(cfg.seed)
    lm = load_model(cfg.model, cache_root=cache_root(cfg))
    validate_against_model(cfg, lm.facts.d_model)
    warn_fp16_overflow(lm.facts.family, cfg.model.dtype)
    if "relearn" in stages_wanted(cfg):  # checked before any stage, not at the last one
        from ember.attacks.relearn import check_lora_targets, check_relearn_memory

        if cfg.relearn.name == "lora":
            check_lora_targets(lm.model, list(cfg.relearn.lora_targets))
        check_relearn_memory(lm.model, OmegaConf.to_container(cfg.relearn, resolve=True), bool(cfg.model.master_weights))
    cache = ArtifactCache(cache_root(cfg))
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    for i, concept in enumerate(concepts):
        try:
            results[concept.name] = ConceptRun(cfg, lm, store, starter, concept, files, cache, logger,
                                               settings_keys).run()
            files.failure_path(concept.slug).unlink(missing_ok=True)  # an earlier launch's
        except Exception as exc:  # one concept failing must not lose the others
            failures[concept.name] = f"{type(exc).__name__}: {exc}"
            log.error("[%s] failed: %s", concept.name, failures[concept.name])
            atomic_write_text(files.failure_path(concept.slug), traceback.format_exc())
            if isinstance(exc, (ConfigError, ModelUnavailableError)) and i + 1 < len(concepts):
                # a setting or a model, not this concept's data: the next concepts would fail the same way
                # after recomputing their baselines; they are left for the corrected command
                for later in concepts[i + 1:]:
                    failures[later.name] = f"not run: {type(exc).__name__} in {concept.name!r} first"
                log.error("not running %d remaining concept(s): fix the setting above and re-run (finished "
                          "stages are kept)", len(concepts) - i - 1)
                break
    return _finish_job(cfg, out, logger, results, failures, t_job)


def _finish_job(cfg: DictConfig, out: Path, logger: WandbLogger, results: dict[str, dict[str, Any]],
                failures: dict[str, str], t_job: float, nothing_run: bool = False) -> float | None:
    """results.json and summary.md (rewritten by every launch, so a job killed before writing them
    gets them from its relaunch; a launch that ran nothing keeps the recorded job time), the W&B run
    closed, and the sweep objective."""
    seconds = time.perf_counter() - t_job
    if nothing_run:
        try:
            seconds = float(json.loads((out / "results.json").read_text())["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    atomic_write_json(out / "results.json", {"results": results, "failures": failures, "seconds": seconds})
    table = format_results(results)
    atomic_write_text(out / "summary.md", f"# {cfg.experiment_name}\n\n{config_summary(cfg)}\n\n{table}\n")
    logger.finish(1 if failures else 0)
    log.info("\n%s\n\njob dir: %s  (%.1fs)", table, out, time.perf_counter() - t_job)
    if failures:
        raise EmberError(f"{len(failures)} concept(s) failed: {failures}; see FAILED.txt in {out}")
    return _objective(results)


def model_cache_key(lm: Any) -> str:
    """What cached results computed from the unedited model depend on: its source, dtype and weights
    (``model_identity``: a changed dtype or seed of a random model is another model) and its chat
    template (jailbreak templates and letter scoring render it)."""
    from ember.cache import key_hash
    from ember.evals.baseline import model_identity

    template = getattr(lm.tokenizer, "chat_template", None)
    return f"{lm.facts.source}|{model_identity(lm.model, lm.facts)}|chat:{key_hash({'t': template})}"


def _objective(results: dict[str, dict[str, Any]]) -> float | None:
    """The value a Hydra sweeper optimises: mean harmonic score over concepts."""
    h = [m.get("evaluate/harmonic") for m in results.values() if isinstance(m.get("evaluate/harmonic"), (int, float))]
    return float(sum(h) / len(h)) if h else None


def job_data_key(concept: ConceptData, store: ConceptStore, starter: ConceptStore) -> str:
    """The fingerprint of every text a concept's stages read: its own data, and what its data set and the
    starter set share (backgrounds, neutral sentences, control facts, instructions, held-out text)."""
    from ember.evals.baseline import settings_hash

    return settings_hash({"concept": concept.fingerprint(), "set": store.shared_fingerprint,
                          "starter": starter.shared_fingerprint})


def all_done(cfg: DictConfig, files: JobFiles, concept: ConceptData, store: ConceptStore, starter: ConceptStore,
             settings_keys: dict[str, str]) -> bool:
    fp = job_data_key(concept, store, starter)
    return all(files.stage_done(concept.slug, s, fp, settings_keys[s]) for s in stages_wanted(cfg))
