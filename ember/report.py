"""Turn a sweep (or run) directory into the paper-style table and plots.

``python -m ember.report outputs/<experiment>`` reads the job directories only (no W&B): every
``config.yaml`` below the directory is a job, and its ``<concept>/<stage>.json`` files are the
results. Rows are (model, method, EMBER off/on, plus every override that varies across the jobs:
``ember.delta`` in ``experiment=ablation_delta``, ``ember.factorization.rank`` in ``ablation_rank``);
columns are the paper's metrics, attack accuracies and the relearning results, as mean +- std (the
sample standard deviation; 0 for a single value) over concepts and seeds; the best value of each column is bold. Only stages whose record says
``"status": "complete"`` count: ``n`` is the number of (job, concept) pairs whose numbers are used,
and a ``failed`` column (present when there are any) counts the pairs with a failed, skipped or
otherwise unfinished stage, whose numbers for that stage are left out of the means.

Writes ``report.md``, ``report.tex``, ``report.csv`` (the table), ``rows.csv`` (one row per (job,
concept)); when the jobs ran attacks, ``report_attacks.{md,csv}`` (per attack: accuracy under attack,
the control on the unedited model, the erased and the unedited model's plain accuracy as the attack
scores them, the recovered fraction and that scorer); when they ran relearning,
``report_relearn.{md,csv}`` (accuracy after every relearning epoch, the control run's accuracy on the
unedited model and the recovered fraction); and the plots ``relearn_curves.png``,
``delta_tradeoff.png`` (from the delta grids the jobs chose delta on, or from the evaluate metrics
of a sweep over ``ember.delta``) and ``attack_accuracy.png``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, ListConfig, OmegaConf

from ember.callbacks import JOB_STATUS
from ember.data import slugify
from ember.evals.metrics import recovered_fraction
from ember.stages import NON_RESULT_KEYS

COLUMNS = [  # (column, source key, higher is better; None: no best value)
    ("efficacy", "evaluate/efficacy", True),
    ("specificity", "evaluate/specificity", True),
    ("coherence", "evaluate/coherence", True),
    ("harmonic", "evaluate/harmonic", True),
    ("harmonic_alpaca", "evaluate/harmonic_alpaca", True),  # what the method grid and the delta choice rank by
    ("qa_acc", "evaluate/qa_acc", False),
    # the relearning stage's metric keys (ember/attacks/relearn.py RelearnResult.metrics, ember/pipeline.py relearn)
    ("relearn_acc", "relearn/relearn_acc", False),
    ("relearn_control_acc", "relearn/relearn_control_acc", None),  # the unedited model relearned: a reference
    ("relearn_recovered", "relearn/relearn_recovered", False),
    ("relearn_retain", "relearn/relearn_retain_acc", True),
]
BASE_FACTORS = ["model", "method", "ember"]
# overrides that are not factors of a result: seeds and concept selections are averaged over, the rest
# is bookkeeping, and the keys the stage hashes leave out (data paths, batch sizes: stages.NON_RESULT_KEYS)
IGNORED_OVERRIDES = ("seed", "concepts", "hydra", "overwrite", "progress", "logger", "cache_dir", "stages",
                     "save_erased_weights", "save_erased_weights_max_gib",
                     *(f"{section}.{key}" for section, keys in NON_RESULT_KEYS.items() for key in keys))
_MISSING = object()


def _read(p: Path) -> dict[str, Any] | None:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _complete(rec: dict[str, Any]) -> bool:
    """A stage record whose numbers count (records without a status, hand-written ones, count)."""
    return rec.get("status", "complete") == "complete"


def _scalar(v: Any) -> Any:
    """An override value as a table cell: numbers as numbers (so 2 < 10), null as 'null'."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return v
    elif isinstance(v, (int, float)):
        f = float(v)
    else:
        return str(v)
    if math.isfinite(f) and f.is_integer():
        return int(f)
    return f


def _overrides(meta: dict[str, Any] | None) -> dict[str, str]:
    """``key=value`` task overrides of a job (``+key``/``++key`` as key; ``~key`` deletes)."""
    out = {}
    for o in (meta or {}).get("overrides") or []:
        if not isinstance(o, str):
            continue
        key, sep, val = o.partition("=")
        out[key.lstrip("+~")] = val if sep else "~"
    return out


