"""``hvae report``: one NLL comparison table from the finished evaluate runs of an experiment.

Each row is one evaluate run (a model and its priors, or an NVAE, on one dataset): the test
NLL in nats per image and bits per dimension with its bound type (≤ for the VQ bound and
the ELBO, ≈ for an importance-weighted estimate), its two parts (reconstruction and prior
or KL), the parameters of everything that was trained for it, the training time, and the
run id to open in the MLflow UI; where the runs' test set and unit match a published benchmark
(binarized MNIST in nats, CIFAR-10 in bits/dim: ``stages/literature.py``), the published rows
beside them, marked so. Runs of one setup that differ in their training seeds alone (tag
``hvae.setup``; ``hvae run --seeds N``) also get a row of their mean ± the s.d. over the seeds.
Below the table, every model is compared with the best one on the same test images: the mean
of the paired per-image differences ± its standard error (far smaller than either NLL's own
s.e.: the images' difficulty cancels). Printed, written as Markdown and logged as the artifact
of a small ``report`` run.
"""
from __future__ import annotations

import math
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np

from hvae.stages import literature
from hvae.stages.nll_table import nll_table

from hvae.settings import graph

from . import html_report
from .tracking import TAG_STAGE, TAG_UPSTREAM, Tracker, plain


def collect(tracker: Tracker, dataset: str | None = None, model: str | None = None,
            tags: dict[str, str] | None = None) -> list[dict]:
    filters = [f"tags.`{TAG_STAGE}` = 'evaluate'", "attributes.status = 'FINISHED'"]
    if dataset:
        filters.append(f"tags.`hvae.dataset` = '{dataset}'")
    if model:
        filters.append(f"tags.`hvae.model` = '{model}'")
    for key, value in (tags or {}).items():
        filters.append(f"tags.`{key}` = '{value}'")
    trained_stages = graph.training_stages()
    rows = []
    for run in tracker.search(filters):
        if run.data.tags.get("hvae.split", "test") != "test":
            continue  # (an evaluation of the validation split: not a test NLL)
        t, m = run.data.tags, plain(run.data.metrics)
        trained = [tracker.client.get_run(t[f"{TAG_UPSTREAM}.{s}"]) for s in trained_stages
                   if f"{TAG_UPSTREAM}.{s}" in t]
        rows.append({
            **m, "model": t.get("hvae.model_name", t.get("hvae.model", "?")), "dataset": t.get("hvae.dataset_desc", "?"),
            "structure": t.get("hvae.structure", ""), "bound": t.get("hvae.bound", "≤"),
            "params": sum(plain(r.data.metrics).get("num_params", 0.0) for r in trained),
            "epochs": "+".join(r.data.params.get(f"{r.data.tags.get(TAG_STAGE)}.epochs", "?") for r in trained),
            "data": _data_of(tracker, t),
            "seconds": sum(plain(r.data.metrics).get(f"{r.data.tags.get(TAG_STAGE)}_seconds", 0.0) for r in trained),
            "run": run.info.run_id, "benchmark": t.get("hvae.benchmark"), "setup": t.get("hvae.setup"),
        })
    return literature.ordered(rows)


def _data_of(tracker: Tracker, tags: dict) -> str:
    """Where a pipeline's images came from (its data.root; the embedded digits have none)."""
    parent = tags.get("mlflow.parentRunId")
    if not parent:
        return ""
    params = tracker.client.get_run(parent).data.params
    return params.get("data.root", "") if params.get("data.dataset", "mnist5k") != "mnist5k" else "(embedded)"


def aligned(markdown: str, width: int | None = None) -> str:
    """The Markdown tables in ``markdown`` with their columns padded to one width each; with
    ``width`` (a terminal's), the text columns cut (…) until a row fits in it where they can."""
    out, block = [], []

    def flush():
        if not block:
            return
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block]
        rule = [i for i, r in enumerate(rows) if all(set(c) <= {"-"} for c in r)]
        body = [r for i, r in enumerate(rows) if i not in rule]
        sizes = [max(len(r[i]) for r in body) for i in range(len(body[0]))]
        if width:
            text = [i for i, c in enumerate(body[0]) if c in ("Model", "Dataset", "Structure", "Data", "Best")]
            while sum(sizes) + 3 * len(sizes) + 1 > width and any(sizes[i] > 12 for i in text):
                widest = max(text, key=lambda i: sizes[i])
                sizes[widest] -= 1
        cut = lambda c, n: c if len(c) <= n else c[: n - 1] + "…"  # noqa: E731
        lines = ["| " + " | ".join(cut(c, n).ljust(n) for c, n in zip(r, sizes)) + " |" for r in body]
        lines.insert(1, "|" + "|".join("-" * (n + 2) for n in sizes) + "|")
        out.extend(lines)
        block.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            block.append(line)
        else:
            flush()
            out.append(line)
    flush()
    return "\n".join(out) + "\n"


