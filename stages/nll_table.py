"""The NLL comparison table (Markdown, in the style of the lecture's tables), built once here
for the evaluate stage's report/nll_table.md and for ``hvae report``. Torch-free.

A row is a dict: model, dataset, structure, bound (≤ or ≈), test_nll_nats, test_nll_bpd,
test_recon_bpd, test_prior_bpd (VQ) or test_kl_bpd (VAE); optionally test_nll_nats_se and
test_nll_bpd_se (shown as ± the standard error over the test images), test_iw_samples (the
estimator's K), test_class_conditional, seeds (a row that is the mean over seeds: ± is then the
s.d. over them), params, epochs, seconds, data and run (then the table has those columns too).
"""
from __future__ import annotations

COLUMNS = ["Model", "Dataset", "Structure", "Estimator", "NLL (nats/image)", "NLL (bits/dim)", "recon (bits/dim)",
           "prior/KL (bits/dim)"]
EXTRA = {"params": "Parameters", "epochs": "Epochs", "seconds": "Training (s)", "data": "Data", "run": "Evaluate run"}
LEGEND = ("≤: an upper bound on −log p(x): −log p(x | z_q(x)) − Σ_l log p(z_l | z_{l−1}) for the VQ models, "
          "the negative ELBO for a VAE; ≈: the importance-weighted estimate with K samples (an upper bound "
          "in expectation that tightens as K grows). Both per image, over the real pixels only: bits/dim "
          "divides by C·h·w·ln 2 of those (MNIST: the 784 of a 28×28 digit, not the 1,024 of the 32×32 "
          "frame its padding makes). ± is the standard error of the mean over the test images; "
          "−log p(x|y): a class-conditional prior's bound, given the label.")
SEEDS = (" A row over n seeds gives the mean of its runs' NLLs ± their standard deviation over the seeds "
         "(the runs differ in stage1.seed and priors.seed only).")
PUBLISHED = (" (published): a paper's number on the same test set in the same unit, with the bound symbol "
             "its table gives (none: unmarked there); from stages/literature.py.")


def bound_symbol(metrics: dict) -> str:
    """≤ for the VQ bound and the ELBO, ≈ for an importance-weighted estimate with K > 1."""
    return "≈" if metrics.get("test_iw_samples", 1.0) > 1 else "≤"


def estimator(r: dict) -> str:
    """What the NLL cell is: ≤ the VQ bound (of −log p(x|y) with a class-conditional prior),
    ≤ the negative ELBO (K = 1), or ≈ the importance-weighted estimate with its K."""
    k = r.get("test_iw_samples")
    if k is None:
        return "≤ VQ bound" + (", −log p(x|y)" if r.get("test_class_conditional") else "")
    return "≤ −ELBO" if k <= 1 else f"≈ IW, K={int(k)}"


def _published(r: dict, extra: list[str]) -> list[str]:
    """A row of stages/literature.py: its one number in its unit, its source."""
    b = (r["bound"] + " ") if r["bound"] else ""
    nats = f"{b}{r['test_nll_nats']:.2f}" if "test_nll_nats" in r else "–"
    bpd = f"{b}{r['test_nll_bpd']:.2f}" if "test_nll_bpd" in r else "–"
    return [f"{r['model']} (published)", r["dataset"], r["structure"], "–", nats, bpd, "–", "–"] + [""] * len(extra)


def _cells(r: dict, extra: list[str]) -> list[str]:
    if r.get("published"):
        return _published(r, extra)
    nan = float("nan")
    b = r.get("bound", bound_symbol(r))
    prior = r.get("test_prior_bpd", r.get("test_kl_bpd", nan))
    se = {u: f" ± {r[f'test_nll_{u}_se']:.{d}f}" if f"test_nll_{u}_se" in r else "" for u, d in (("nats", 2), ("bpd", 4))}
    model = r["model"] + (f" (mean of {r['seeds']} seeds)" if r.get("seeds", 1) > 1 else "")
    cells = [model, r["dataset"], r.get("structure", ""), estimator(r),
             f"{b} {r.get('test_nll_nats', nan):.2f}{se['nats']}", f"{b} {r.get('test_nll_bpd', nan):.4f}{se['bpd']}",
             f"{r.get('test_recon_bpd', nan):.4f}", f"{prior:.4f}"]
    shown = {"params": lambda v: f"{v / 1e6:.2f} M", "seconds": lambda v: f"{v:.0f}", "run": str, "epochs": str,
             "data": str}
    return cells + [shown[k](r[k]) if k in r else "" for k in extra]


def _head_and_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    extra = [k for k in EXTRA if any(k in r for r in rows)]
    return COLUMNS + [EXTRA[k] for k in extra], [_cells(r, extra) for r in rows]


def nll_records(rows: list[dict]) -> list[dict[str, str]]:
    """The table's rows as {column: cell}, the cells as the Markdown shows them."""
    head, cells = _head_and_cells(rows)
    return [dict(zip(head, row)) for row in cells]


def nll_table(rows: list[dict]) -> str:
    head, cells = _head_and_cells(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    legend = (LEGEND + (SEEDS if any(r.get("seeds", 1) > 1 for r in rows) else "")
              + (PUBLISHED if any(r.get("published") for r in rows) else ""))
    return "\n".join(lines + ["", legend]) + "\n"
