"""Turn a sweep (or run) directory into the paper-style table and plots.

``python -m ember.report outputs/<experiment>`` reads the job directories only (no W&B): every
``config.yaml`` below the directory is a job, and its ``<concept>/<stage>.json`` files are the
results. Rows are (model, method, EMBER off/on); columns are the paper's metrics, attack
accuracies and accuracy after relearning, as mean +- std over concepts and seeds; the best value
of each column is bold. Writes ``report.md``, ``report.tex``, ``report.csv``, ``rows.csv`` and PNG plots,
and when the jobs ran attacks or relearning, ``report_attacks.{md,csv}`` (per attack: accuracy under
attack, the control on the unedited model, the erased accuracy and the recovered fraction) and
``report_relearn.{md,csv}`` (accuracy after every relearning epoch).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

COLUMNS = [  # (column, source key, higher is better)
    ("efficacy", "evaluate/efficacy", True),
    ("specificity", "evaluate/specificity", True),
    ("coherence", "evaluate/coherence", True),
    ("harmonic", "evaluate/harmonic", True),
    ("qa_acc", "evaluate/qa_acc", False),
    # the relearning stage's metric keys (ember/attacks/relearn.py RelearnResult.metrics); the table read
    # "relearn/final_qa_acc" and "relearn/regained", which no stage writes, so these columns never showed
    ("relearn_acc", "relearn/relearn_acc", False),
    ("relearn_retain", "relearn/relearn_retain_acc", True),
]


def _read(p: Path) -> dict[str, Any] | None:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def collect(root: Path) -> pd.DataFrame:
    """One row per (job, concept) with the job's factors and every stage metric."""
    rows = []
    for cfg_path in sorted(Path(root).rglob("config.yaml")):
        job = cfg_path.parent
        # only ember job directories (config.yaml beside meta.json): not .hydra/config.yaml, nor the
        # files/config.yaml of an online W&B run, which would fail on cfg.model below
        if job.name == ".hydra" or not (job / "meta.json").exists():
            continue
        cfg = OmegaConf.load(cfg_path)
        factors = {"job": str(job.relative_to(root)), "model": cfg.model.name, "method": cfg.method.name,
                   "ember": "w/ EMBER" if cfg.ember.enabled else "w/o EMBER", "seed": cfg.seed}
        for concept_dir in sorted(p for p in job.iterdir() if p.is_dir() and not p.name.startswith((".", "wandb"))):
            row: dict[str, Any] = {**factors, "concept": concept_dir.name}
            for stage_file in concept_dir.glob("*.json"):
                rec = _read(stage_file)
                if not rec:
                    continue
                stage = stage_file.stem
                for k, v in (rec.get("metrics") or {}).items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        row[f"{stage}/{k}"] = v
                for k, v in (rec.get("scores") or {}).items() if stage == "evaluate" else []:
                    if isinstance(v, (int, float)):
                        row[f"evaluate/{k}"] = v
            if len(row) > len(factors) + 1:
                rows.append(row)
    return pd.DataFrame(rows)


def _mean_std(s: pd.Series) -> tuple[float, float]:
    s = pd.to_numeric(s, errors="coerce").dropna()
    if s.empty:
        return math.nan, math.nan
    return float(s.mean()), float(s.std(ddof=0)) if len(s) > 1 else 0.0


def paper_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std per (model, method, EMBER) over concepts and seeds."""
    cols = [(c, k, hib) for c, k, hib in COLUMNS if k in df.columns]
    attack_cols = sorted(k for k in df.columns if k.startswith("attacks/") and k.endswith("_acc") and "control" not in k)
    out = []
    for (model, method, ember), g in df.groupby(["model", "method", "ember"], sort=True):
        row: dict[str, Any] = {"model": model, "method": method, "ember": ember, "n": len(g)}
        for c, k, _ in cols:
            row[c], row[c + "_std"] = _mean_std(g[k])
        for k in attack_cols:
            name = k.split("/", 1)[1]
            row[name], row[name + "_std"] = _mean_std(g[k])
        out.append(row)
    return pd.DataFrame(out)


def attack_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (model, method, EMBER, attack): accuracy under attack, the control (the same attack on the
    unedited model), the erased model's plain accuracy and the recovered fraction, means over rows."""
    names = sorted({k.split("/", 1)[1].removesuffix("_recovered") for k in df.columns
                    if k.startswith("attacks/") and k.endswith("_recovered")})
    out = []
    for (model, method, ember), g in df.groupby(["model", "method", "ember"], sort=True):
        for name in names:
            acc = pd.to_numeric(g.get(f"attacks/{name}_acc"), errors="coerce")
            if acc is None or acc.dropna().empty:
                continue
            mean = {k: _mean_std(g[c])[0] if c in g else math.nan for k, c in (
                ("accuracy", f"attacks/{name}_acc"), ("control", f"attacks/{name}_control_acc"),
                ("erased", "evaluate/qa_acc"), ("recovered", f"attacks/{name}_recovered"))}
            out.append({"model": model, "method": method, "ember": ember, "attack": name, "n": int(acc.notna().sum()),
                        **mean})
    return pd.DataFrame(out)


