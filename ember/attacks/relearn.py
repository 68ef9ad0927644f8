"""The paper's relearning attack (reference-spec 6): fine-tune the erased model on concept paragraphs.

Protocol (``relearn=full``): the first ``max_paragraphs`` non-empty relearning paragraphs in file
order, ``epochs`` epochs, batch 1, truncation to ``max_length`` tokens, causal-LM cross-entropy,
every parameter trainable (embeddings included), AdamW (lr 1e-5, weight decay 0.01), no scheduler,
paragraph order reshuffled each epoch by a ``random.Random(seed)``. ``relearn=lora`` trains a peft
LoRA adapter on ``lora_targets`` instead (``lora_rank``, ``lora_alpha``, no dropout).

Concept-QA accuracy (eval split, scored as the job's evaluation scores: ``AttackContext.score_plain``,
log-likelihood or the paper's letter generation) is measured before training (epoch 0) and after
every epoch: a curve with ``epochs + 1`` points; retention (the similar-domain split) is measured at
the same points. The paper's "regained accuracy" is the raw concept-QA accuracy after the last epoch
(``accuracy``). The job also relearns the unedited model (``control``, cached) and computes the
recovered fraction of the base-to-erased gap from the two curves' first and last points.

A NaN or exploding loss (``divergence_factor`` times the first loss) stops training with status
``diverged`` and the reason; the curve up to that point is kept and ``accuracy`` is its last point.

The model passed in is trained on a deep copy unless ``in_place`` is set. The trained model is
returned by :func:`relearn_model`: a plain model for full fine-tuning; for LoRA, the adapter
merged into the weights (``merge_lora: true``, a plain model again) or the unmerged ``PeftModel``.

Deviations from the reference, on purpose: no padding to ``max_length`` (the reference padded every
paragraph to 256 tokens on the left, which only shifts position ids and costs compute); gradient
clipping when ``max_grad_norm > 0`` (the reference clips nothing: ``conf/relearn/paper.yaml`` sets
0); torch AdamW for every model (the reference used 8-bit AdamW for Llama-8B).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ember.attacks import register_attack
from ember.attacks.base import AttackContext, AttackResult, merge_settings, questions
from ember.errors import ConfigError
from ember.evals.loglik import right_pad
from ember.master_weights import MasterWeights
from ember.methods.base import loss_guard

log = logging.getLogger(__name__)

RELEARN_DEFAULTS: dict[str, Any] = {
    "name": "full",  # none | full | lora
    "epochs": 2,
    "max_paragraphs": 100,
    "batch_size": 1,
    "max_length": 256,
    "lr": 1e-5,
    "weight_decay": 0.01,
    "lora_rank": 16,
    "lora_alpha": 16,
    "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "max_grad_norm": 1.0,  # 0 = no clipping (the reference)
    "divergence_factor": 20.0,
    "in_place": False,  # train the model passed in rather than a copy
    "merge_lora": True,  # LoRA: merge the adapter into the returned model
    "control": True,  # the job also relearns the unedited model (its control); unused here
}


def _check(s: Mapping[str, Any]) -> None:
    if s["name"] not in ("none", "full", "lora"):
        raise ConfigError(f"relearn.name={s['name']!r}: use none, full or lora")
    for key in ("epochs", "max_paragraphs", "batch_size", "max_length"):
        if int(s[key]) < 1:
            raise ConfigError(f"relearn.{key}={s[key]!r}: use a positive integer")
    if not s["lr"] > 0:
        raise ConfigError(f"relearn.lr={s['lr']!r}: use a positive learning rate")


def relearn_paragraphs(concept: Any, max_paragraphs: int) -> list[str]:
    """The first ``max_paragraphs`` non-empty paragraphs in file order (as the reference)."""
    return [p for p in concept.relearn if p.strip()][:max_paragraphs]


def _encode(tok: Any, paras: list[str], max_length: int) -> list[list[int]]:
    # add_special_tokens=True as the reference (the tokenizer adds BOS where its model wants one)
    return [tok(p, truncation=True, max_length=max_length)["input_ids"] for p in paras]


def _batch(seqs: list[list[int]], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids, attn = right_pad(seqs, pad)
    labels = ids.masked_fill(attn == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device)}


def check_lora_targets(model: nn.Module, targets: Sequence[str]) -> None:
    """Each of ``relearn.lora_targets`` names a Linear module of the model (peft matches a target
    against the end of a module's dotted name); checked right after the model loads."""
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ConfigError(f"relearn.lora_targets: no Linear module of this model is named {missing}; "
                          f"its Linear modules end in {leaves}")


def relearn_memory_bytes(n_params: int, elem_bytes: int, in_place: bool, master_weights: bool) -> int:
    """A lower bound on the memory full-parameter relearning holds at once: the job's unedited and erased
    models, the trained copy (none ``in_place``), its gradients, fp32 master weights and their gradients
    when on, and AdamW's two moments (in fp32 with master weights, else in the weights' dtype).
    Activations are left out."""
    copies = 2 if in_place else 3
    state = 4 if master_weights and elem_bytes < 4 else elem_bytes
    master = 2 * 4 * n_params if master_weights and elem_bytes < 4 else 0
    return n_params * (copies * elem_bytes + elem_bytes + 2 * state) + master


def check_relearn_memory(model: nn.Module, s: Mapping[str, Any], master_weights: bool,
                         available: int | None = None) -> None:
    """Full-parameter relearning (``relearn.name=full``: ``relearn=full|paper|short``) that cannot fit on the
    model's device fails here, right after the model loads, instead of running out of memory after every
    other stage."""
    if s.get("name") != "full":
        return
    first = next(model.parameters())
    if available is None:
        if first.device.type == "cuda":
            available = torch.cuda.get_device_properties(first.device).total_memory
        elif first.device.type == "cpu":
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        else:
            return
    n = sum(p.numel() for p in model.parameters())
    need = relearn_memory_bytes(n, first.element_size(), bool(s.get("in_place")), master_weights)
    if need > available:
        raise ConfigError(
            f"full-parameter relearning (relearn.name=full) needs at least {need / 2**30:.1f} GiB on {first.device.type} for this model "
            f"({n / 1e9:.2f}B parameters: the unedited and erased models"
            f"{'' if s.get('in_place') else ', the trained copy'}, gradients and AdamW states"
            f"{', fp32 master weights' if master_weights and first.element_size() < 4 else ''}); the device has "
            f"{available / 2**30:.1f} GiB. Set relearn.in_place=true (no copy, no control run), relearn=lora, "
            "model.master_weights=false, or run on a larger device; or leave relearn out of stages")


def _wrap_lora(model: nn.Module, s: Mapping[str, Any]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=int(s["lora_rank"]), lora_alpha=int(s["lora_alpha"]), lora_dropout=0.0, bias="none",
                     target_modules=list(s["lora_targets"]), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, cfg)
    except ValueError as exc:
        raise ConfigError(f"relearn (LoRA: lora_rank={s['lora_rank']}, lora_alpha={s['lora_alpha']}, "
                          f"lora_targets={list(s['lora_targets'])}): {exc}") from exc


@dataclass
class RelearnResult(AttackResult):
    """An :class:`AttackResult` whose dict form also carries ``curve`` and flat ``metrics``."""

    def metrics(self) -> dict[str, float]:
        e = self.extra
        return {
            "relearn_acc": self.accuracy,  # the paper's "regained accuracy"
            "relearn_acc_before": e.get("accuracy_before", float("nan")),
            "relearn_retain_acc": e.get("retention_after", float("nan")),
            "relearn_retain_before": e.get("retention_before", float("nan")),
            "relearn_final_loss": (e.get("epoch_loss") or [float("nan")])[-1],
            "relearn_epochs_done": float(len(self.rows) - 1) if self.rows else 0.0,
        }

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["curve"] = self.rows
        out["metrics"] = self.metrics()
        return out


def relearn_model(model: nn.Module, tok: Any, concept: Any, cfg: Mapping[str, Any] | None,
                  ctx: AttackContext) -> tuple[RelearnResult, nn.Module]:
    """Run the relearning attack; returns the result and the relearned model (see module doc)."""
    s = merge_settings("relearn", RELEARN_DEFAULTS, cfg)
    _check(s)
    mode = s["name"]
    name = f"relearn_{mode}"
    if mode == "none":
        return RelearnResult(name=name, accuracy=float("nan"), status="skipped", reason="relearn=none"), model
    t0 = time.perf_counter()
    eval_qs = questions(concept, ctx.eval_split, ctx.max_questions)
    retain_qs = questions(concept, ctx.retain_split, ctx.max_questions) if ctx.retain_split in concept.mc else []
    paras = relearn_paragraphs(concept, int(s["max_paragraphs"]))
    if not paras:
        raise ConfigError(f"concept {concept.name!r} has no relearning paragraphs")
    seqs = _encode(tok, paras, int(s["max_length"]))

    work = model if s["in_place"] else copy.deepcopy(model)
    # LoRA's initial weights come from the seed; the caller's RNG state (CUDA's too) is restored after
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(ctx.seed)
        trained = _wrap_lora(work, s) if mode == "lora" else work
    if mode == "full":
        trained.requires_grad_(True)
    eval_model = trained.get_base_model() if mode == "lora" else trained
    params = [p for p in trained.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    mw = MasterWeights(params, ctx.master_weights)
    mw_active = mw.active
    opt = torch.optim.AdamW(mw.tensors, lr=float(s["lr"]), weight_decay=float(s["weight_decay"]))
    device = next(trained.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rng = random.Random(ctx.seed)
    guard = loss_guard(float(s["divergence_factor"]))

    def evaluate(epoch: int, loss: float, steps: int) -> dict[str, Any]:
        eval_model.eval()
        qa = ctx.score_plain(eval_model, tok, eval_qs)
        ret = ctx.score_plain(eval_model, tok, retain_qs) if retain_qs else None
        row = {"epoch": epoch, "loss": loss, "steps": steps, "qa_acc": qa.acc, "qa_p_correct": qa.p_correct,
               "retain_acc": ret.acc if ret else float("nan"),
               "retain_p_correct": ret.p_correct if ret else float("nan"),
               "seconds": round(time.perf_counter() - t0, 2)}
        log.info("relearn %s epoch %d: %s qa_acc=%.3f retain_acc=%.3f", mode, epoch,
                 "before training" if epoch == 0 else f"train loss {loss:.4f}", qa.acc, row["retain_acc"])
        return row

    curve = [evaluate(0, float("nan"), 0)]
    step_losses: list[float] = []
    status, reason, first = "ok", "", None
    bs = int(s["batch_size"])
    try:
        for epoch in range(1, int(s["epochs"]) + 1):
            order = list(range(len(seqs)))
            rng.shuffle(order)
            trained.train()
            ep_losses = []
            for i in range(0, len(order), bs):
                batch = _batch([seqs[j] for j in order[i : i + bs]], pad, device)
                out = trained(**batch)
                loss = out.loss
                val = float(loss.detach())
                first = val if first is None else first
                why = guard(val, first)
                if why:
                    status, reason = "diverged", f"epoch {epoch} step {len(step_losses) + 1}: {why}"
                    break
                mw.zero_grad()
                loss.backward()
                mw.before_step()
                if float(s["max_grad_norm"]) > 0:
                    torch.nn.utils.clip_grad_norm_(mw.tensors, float(s["max_grad_norm"]))
                opt.step()
                mw.after_step()
                step_losses.append(val)
                ep_losses.append(val)
            if status != "ok":
                log.warning("relearn %s diverged: %s", mode, reason)
                break
            curve.append(evaluate(epoch, sum(ep_losses) / len(ep_losses), len(step_losses)))
    finally:
        mw.zero_grad()
        del opt, mw
        trained.eval()
        trained.requires_grad_(False)

    result_model: nn.Module = trained
    if mode == "lora" and s["merge_lora"]:
        result_model = trained.merge_and_unload()
    final = curve[-1]
    res = RelearnResult(
        name=name,
        accuracy=final["qa_acc"],  # after the last completed epoch (status says if training stopped early)
        per_variant={f"epoch_{r['epoch']}": r["qa_acc"] for r in curve},
        rows=curve,
        n=len(eval_qs),
        seconds=time.perf_counter() - t0,
        status=status,
        reason=reason,
        extra={
            "mode": mode,
            "regained_accuracy": final["qa_acc"],
            "accuracy_before": curve[0]["qa_acc"],
            "retention_before": curve[0]["retain_acc"],
            "retention_after": final["retain_acc"],
            "epoch_loss": [r["loss"] for r in curve[1:]],
            "step_losses": step_losses,
            "n_paragraphs": len(paras),
            "n_tokens": sum(len(x) for x in seqs),
            "trainable_params": n_trainable,
            "merged": mode == "lora" and bool(s["merge_lora"]),
            "in_place": bool(s["in_place"]),
            "master_weights": mw_active,
            "settings": s,
        },
    )
    if status == "ok" and not math.isfinite(final["qa_acc"]):
        res.status, res.reason = "diverged", "non-finite accuracy after relearning"
    return res, result_model


@register_attack("relearn")
def run_relearn(model: Any, tok: Any, concept: Any, cfg: Mapping[str, Any] | None,
                ctx: AttackContext | None = None, *, seed: int | None = None, template: str | None = None,
                batch_size: int | None = None, progress: bool | None = None) -> RelearnResult:
    """The attack protocol's entry: returns only the result (the relearned copy is dropped).

    ``ctx`` may be omitted and its fields given as keywords (seed, template, batch_size, progress).
    """
    ctx = copy.copy(ctx) if ctx is not None else AttackContext()
    for key, val in (("seed", seed), ("template", template), ("batch_size", batch_size), ("progress", progress)):
        if val is not None:
            setattr(ctx, key, val)
    res, _ = relearn_model(model, tok, concept, cfg, ctx)
    return res