def _ignored(key: str) -> bool:
    return any(key == p or key.startswith((p + ".", p + "/")) for p in IGNORED_OVERRIDES)


def _choices(job: Path) -> dict[str, str]:
    """The option Hydra chose in every config group of the job (``.hydra/hydra.yaml``; {} where absent)."""
    try:
        chosen = OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.runtime.choices
    except Exception:  # no .hydra directory (hydra.output_subdir=null) or an unreadable file
        return {}
    # an unquoted on/off reads as a YAML bool (Hydra quotes them, a hand-edited file may not)
    return {str(k): {True: "on", False: "off"}.get(v, str(v)) if isinstance(v, bool) else str(v)
            for k, v in chosen.items() if v is not None}


def _ember_label(enabled: bool, choice: str | None) -> str:
    if not enabled:
        return "w/o EMBER"
    return "w/ EMBER" if choice in (None, "on") else f"w/ EMBER ({choice})"


def _config_value(cfg: DictConfig, key: str, choices: dict[str, str] | None = None) -> Any:
    """What a job without ``key`` among its overrides ran with: a config group's chosen option (its
    ``name`` where the job has no record of the choice), else the value."""
    if choices and key in choices:
        return choices[key]
    v = OmegaConf.select(cfg, key.replace("/", "."), default=_MISSING)
    if v is _MISSING:
        return "-"
    if isinstance(v, DictConfig):
        return v.get("name", str(OmegaConf.to_container(v)))
    if isinstance(v, ListConfig):
        return str(OmegaConf.to_container(v))
    return v


def _sort_key(v: Any) -> tuple[int, float, str]:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
        return (0, float(v), "")
    return (1, 0.0, str(v))


def _groups(df: pd.DataFrame, keys: list[str]) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """``df`` grouped by ``keys``, numbers in numeric order (delta 2 before 10)."""
    out = [(dict(zip(keys, k if isinstance(k, tuple) else (k,), strict=True)), g)
           for k, g in df.groupby(keys, sort=False, dropna=False)]
    return sorted(out, key=lambda kg: tuple(_sort_key(kg[0][k]) for k in keys))


def factors(df: pd.DataFrame) -> list[str]:
    """The columns a table row is a group of: model, method, EMBER and the varying overrides."""
    return BASE_FACTORS + [k for k in df.attrs.get("factors", []) if k in df.columns]


def _varying(jobs: pd.DataFrame, keys: list[str]) -> list[str]:
    """The override keys that take more than one value across the jobs and are not already told apart by
    (model, method, EMBER): ``method=rmu,snmf ember=off,on`` adds none, ``ember.delta=1,5`` adds ``ember.delta``."""
    out = []
    for k in keys:
        if _ignored(k) or jobs[k].nunique(dropna=False) < 2:
            continue
        if jobs.groupby(BASE_FACTORS, dropna=False)[k].nunique(dropna=False).max() > 1:
            out.append(k)
    return out


def _wanted(cfg: DictConfig) -> list[str]:
    """The stages the job writes a record for ([] for a hand-written config without the keys)."""
    from ember.stages import stages_wanted

    try:
        return stages_wanted(cfg)
    except Exception:
        return []