def over_seeds(rows: list[dict]) -> list[dict]:
    """One row per setup run with several seeds: the mean of every test metric, ± the s.d. of
    the NLL over the seeds (in place of the standard error over the images)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("setup"):
            groups.setdefault(r["setup"], []).append(r)
    out = []
    for runs in groups.values():
        if len(runs) < 2:
            continue
        keys = set.intersection(*(set(k for k, v in r.items() if k.startswith("test_") and isinstance(v, float))
                                  for r in runs))
        mean = {k: float(np.mean([r[k] for r in runs])) for k in keys}
        for unit in ("nats", "bpd"):
            mean[f"test_nll_{unit}_se"] = float(np.std([r[f"test_nll_{unit}"] for r in runs], ddof=1))
        out.append({**runs[0], **mean, "seeds": len(runs), "run": f"{len(runs)} runs",
                    "seconds": float(np.mean([r["seconds"] for r in runs]))})
    return out


def per_image(tracker: Tracker, run_id: str) -> dict[int, float] | None:
    """An evaluate run's per-image NLLs (report/per_image_nll.csv), by test index; None for a
    run from before they were kept."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="report/per_image_nll.csv",
                                                       dst_path=tmp, tracking_uri=tracker.uri)
        except (MlflowException, OSError):
            return None
        table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return {int(i): float(v) for i, v in table}


def paired(tracker: Tracker, rows: list[dict]) -> str:
    """Each model against the best one on the same test images (same dataset cell): the mean
    per-image difference ± its standard error, as a Markdown table ("" when nothing pairs)."""
    lines = []
    by_test_set: dict[str, list[dict]] = {}
    for r in rows:
        if not r.get("published") and not r.get("seeds") and "run" in r:
            by_test_set.setdefault(r["dataset"], []).append(r)
    for dataset, runs in by_test_set.items():
        if len(runs) < 2:
            continue
        values = {r["run"]: per_image(tracker, r["run"]) for r in runs}
        runs = [r for r in runs if values[r["run"]]]
        runs.sort(key=lambda r: r["test_nll_nats"])
        for r in runs[1:]:
            best, other = values[runs[0]["run"]], values[r["run"]]
            common = sorted(set(best) & set(other))
            if len(common) < 2:
                continue
            d = np.array([other[i] - best[i] for i in common])
            se = float(np.std(d, ddof=1) / math.sqrt(len(d)))
            lines.append(f"| {r['model']} ({r['run'][:8]}) | {runs[0]['model']} ({runs[0]['run'][:8]}) | "
                         f"{dataset} | {d.mean():+.2f} ± {se:.2f} | {d.mean() / se if se > 0 else float('inf'):.1f} | "
                         f"{len(d)} |")
    if not lines:
        return ""
    head = ["", "Paired differences on the same test images (each model minus the best of its test set):", "",
            "| Model | Best | Dataset | Δ NLL (nats/image) ± s.e. | Δ / s.e. | Images |", "|---|---|---|---|---|---|"]
    return "\n".join(head + lines) + "\n"


def report(tracker: Tracker, *, dataset: str | None, model: str | None, tags: dict[str, str], out: Path) -> int:
    rows = collect(tracker, dataset, model, tags)
    if not rows:
        print(f"no finished evaluate runs in experiment '{tracker.experiment_name}' ({tracker.shown_uri})"
              + (" matching the filters" if dataset or model or tags else ""))
        return 1
    # beside ours, the published numbers on the same test sets in the same units
    text = nll_table(literature.ordered(over_seeds(rows) + rows
                                        + literature.rows({r["benchmark"] for r in rows if r["benchmark"]})))
    text += paired(tracker, rows)
    import shutil
    import sys

    print(aligned(text, shutil.get_terminal_size().columns if sys.stdout.isatty() else None))
    out.write_text(text)
    kept = tracker.reports()  # (its own experiment: a report is no pipeline to list among them)
    run_id = kept.start_run(f"report-{datetime.now():%Y%m%d-%H%M%S}",
                            {"hvae.kind": "report", "hvae.experiment": tracker.experiment_name},
                            params={"filters": {"dataset": dataset, "model": model, **tags}, "rows": len(rows)})
    kept.log_text(run_id, text, "report.md")
    shown = f"{len(rows)} evaluate run{'s' if len(rows) != 1 else ''} of experiment '{tracker.experiment_name}'"
    kept.log_text(run_id, html_report.document(f"hvae report: {shown}", shown, text, [], []), "report.html")
    kept.finish(run_id)
    print(f"written to {out}; MLflow run {run_id} in experiment '{kept.experiment_name}' holds it as report.md and report.html")
    return 0
