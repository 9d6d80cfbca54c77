"""``hvae report``: one NLL comparison table from the finished evaluate runs of an experiment.

Each row is one evaluate run (a model and its priors, or an NVAE, on one dataset): the test
NLL in nats per image and bits per dimension with its bound type (≤ for the VQ bound and
the ELBO, ≈ for an importance-weighted estimate), its two parts (reconstruction and prior
or KL), the parameters of everything that was trained for it, the training time, and the
run id to open in the MLflow UI. Printed, written as Markdown and logged as the artifact of
a small ``report`` run.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from .tracking import TAG_STAGE, Tracker

HEADER = ("| Model | Dataset | Structure | NLL (nats/image) | NLL (bits/dim) | recon (bits/dim) | prior/KL (bits/dim) "
          "| Parameters | Training (s) | Evaluate run |")


def _parts(metrics: dict) -> tuple[float, float]:
    prior = metrics.get("test_prior_bpd", metrics.get("test_kl_bpd", float("nan")))
    return metrics.get("test_recon_bpd", float("nan")), prior


def collect(tracker: Tracker, dataset: str | None = None, model: str | None = None,
            tags: dict[str, str] | None = None) -> list[dict]:
    filters = [f"tags.`{TAG_STAGE}` = 'evaluate'", "attributes.status = 'FINISHED'"]
    if dataset:
        filters.append(f"tags.`hvae.dataset` = '{dataset}'")
    if model:
        filters.append(f"tags.`hvae.model` = '{model}'")
    for key, value in (tags or {}).items():
        filters.append(f"tags.`{key}` = '{value}'")
    rows = []
    for run in tracker.search(filters):
        t, m = run.data.tags, run.data.metrics
        trained = [tracker.client.get_run(t[f"hvae.upstream.{s}"]) for s in ("stage1", "priors")
                   if f"hvae.upstream.{s}" in t]
        recon, prior = _parts(m)
        rows.append({
            "model": t.get("hvae.model_name", t.get("hvae.model", "?")), "dataset": t.get("hvae.dataset_desc", "?"),
            "structure": t.get("hvae.structure", ""), "bound": t.get("hvae.bound", "≤"),
            "nats": m.get("test_nll_nats", float("nan")), "bpd": m.get("test_nll_bpd", float("nan")),
            "recon": recon, "prior": prior,
            "params": sum(r.data.metrics.get("num_params", 0.0) for r in trained),
            "seconds": sum(v for r in trained for k, v in r.data.metrics.items() if k.endswith("_seconds")
                           and k.split("_")[0] in ("stage1", "priors")),
            "run": run.info.run_id, "start": run.info.start_time,
        })
    return sorted(rows, key=lambda r: (r["dataset"], r["bpd"]))


def table(rows: list[dict]) -> str:
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['structure']} | {r['bound']} {r['nats']:.2f} | {r['bound']} {r['bpd']:.4f} "
            f"| {r['recon']:.4f} | {r['prior']:.4f} | {r['params'] / 1e6:.2f} M | {r['seconds']:.0f} | {r['run']} |")
    lines += ["", "≤: an upper bound on −log p(x) (the VQ bound −log p(x|z_q(x)) − log p(z_q(x)), or the negative ELBO); "
              "≈: the importance-weighted estimate with K samples (an upper bound that tightens as K grows)."]
    return "\n".join(lines) + "\n"


def report(tracker: Tracker, *, dataset: str | None, model: str | None, tags: dict[str, str], out: Path) -> int:
    rows = collect(tracker, dataset, model, tags)
    if not rows:
        print(f"no finished evaluate runs in experiment '{tracker.experiment_name}' ({tracker.uri})"
              + (" matching the filters" if dataset or model or tags else ""))
        return 1
    text = table(rows)
    print(text)
    out.write_text(text)
    run_id = tracker.start_run(f"report-{datetime.now():%Y%m%d-%H%M%S}", {"hvae.kind": "report"},
                               params={"filters": {"dataset": dataset, "model": model, **tags}, "rows": len(rows)})
    tracker.log_text(run_id, text, "report.md")
    tracker.finish(run_id)
    print(f"written to {out}; MLflow run {run_id} holds it as report.md")
    return 0