def collect(root: Path) -> pd.DataFrame:
    """One row per (job, concept) with the job's factors and the metrics of every complete stage.

    Rows are labelled by the options Hydra chose (``method=rmu_paper_llama`` and ``method=rmu`` are two
    methods; ``ember=paper`` is "w/ EMBER (paper)"). ``<stage>/status`` holds each stage's status;
    ``failed_stages`` names the stages that did not complete, a wanted stage without a record
    included, and ``job`` when the concept raised (FAILED.txt) or never ran (a job that failed before
    it: results.json's failures, job_status.json). ``df.attrs["factors"]`` lists the varying overrides;
    ``df.attrs["incomplete"]`` the (job, concept, stages) left out of some means."""
    rows, job_rows = [], []
    for cfg_path in sorted(Path(root).rglob("config.yaml")):
        job = cfg_path.parent
        # only ember job directories (config.yaml beside meta.json): not .hydra/config.yaml, nor the
        # files/config.yaml of an online W&B run, which would fail on cfg.model below
        if job.name == ".hydra" or not (job / "meta.json").exists():
            continue
        cfg = OmegaConf.load(cfg_path)
        choices = _choices(job)
        factors_ = {"job": str(job.relative_to(root)), "model": choices.get("model", cfg.model.name),
                    "method": choices.get("method", cfg.method.name),
                    "ember": _ember_label(bool(cfg.ember.enabled), choices.get("ember")), "seed": cfg.seed}
        job_rows.append((factors_, cfg, _overrides(_read(job / "meta.json")), choices))
        wanted = _wanted(cfg)
        n_before = len(rows)
        for concept_dir in sorted(p for p in job.iterdir() if p.is_dir() and not p.name.startswith((".", "wandb"))):
            row: dict[str, Any] = {**factors_, "concept": concept_dir.name}
            bad = ["job"] if (concept_dir / "FAILED.txt").exists() else []
            written = set()
            for stage_file in sorted(concept_dir.glob("*.json")):
                rec = _read(stage_file)
                if not isinstance(rec, dict) or not rec:
                    continue
                stage = stage_file.stem
                written.add(stage)
                if "status" in rec:
                    row[f"{stage}/status"] = rec["status"]
                if not _complete(rec):  # a failed/diverged/skipped stage's numbers are no result
                    bad.append(stage)
                    continue
                for k, v in (rec.get("metrics") or {}).items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        row[f"{stage}/{k}"] = v
                for k, v in (rec.get("scores") or {}).items() if stage == "evaluate" else []:
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        row[f"evaluate/{k}"] = v
                for name, a in (rec.get("attacks") or {}).items() if stage == "attacks" else []:
                    # the plain accuracies the attack's recovered fraction is relative to, scored as the
                    # attack scores (log-likelihood), not evaluate's qa_acc (letter under eval.mc_mode=letter)
                    for k, col in (("erased_accuracy", "erased_acc"), ("base_accuracy", "base_acc")):
                        if isinstance(a.get(k), (int, float)) and not isinstance(a.get(k), bool):
                            row[f"attacks/{name}_{col}"] = a[k]
                    if a.get("reference_scorer"):
                        row[f"attacks/{name}_scorer"] = str(a["reference_scorer"])
            if not written and not bad:
                continue  # not a concept directory (no stage record, no failure)
            bad += [s for s in wanted if s not in written and s not in bad]  # killed before writing it
            row["failed_stages"] = ",".join(bad)
            rows.append(row)
        # concepts that never got a directory: the job failed before them (a model that did not load, a
        # setting error that skipped the rest), as results.json or job_status.json say
        have = {r["concept"] for r in rows[n_before:]}
        failures = (_read(job / "results.json") or {}).get("failures") or {}
        missing = [slugify(c) for c in failures if slugify(c) not in have]
        status = (_read(job / JOB_STATUS) or {}).get("status")
        if not missing and len(rows) == n_before and status != "complete":
            missing = ["-"]  # nothing at all to show for this job
        rows += [{**factors_, "concept": c, "failed_stages": "job"} for c in missing]
    df = pd.DataFrame(rows)
    extra: list[str] = []
    if job_rows and not df.empty:
        keys = sorted({k for _, _, ov, _ in job_rows for k in ov} - set(BASE_FACTORS))  # those are labelled apart
        jobs = pd.DataFrame([{**f, **{k: _scalar(ov[k]) if k in ov else _scalar(_config_value(cfg, k, ch))
                                      for k in keys}} for f, cfg, ov, ch in job_rows])
        extra = _varying(jobs, keys)
        if extra:
            df = df.merge(jobs[["job", *extra]], on="job", how="left")
    df.attrs["factors"] = extra
    if not df.empty and "failed_stages" in df:
        bad_rows = df[df["failed_stages"].fillna("") != ""]
        df.attrs["incomplete"] = [(r["job"], r["concept"], r["failed_stages"]) for _, r in bad_rows.iterrows()]
    return df


def _mean_std(s: pd.Series) -> tuple[float, float]:
    s = pd.to_numeric(s, errors="coerce").dropna()
    if s.empty:
        return math.nan, math.nan
    return float(s.mean()), float(s.std(ddof=1)) if len(s) > 1 else 0.0  # the sample standard deviation


def attack_names(df: pd.DataFrame) -> list[str]:
    return sorted({k.split("/", 1)[1].removesuffix("_recovered") for k in df.columns
                   if k.startswith("attacks/") and k.endswith("_recovered")})


