"""``hvae report``: one NLL comparison table from the finished evaluate runs of an experiment.

Each row is one evaluate run (a model and its priors, or an NVAE, on one dataset): the test
NLL in nats per image and bits per dimension with its bound type (≤ for the VQ bound and
the ELBO, ≈ for an importance-weighted estimate), its two parts (reconstruction and prior
or KL), the parameters of everything that was trained for it, the training time, and the
run id to open in the MLflow UI; where the runs' test set and unit match a published benchmark
(binarized MNIST in nats, CIFAR-10 in bits/dim: ``stages/literature.py``), the published rows
beside them, marked so. Printed, written as Markdown and logged as the artifact of a small
``report`` run.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from stages import literature
from stages.nll_table import nll_table

from . import graph
from .tracking import TAG_STAGE, Tracker


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
        t, m = run.data.tags, run.data.metrics
        trained = [tracker.client.get_run(t[f"hvae.upstream.{s}"]) for s in trained_stages
                   if f"hvae.upstream.{s}" in t]
        rows.append({
            **m, "model": t.get("hvae.model_name", t.get("hvae.model", "?")), "dataset": t.get("hvae.dataset_desc", "?"),
            "structure": t.get("hvae.structure", ""), "bound": t.get("hvae.bound", "≤"),
            "params": sum(r.data.metrics.get("num_params", 0.0) for r in trained),
            "seconds": sum(r.data.metrics.get(f"{r.data.tags.get(TAG_STAGE)}_seconds", 0.0) for r in trained),
            "run": run.info.run_id, "benchmark": t.get("hvae.benchmark"),
        })
    return literature.ordered(rows)


def report(tracker: Tracker, *, dataset: str | None, model: str | None, tags: dict[str, str], out: Path) -> int:
    rows = collect(tracker, dataset, model, tags)
    if not rows:
        print(f"no finished evaluate runs in experiment '{tracker.experiment_name}' ({tracker.shown_uri})"
              + (" matching the filters" if dataset or model or tags else ""))
        return 1
    # beside ours, the published numbers on the same test sets in the same units
    text = nll_table(literature.ordered(rows + literature.rows({r["benchmark"] for r in rows if r["benchmark"]})))
    print(text)
    out.write_text(text)
    run_id = tracker.start_run(f"report-{datetime.now():%Y%m%d-%H%M%S}", {"hvae.kind": "report"},
                               params={"filters": {"dataset": dataset, "model": model, **tags}, "rows": len(rows)})
    tracker.log_text(run_id, text, "report.md")
    tracker.finish(run_id)
    print(f"written to {out}; MLflow run {run_id} holds it as report.md")
    return 0
