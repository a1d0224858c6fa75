"""A training run's report: Markdown with PNG plots, what an ML engineer reads before trusting the gate's numbers.

Fraud: learning curves (loss and validation AP per epoch, per network
member), precision-recall and ROC curves and a reliability diagram of the
candidate and the champion on the gate's window, and the candidate's score
distribution by class. Recommendations: the loss per epoch and Recall@K
(K = 1..20) of candidate and champion on the gate's split.

The plots are written beside the artifact, in its ``report/`` folder, before
the version is registered (so the registered checksum covers them). Drawing
is headless (matplotlib's Agg backend) and imported only here, only when a
report is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPORT_DIR = "report"


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean predicted score, observed fraud rate and count per bin of equal width over [0, 1] (empty bins out).

    >>> mean_p, rate, n = reliability(np.array([0, 0, 1, 1]), np.array([0.05, 0.15, 0.85, 0.95]), bins=2)
    >>> mean_p.round(2).tolist(), rate.tolist(), n.tolist()
    ([0.1, 0.9], [0.0, 1.0], [2, 2])
    """
    which = np.minimum((np.asarray(p) * bins).astype(int), bins - 1)
    n = np.bincount(which, minlength=bins)
    keep = n > 0
    mean_p = np.bincount(which, weights=p, minlength=bins)[keep] / n[keep]
    rate = np.bincount(which, weights=y, minlength=bins)[keep] / n[keep]
    return mean_p, rate, n[keep]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no screen: files only
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, folder: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(folder / name, dpi=90)
    plt.close(fig)
    return name


def fraud_plots(folder: str | Path, y: np.ndarray, scores: Mapping[str, np.ndarray],
                curves: Mapping[str, Mapping[str, Sequence[float]]]) -> list[str]:
    """Write the fraud run's plots under ``folder``; returns their file names.

    ``scores``: each model's scores on the gate's window (the candidate first,
    then the champion if there is one), ``y`` that window's labels;
    ``curves``: per network member, ``{"loss": [...], "validation_ap": [...]}``.
    """
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = _pyplot()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    y = np.asarray(y, dtype=int)
    names = []
    if curves:
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
        for member, c in curves.items():
            epochs = np.arange(1, len(c.get("loss", [])) + 1)
            left.plot(epochs, c.get("loss", []), marker=".", label=member)
            right.plot(epochs, c.get("validation_ap", []), marker=".", label=member)
        left.set(title="training loss", xlabel="epoch")
        right.set(title="validation average precision", xlabel="epoch")
        left.legend(fontsize=7)
        names.append(_save(plt, fig, out, "learning_curves.png"))
    fig, (pr, roc) = plt.subplots(1, 2, figsize=(9, 3.6))
    for model, p in scores.items():
        precision, recall, _ = precision_recall_curve(y, p)
        fpr, tpr, _ = roc_curve(y, p)
        pr.plot(recall, precision, label=model)
        roc.plot(fpr, tpr, label=model)
    roc.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    pr.set(title=f"precision-recall (gate window, {int(y.sum())} frauds)", xlabel="recall", ylabel="precision")
    roc.set(title="ROC", xlabel="false-positive rate", ylabel="true-positive rate")
    pr.legend(fontsize=7)
    names.append(_save(plt, fig, out, "pr_roc.png"))
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    for model, p in scores.items():
        mean_p, rate, _ = reliability(y, np.asarray(p))
        ax.plot(mean_p, rate, marker="o", label=model)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    ax.set(title="calibration (10 bins)", xlabel="mean score", ylabel="observed fraud rate")
    ax.legend(fontsize=7)
    names.append(_save(plt, fig, out, "calibration.png"))
    candidate, p = next(iter(scores.items()))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    edges = np.linspace(0, 1, 41)
    ax.hist(np.asarray(p)[y == 0], bins=edges, alpha=0.6, label="genuine", log=True)
    ax.hist(np.asarray(p)[y == 1], bins=edges, alpha=0.6, label="fraud", log=True)
    ax.set(title=f"{candidate}: scores by class (gate window)", xlabel="score", ylabel="payments (log)")
    ax.legend(fontsize=7)
    names.append(_save(plt, fig, out, "scores_by_class.png"))
    return names