def relearn_table(root: Path, df: pd.DataFrame) -> pd.DataFrame:
    """The relearning curves: concept accuracy (and retention) after every epoch, mean over jobs/concepts."""
    rows = []
    factors = df.drop_duplicates("job").set_index("job")[["model", "method", "ember"]]
    for p in sorted(root.rglob("relearn_curve.csv")):
        job = str(p.parent.parent.relative_to(root))
        if job not in factors.index:
            continue
        c = pd.read_csv(p)
        for _, r in c.iterrows():
            rows.append({**factors.loc[job].to_dict(), "epoch": int(r["epoch"]), "qa_acc": r.get("qa_acc"),
                         "retain_acc": r.get("retain_acc")})
    if not rows:
        return pd.DataFrame()
    t = pd.DataFrame(rows).groupby(["model", "method", "ember", "epoch"], sort=True)
    return t.agg(n=("qa_acc", "size"), qa_acc=("qa_acc", "mean"), retain_acc=("retain_acc", "mean")).reset_index()


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


def render(table: pd.DataFrame, latex: bool = False) -> str:
    metric_cols = [c for c in table.columns if c not in ("model", "method", "ember", "n") and not c.endswith("_std")]
    higher = {c: hib for c, _, hib in COLUMNS}
    best = {}
    for c in metric_cols:
        vals = pd.to_numeric(table[c], errors="coerce")
        if vals.notna().any():
            best[c] = vals.max() if higher.get(c, False) else vals.min()
    lines = []
    header = ["model", "method", "EMBER", "n", *metric_cols]
    for _, r in table.iterrows():
        cells = [r["model"], r["method"], r["ember"], str(r["n"])]
        for c in metric_cols:
            cells.append(_fmt(r[c], r[c + "_std"], c in best and r[c] == best[c], latex))
        lines.append(cells)
    if latex:
        spec = "l" * 4 + "r" * len(metric_cols)
        body = [" & ".join(h.replace("_", r"\_") for h in header) + r" \\ \midrule"]
        body += [" & ".join(str(x).replace("_", r"\_") if not str(x).startswith("\\") else str(x) for x in row) + r" \\"
                 for row in lines]
        return "\\begin{tabular}{" + spec + "}\n\\toprule\n" + "\n".join(body) + "\n\\bottomrule\n\\end{tabular}\n"
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(x) for x in row) + " |" for row in lines]
    return "\n".join(md) + "\n"


def plots(root: Path, df: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    curves = list(root.rglob("relearn_curve.csv"))
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in curves:
            c = pd.read_csv(p)
            if "epoch" in c and "qa_acc" in c:
                ax.plot(c["epoch"], c["qa_acc"], marker="o", label=str(p.parent.relative_to(root))[:60])
        ax.set_xlabel("relearning epoch")
        ax.set_ylabel("concept QA accuracy")
        ax.legend(fontsize=6)
        fig.tight_layout()
        made.append(out / "relearn_curves.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    grids = list(root.rglob("delta_grid.csv"))
    if grids:
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in grids:
            g = pd.read_csv(p)
            if {"efficacy", "specificity"} <= set(g.columns):
                ax.plot(g["specificity"], g["efficacy"], marker="o", label=str(p.parent.relative_to(root))[:60])
                for _, r in g.iterrows():
                    ax.annotate(f"{r['delta']:g}", (r["specificity"], r["efficacy"]), fontsize=6)
        ax.set_xlabel("specificity")
        ax.set_ylabel("efficacy")
        ax.legend(fontsize=6)
        fig.tight_layout()
        made.append(out / "delta_tradeoff.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    attack_cols = [k for k in df.columns if k.startswith("attacks/") and k.endswith("_acc") and "control" not in k]
    if attack_cols:
        g = df.groupby(["method", "ember"])[attack_cols].mean(numeric_only=True)
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