def _n_failed(g: pd.DataFrame) -> int:
    return int((g["failed_stages"].fillna("") != "").sum()) if "failed_stages" in g else 0


def paper_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std per (model, method, EMBER, varying overrides) over concepts and seeds.

    ``n``: the (job, concept) pairs with a number in the table; ``failed`` (only when there are any):
    the pairs with a stage that did not complete, whose numbers of that stage are left out."""
    keys = factors(df)
    cols = [(c, k) for c, k, _ in COLUMNS if k in df.columns]
    cols += [(f"{name}_acc", f"attacks/{name}_acc") for name in attack_names(df) if f"attacks/{name}_acc" in df]
    any_failed = _n_failed(df) > 0
    out = []
    for key, g in _groups(df, keys):
        used = g[[k for _, k in cols]].apply(pd.to_numeric, errors="coerce").notna().any(axis=1).sum() if cols else 0
        row: dict[str, Any] = {**key, "n": int(used)}
        if any_failed:
            row["failed"] = _n_failed(g)
        for c, k in cols:
            row[c], row[c + "_std"] = _mean_std(g[k])
        out.append(row)
    return pd.DataFrame(out)


def attack_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (factors, attack): accuracy under attack, the control (the same attack on the unedited model),
    the erased and the unedited model's plain accuracy and the recovered fraction, means over rows. The
    plain accuracies are attacks.json's ``erased_accuracy``/``base_accuracy``, scored as the attack scores
    (``scorer``), so the columns compare like with like; '-' where a job's attacks.json predates them."""
    keys = factors(df)
    out = []
    for key, g in _groups(df, keys):
        for name in attack_names(df):
            col = f"attacks/{name}_acc"
            acc = pd.to_numeric(g[col], errors="coerce") if col in g else None
            if acc is None or acc.dropna().empty:
                continue
            used = g[acc.notna()]
            mean = {k: _mean_std(used[c])[0] if c in used else math.nan for k, c in (
                ("accuracy", col), ("control", f"attacks/{name}_control_acc"),
                ("erased", f"attacks/{name}_erased_acc"), ("base", f"attacks/{name}_base_acc"),
                ("recovered", f"attacks/{name}_recovered"))}
            sc = f"attacks/{name}_scorer"
            scorer = "; ".join(sorted(set(used[sc].dropna().astype(str)))) if sc in used else ""
            rc = f"attacks/{name}_recovered"
            # the recovered mean is over the rows that have one (NaN: no gap, or a probe readout)
            n_rec = int(pd.to_numeric(used[rc], errors="coerce").notna().sum()) if rc in used else 0
            out.append({**key, "attack": name, "n": len(used), **mean, "n_recovered": n_rec,
                        "scorer": scorer or "-"})
    return pd.DataFrame(out)


def _relearn_curves(root: Path, df: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame, list[dict[str, Any]]]]:
    """(job, concept, curve, control curve) of every complete relearning stage of a collected job."""
    jobs = set(df["job"]) if "job" in df else set()
    out = []
    for p in sorted(Path(root).rglob("relearn_curve.csv")):
        job = str(p.parent.parent.relative_to(root))
        rec = _read(p.parent / "relearn.json") or {}
        # a diverged relearning is no curve, nor one whose record is missing (killed between the two
        # writes, or a stale stage being recomputed: the curve would be paired with other metrics)
        if job not in jobs or not rec or not _complete(rec):
            continue
        c = pd.read_csv(p)
        if "epoch" in c and "qa_acc" in c:
            out.append((job, p.parent.name, c, [r for r in rec.get("control_curve") or [] if isinstance(r, dict)]))
    return out


