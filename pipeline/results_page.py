"""The pipeline's parent run as a results page: its MLflow description (the tag
``mlflow.note.content``, Markdown the UI renders on the run page) with the headline NLL, the
sample grid and the reconstructions (shown from the stage runs' artifacts through the UI's own
``get-artifact`` route), the NLL table, the data, the epochs and optimizer steps, the git
commit; and the headline metrics copied onto the parent so pipelines sort and compare in
the run list. Torch-free: built from the stages' metrics, tags and output folders.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

NOTE = "mlflow.note.content"
COMMIT = "mlflow.source.git.commit"
LIMIT = 8000  # characters: MLflow's longest tag value
REPORT = "report.html"  # the parent run's self-contained page (pipeline/html_report.py)
# what a pipeline's run-list row shows of its stages (each from the stage that logs it)
HEADLINE = ("test_nll_nats", "test_nll_nats_se", "test_nll_bpd", "test_nll_bpd_se", "test_recon_bpd",
            "test_prior_bpd", "test_kl_bpd", "test_iw_samples", "test_mse", "sample_confidence",
            "sample_label_entropy", "val_bpd", "val_bits_per_code")
# (stage, artifact) of the pictures the page shows, in this order
PICTURES = (("sample", "samples/grid.png", "samples"), ("stage1", "figures/reconstructions.png",
                                                        "reconstructions: inputs on odd rows, their reconstructions below"))


@dataclass(frozen=True)
class StageRow:
    """One stage of a pipeline run, as its summary and pages show it."""

    name: str
    status: str  # FINISHED (this pipeline ran it) or REUSED
    run_id: str
    seconds: float | None  # its wall time when it ran; None when reused
    metrics: dict[str, float]


def headline(rows: list[StageRow]) -> dict[str, float]:
    """The stages' summary rows -> the metrics the parent carries: the headline ones as logged
    (a later stage's wins), and each training stage's ``<stage>_optimizer_steps``."""
    out: dict[str, float] = {}
    for row in rows:
        out.update({k: row.metrics[k] for k in HEADLINE if k in row.metrics})
        if row.name == "evaluate":  # (evaluate.split=val: its NLL is named val_nll_*)
            out.update({k: v for k, v in row.metrics.items() if k.startswith("val_nll_")})
        if "optimizer_steps" in row.metrics:
            out[f"{row.name}_optimizer_steps"] = row.metrics["optimizer_steps"]
    return out


def git_commit(folder: Path) -> tuple[str, bool] | None:
    """(the commit ``folder`` is checked out at, whether files differ from it), or None
    outside a git work tree (an installed wheel)."""
    try:
        sha = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if sha.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        return None


def picture(run_id: str, path: str, alt: str) -> str:
    """An image the run page shows from another run's artifact (a path relative to the UI's root,
    so it works wherever `hvae ui` or an MLflow server serves the store)."""
    return f"![{alt}](get-artifact?path={quote(path, safe='')}&run_uuid={run_id})"


SPLIT_NAMES = {"test": "test", "val": "validation"}


def _result_line(evaluated: dict | None, rows: list[StageRow]) -> str:
    """The NLL the evaluate stage measured, on the split it scored (``evaluate.split``)."""
    split = (evaluated or {}).get("hvae.split", "test")
    metrics = next((row.metrics for row in rows if row.name == "evaluate"), {})
    if not evaluated or f"{split}_nll_nats" not in metrics:
        return "**No test NLL**: the evaluate stage did not run in this pipeline."
    bound = evaluated.get("hvae.bound", "")
    se = lambda k: f" ± {metrics[f'{split}_{k}']:.4g}" if f"{split}_{k}" in metrics else ""  # noqa: E731
    return (f"**{evaluated.get('hvae.model_name', '')}** on {evaluated.get('hvae.dataset_desc', '')}: "
            f"{SPLIT_NAMES.get(split, split)} NLL "
            f"**{bound} {metrics[f'{split}_nll_nats']:.2f}{se('nll_nats_se')} nats** per image, "
            f"{bound} {metrics[f'{split}_nll_bpd']:.4f}{se('nll_bpd_se')} bits/dim")


def _training_lines(cfg, rows: list[StageRow]) -> list[str]:
    lines = []
    for row in rows:
        name, metrics = row.name, row.metrics
        section = getattr(cfg, name, None)
        if section is None or not hasattr(section, "epochs"):
            continue
        steps = f", {metrics['optimizer_steps']:.0f} optimizer steps" if "optimizer_steps" in metrics else ""
        kept = (f", the weights of epoch {metrics['kept_epoch'] + 1:.0f} (train.keep={cfg.train.keep})"
                if "kept_epoch" in metrics else "")
        reused = f" (reused from run {row.run_id})" if row.status == "REUSED" else ""
        lines.append(f"- {name}: {section.epochs} epoch{'s' if section.epochs != 1 else ''}{steps}{kept}{reused}")
    return lines


def summary(cfg, data_line: str, rows: list[StageRow], evaluated: dict | None, commit: tuple[str, bool] | None,
            report_link: str | None = None) -> tuple[str, list[str]]:
    """(the result's line, the facts' lines: data, epochs and steps, code, where the rest is):
    what the description and report.html both say; ``report_link``: report.html's page in the UI."""
    root = f" from {cfg.data.root}" if cfg.data.dataset != "mnist5k" else ""  # (the embedded digits have none)
    facts = [f"- data: {cfg.data.dataset}{root}: {data_line}", *_training_lines(cfg, rows)]
    if commit is not None:
        facts.append(f"- code: git commit {commit[0][:12]}" + (" with uncommitted changes" if commit[1] else ""))
    shown = f"[{REPORT}]({report_link})" if report_link else f"the artifact {REPORT}"
    facts.append(f"- everything in one page: {shown} (curves, samples, every figure); the config: "
                 "the artifact config.yaml; each stage's run is nested under this one")
    return _result_line(evaluated, rows), facts


def page(result: str, facts: list[str], outputs: dict[str, Path], run_ids: dict[str, str],
         table: str | None) -> str:
    """The description's Markdown (``summary``'s result line and facts, the pictures, the NLL
    table), at most ``LIMIT`` characters (the published rows of the NLL table are the first
    thing left out when it would be longer)."""
    pictures = [picture(run_ids[stage], path, alt) for stage, path, alt in PICTURES
                if stage in outputs and (outputs[stage] / path).is_file()]
    head = [result, "", "  ".join(pictures)] if pictures else [result]
    table = table.strip() if table else None
    for shown in (table, _ours_only(table)):
        text = "\n".join([*head, "", *([shown, ""] if shown else []), *facts]) + "\n"
        if len(text) <= LIMIT:
            return text
    return "\n".join([*head, "", *facts])[:LIMIT]


def _ours_only(table: str | None) -> str | None:
    """The NLL table without its published rows (a note says where the whole table is)."""
    if not table:
        return None
    kept = [line for line in table.splitlines() if "(published)" not in line]
    return "\n".join(kept) + "\n\nThe published rows: the evaluate run's report/nll_table.md."
