"""lm-eval task files generated from the project's multiple-choice questions, and running lm-eval in memory.

:func:`write_mc_task` writes a JSONL of the questions (options already shuffled) and a task
YAML (``dataset_path: json`` with local ``data_files``, ``output_type: multiple_choice``,
``doc_to_text`` the prompt template in Jinja, ``doc_to_choice: options``, ``doc_to_target:
answer``), so the questions can be scored by lm-eval exactly as any benchmark.
:func:`run_lm_eval` evaluates an in-memory model with ``HFLM(pretrained=model, tokenizer=tok)``
(nothing is resolved from a hub), and :func:`lm_eval_mc` returns per-question predictions so the
project's native scorer (:func:`ember.evals.mc.score_loglik`) can be checked against lm-eval.
lm-eval adds BOS for Gemma families and otherwise where the tokenizer adds it by default (Llama-3's
does, SmolLM2's does not); the native scorer follows the same rule (:func:`~ember.evals.loglik.wants_bos`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ember.data import MCQuestion
from ember.errors import ConfigError
from ember.evals.loglik import wants_bos

DEFAULT_TEMPLATE = "Question: {q}\nAnswer:"


def task_name_for(name: str) -> str:
    """A safe lm-eval task name (letters, digits, underscores) prefixed ``ember_``."""
    slug = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()
    return slug if slug.startswith("ember_") else f"ember_{slug}"


def to_jinja(template: str) -> str:
    """``"Question: {q}"`` -> ``"Question: {{q}}"`` (only the ``{q}`` field is substituted)."""
    return template.replace("{q}", "{{q}}")


def write_mc_task(
    questions: Sequence[MCQuestion], workdir: str | Path, name: str, template: str = DEFAULT_TEMPLATE
) -> str:
    """Write ``<task>.jsonl`` and ``<task>.yaml`` into ``workdir``; return the task name."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    task = task_name_for(name)
    data = workdir / f"{task}.jsonl"
    with data.open("w", encoding="utf-8") as fh:
        for q in questions:
            fh.write(json.dumps({"qid": q.qid, "q": q.q, "options": list(q.options), "answer": q.answer}) + "\n")
    spec = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": to_jinja(template),
        "doc_to_choice": "options",
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    (workdir / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return task


def _numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or "stderr" in k:
            continue
        out[k.split(",")[0]] = float(v)
    return out


def run_lm_eval(
    model: nn.Module, tokenizer: Any, tasks: Sequence[str], limit: int | float | None = None, batch_size: int = 16,
    include_path: str | Path | None = None, log_samples: bool = False, include_defaults: bool = True,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on the in-memory model; returns lm-eval's raw result dict.

    ``include_defaults=False`` skips indexing lm-eval's thousands of built-in task files (seconds)
    when only the tasks under ``include_path`` are wanted."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              add_bos_token=True if wants_bos(model, tokenizer) else None)
    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)
    res = simple_evaluate(
        model=lm, tasks=list(tasks), limit=limit, task_manager=manager, log_samples=log_samples,
        bootstrap_iters=0, verbosity="ERROR",
    )
    if res is None:
        raise RuntimeError("lm-eval returned no results")
    return res


def run_lm_eval_tasks(
    model: nn.Module, tokenizer: Any, tasks: Sequence[str], limit: int | float | None = None, batch_size: int = 16,
    include_path: str | Path | None = None,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` (filters stripped: ``acc,none`` -> ``acc``) for the task names asked for.

    A group (``mmlu``) is its aggregate alone: lm-eval also reports each subtask and subgroup (57
    MMLU subjects), which would otherwise each become a specificity term and a gate of their own."""
    if not tasks:
        return {}
    res = run_lm_eval(model, tokenizer, tasks, limit, batch_size, include_path)
    out = {task: _numeric_metrics(res["results"].get(task, {})) for task in tasks}
    missing = [t for t, m in out.items() if not m]
    if missing:
        raise ConfigError(
            f"eval.lm_eval_tasks: lm-eval reported no score for {missing} (a tag or a group without "
            f"aggregate_metric_list; it reported {sorted(res['results'])[:8]}...): name a group with an "
            "aggregate, or its tasks")
    return out


@dataclass
class LmEvalMC:
    acc: float
    acc_norm: float
    preds: dict[str, int]  # qid -> predicted option index (raw log-likelihood argmax)
    logliks: dict[str, list[float]]


def lm_eval_mc(
    model: nn.Module, tokenizer: Any, questions: Sequence[MCQuestion], workdir: str | Path,
    template: str = DEFAULT_TEMPLATE, batch_size: int = 16, name: str = "check",
) -> LmEvalMC:
    """Score ``questions`` with lm-eval's multiple_choice through a generated task; per-question predictions too."""
    task = write_mc_task(questions, workdir, name, template)
    res = run_lm_eval(model, tokenizer, [task], batch_size=batch_size, include_path=workdir, log_samples=True,
                      include_defaults=False)
    metrics = _numeric_metrics(res["results"][task])
    preds, lls = {}, {}
    for s in res["samples"][task]:
        ll = [float(r[0]) for r in s["filtered_resps"]]
        qid = s["doc"]["qid"]
        lls[qid] = ll
        preds[qid] = max(range(len(ll)), key=lambda j: ll[j])
    return LmEvalMC(acc=metrics["acc"], acc_norm=metrics["acc_norm"], preds=preds, logliks=lls)


def score_with_lm_eval(
    model: nn.Module, tokenizer: Any, questions: Sequence[MCQuestion], workdir: str | Path,
    template: str = DEFAULT_TEMPLATE, batch_size: int = 16,
) -> float:
    """lm-eval's accuracy on ``questions`` (cross-check of the native log-likelihood scorer)."""
    return lm_eval_mc(model, tokenizer, questions, workdir, template, batch_size).acc