def relearn_table(root: Path, df: pd.DataFrame) -> pd.DataFrame:
    """The relearning curves: concept accuracy (and retention) after every epoch, the control run's
    accuracy (the unedited model relearned alike) and the recovered fraction, means over jobs/concepts."""
    keys = factors(df)
    by_job = df.drop_duplicates("job").set_index("job")[keys]
    rows = []
    for job, _, c, control in _relearn_curves(root, df):
        ctrl = {int(r["epoch"]): r.get("qa_acc") for r in control if "epoch" in r}
        base = control[0].get("qa_acc") if control else math.nan  # as ember/pipeline.py relearn: epoch 0 rows
        erased = c["qa_acc"].iloc[0] if len(c) else math.nan
        for _, r in c.iterrows():
            e = int(r["epoch"])
            rows.append({**by_job.loc[job].to_dict(), "epoch": e, "qa_acc": r.get("qa_acc"),
                         "retain_acc": r.get("retain_acc"), "control_qa_acc": ctrl.get(e, math.nan),
                         "recovered": recovered_fraction(r.get("qa_acc"), erased, base)})
    if not rows:
        return pd.DataFrame()
    t = pd.DataFrame(rows)
    for c in ("qa_acc", "retain_acc", "control_qa_acc", "recovered"):
        t[c] = pd.to_numeric(t[c], errors="coerce")
    out = []
    for key, g in _groups(t, [*keys, "epoch"]):
        out.append({**key, "n": len(g), **{c: g[c].mean() for c in ("qa_acc", "retain_acc", "control_qa_acc",
                                                                     "recovered")}})
    return pd.DataFrame(out)


def plain_markdown(t: pd.DataFrame) -> str:
    cols = list(t.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in t.iterrows():
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.tolist()) + " |")
    return "\n".join(lines) + "\n"


def _fmt(mean: float, std: float, bold: bool, latex: bool) -> str:
    if math.isnan(mean):
        return "-"
    txt = f"{mean:.3f} ± {std:.3f}" if not latex else f"{mean:.3f} $\\pm$ {std:.3f}"
    if bold:
        return f"\\textbf{{{txt}}}" if latex else f"**{txt}**"
    return txt


def _cell(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def render(table: pd.DataFrame, latex: bool = False) -> str:
    metric_cols = [c for c in table.columns if f"{c}_std" in table.columns]
    key_cols = [c for c in table.columns if c not in metric_cols and not c.endswith("_std")]
    higher = {c: hib for c, _, hib in COLUMNS}
    best = {}
    for c in metric_cols:
        vals = pd.to_numeric(table[c], errors="coerce")
        hib = higher.get(c, False)
        if vals.notna().any() and hib is not None:
            best[c] = vals.max() if hib else vals.min()
    lines = []
    header = ["EMBER" if c == "ember" else c for c in key_cols] + metric_cols
    for _, r in table.iterrows():
        cells = [_cell(r[c]) for c in key_cols]
        for c in metric_cols:
            cells.append(_fmt(r[c], r[c + "_std"], c in best and r[c] == best[c], latex))
        lines.append(cells)
    if latex:
        spec = "l" * len(key_cols) + "r" * len(metric_cols)
        body = [" & ".join(h.replace("_", r"\_") for h in header) + r" \\ \midrule"]
        body += [" & ".join(str(x).replace("_", r"\_") if not str(x).startswith("\\") else str(x) for x in row) + r" \\"
                 for row in lines]
        return "\\begin{tabular}{" + spec + "}\n\\toprule\n" + "\n".join(body) + "\n\\bottomrule\n\\end{tabular}\n"
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(x) for x in row) + " |" for row in lines]
    if "failed" in key_cols:
        md += ["", "failed: (job, concept) pairs with a stage that did not complete (failed, skipped, ...); that "
               "stage's numbers are left out of the means, and n counts the pairs whose numbers are used."]
    return "\n".join(md) + "\n"


TRADEOFF = [(c, k) for c, k, _ in COLUMNS if k.startswith("evaluate/") and c != "qa_acc"]


def _delta_sweep_plot(ax: Any, df: pd.DataFrame) -> bool:
    """The trade-off over a sweep of ``ember.delta``: the evaluate metrics (test split) against delta."""
    d = df[df["ember"].astype(str).str.startswith("w/ EMBER")].copy()  # ember=on, paper, study_best, ...
    d["_delta"] = pd.to_numeric(d["ember.delta"], errors="coerce")
    d = d.dropna(subset=["_delta"])
    metrics = [(c, k) for c, k in TRADEOFF if k in d and pd.to_numeric(d[k], errors="coerce").notna().any()]
    if d.empty or not metrics:
        return False
    others = [k for k in factors(df) if k not in ("ember", "ember.delta")]
    many = len(_groups(d, others)) > 1
    for key, g in _groups(d, others):
        m = g.groupby("_delta")[[k for _, k in metrics]].mean(numeric_only=True).sort_index()
        suffix = (" " + " ".join(_cell(v) for v in key.values())) if many else ""
        for c, k in metrics:
            ax.plot(m.index, m[k], marker="o", label=(c + suffix)[:60])
    if (d["_delta"] > 0).all():
        ax.set_xscale("log")
    ax.set_xlabel("delta (ember.delta)")
    ax.set_ylabel("score (evaluate, test split)")
    return True