def recs_plots(folder: str | Path, recall_at_k: Mapping[str, Sequence[float]], losses: Sequence[float]) -> list[str]:
    """Write the recommender run's plots under ``folder``: Recall@K per model on the gate's split, the loss."""
    plt = _pyplot()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for model, curve in recall_at_k.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, marker=".", label=model)
    ax.set(title="Recall@K on the gate's split (each user's newest)", xlabel="K", ylabel="recall")
    ax.legend(fontsize=7)
    names.append(_save(plt, fig, out, "recall_at_k.png"))
    if losses:
        fig, ax = plt.subplots(figsize=(4.6, 3.4))
        ax.plot(np.arange(1, len(losses) + 1), losses, marker=".")
        ax.set(title="training loss", xlabel="epoch")
        names.append(_save(plt, fig, out, "loss.png"))
    return names


def report_plots(draw: Callable[[Path], list[str]], artifact: str | Path,
                 say: Callable[[str], None] = lambda _m: None) -> list[str]:
    """Draw a run's plots into ``artifact/report/``; their paths relative to the artifact.

    A plot that cannot be drawn costs the report its pictures, never the
    training run: the failure is said, and no plot is listed.
    """
    folder = Path(artifact) / REPORT_DIR
    try:
        names = draw(folder)
    except Exception as exc:  # matplotlib missing or a degenerate window: the numbers still stand
        say(f"report plots not drawn: {exc!r}")
        return []
    say(f"report plots: {', '.join(names)} in {folder}")
    return [f"{REPORT_DIR}/{name}" for name in names]


def run_report(doc: Mapping[str, Any], kind: str, report_dir: str | Path) -> str:
    """A training run's report in Markdown: data, candidate against champion, the gate, what moved, the plots.

    ``doc`` is the run's JSON document (the candidate's summary with its
    ``promotion``); plots are linked relative to ``report_dir``, where the
    Markdown file is written.

    >>> print(run_report({"started": "T0", "ok": False, "error": "no data"}, "fraud", "."))
    # Fraud training run T0
    <BLANKLINE>
    **Failed: nothing was registered or promoted.**
    <BLANKLINE>
    ```
    no data
    ```
    <BLANKLINE>
    """
    lines = [f"# {kind.capitalize()} training run {doc.get('started')}", ""]
    if not doc.get("ok"):
        lines += ["**Failed: nothing was registered or promoted.**", "", "```", str(doc.get("error")), "```"]
        return "\n".join(lines) + "\n"
    promotion = doc.get("promotion") or {}
    evaluation = doc.get("evaluation") or {}
    lines += [f"- candidate: `{doc['model_version']}` ({doc.get('path')})",
              f"- trained on: {json.dumps(doc.get('source') or evaluation.get('training'))}",
              f"- gate window: {json.dumps(evaluation.get('window'))}",
              f"- champion before: `{promotion.get('from')}`; after: `{promotion.get('to')}` "
              f"(**{promotion.get('action')}**)", ""]
    champion = evaluation.get("champion_metrics") or {}
    lines += ["| metric | candidate | champion |", "| --- | --- | --- |"]
    for name, value in (doc.get("metrics") or {}).items():
        lines.append(f"| {name} | {value} | {champion.get(name, '-')} |")
    lines += ["", "Gate checks:", ""]
    for check in (promotion.get("gate") or {}).get("checks", []):
        lines.append(f"- {check['check']}: {'pass' if check['passed'] else 'FAIL'} "
                     f"({', '.join(f'{k} {v}' for k, v in check.items() if k not in ('check', 'passed'))})")
    lines += [f"- refused: {r}" for r in promotion.get("reasons", [])]
    plots = evaluation.get("plots") or []
    if plots and doc.get("path"):
        lines += ["", "## Plots", ""]
        for plot in plots:
            target = os.path.relpath(Path(doc["path"]) / plot, Path(report_dir))
            lines += [f"![{Path(plot).stem.replace('_', ' ')}]({target})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"