def plots(root: Path, df: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    curves = _relearn_curves(root, df)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for job, concept, c, control in curves:
            label = f"{job}/{concept}"[-60:]
            (line,) = ax.plot(c["epoch"], c["qa_acc"], marker="o", label=label)
            ctrl = pd.DataFrame(control)
            if {"epoch", "qa_acc"} <= set(ctrl.columns):  # the unedited model relearned alike, beside it
                ax.plot(ctrl["epoch"], ctrl["qa_acc"], linestyle="--", color=line.get_color(),
                        label=f"{label[:48]} (control)")
        ax.set_xlabel("relearning epoch")
        ax.set_ylabel("concept QA accuracy")
        ax.legend(fontsize=6)
        fig.tight_layout()
        made.append(out / "relearn_curves.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = "ember.delta" in factors(df) and _delta_sweep_plot(ax, df)
    grids = [] if drawn else list(root.rglob("delta_grid.csv"))
    for p in grids:
        g = pd.read_csv(p)
        if {"efficacy", "specificity"} <= set(g.columns):
            drawn = True
            ax.plot(g["specificity"], g["efficacy"], marker="o", label=str(p.parent.relative_to(root))[:60])
            for _, r in g.iterrows():
                ax.annotate(f"{r['delta']:g}", (r["specificity"], r["efficacy"]), fontsize=6)
            ax.set_xlabel("specificity")
            ax.set_ylabel("efficacy")
    if drawn:
        ax.legend(fontsize=6)
        fig.tight_layout()
        made.append(out / "delta_tradeoff.png")
        fig.savefig(made[-1], dpi=120)
    plt.close(fig)
    attack_cols = [f"attacks/{n}_acc" for n in attack_names(df) if f"attacks/{n}_acc" in df]
    if attack_cols:
        keys = [k for k in factors(df) if k != "model" or df["model"].nunique() > 1]
        g = df.groupby(keys, sort=False, dropna=False)[attack_cols].mean(numeric_only=True)
        ax = g.T.plot.bar(figsize=(7, 4))
        ax.set_ylabel("accuracy under attack")
        ax.set_xticklabels([c.split("/", 1)[1].removesuffix("_acc") for c in attack_cols], rotation=30)
        plt.tight_layout()
        made.append(out / "attack_accuracy.png")
        plt.savefig(made[-1], dpi=120)
        plt.close("all")
    return made


def build_report(root: Path, out: Path | None = None) -> dict[str, Any]:
    root = Path(root)
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    df = collect(root)
    if df.empty:
        raise SystemExit(f"no job results found under {root}")
    table = paper_table(df)
    df.to_csv(out / "rows.csv", index=False)
    table.to_csv(out / "report.csv", index=False)
    md = render(table)
    incomplete = df.attrs.get("incomplete") or []
    if incomplete:
        md += ("\nLeft out of the means of the stages named (failed, skipped, unfinished, or a concept the job "
               "never reached):\n\n" + "\n".join(f"- {job} / {concept}: {stages}" for job, concept, stages in incomplete)
               + "\n")
    (out / "report.md").write_text(md)
    (out / "report.tex").write_text(render(table, latex=True))
    extra = {"attacks": attack_table(df), "relearn": relearn_table(root, df)}
    for name, t in extra.items():
        if not t.empty:
            t.to_csv(out / f"report_{name}.csv", index=False)
            md += f"\n{'Attacks' if name == 'attacks' else 'Relearning curves'}\n\n" + plain_markdown(t)
            (out / f"report_{name}.md").write_text(plain_markdown(t))
    pngs = plots(root, df, out)
    return {"rows": len(df), "table_rows": len(table), "markdown": md, "plots": [str(p) for p in pngs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    res = build_report(args.sweep_dir, args.out)
    print(res["markdown"])
    print(f"{res['rows']} (job, concept) rows -> {res['table_rows']} table rows; plots: {res['plots']}")


if __name__ == "__main__":
    main()
