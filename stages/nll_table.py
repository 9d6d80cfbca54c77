"""The NLL comparison table (Markdown, in the style of the lecture's tables), built once here
for the evaluate stage's report/nll_table.md and for ``hvae report``. Torch-free.

A row is a dict: model, dataset, structure, bound (≤ or ≈), test_nll_nats, test_nll_bpd,
test_recon_bpd, test_prior_bpd (VQ) or test_kl_bpd (VAE); optionally params, seconds and run
(then the table has those columns too).
"""
from __future__ import annotations

COLUMNS = ["Model", "Dataset", "Structure", "NLL (nats/image)", "NLL (bits/dim)", "recon (bits/dim)",
           "prior/KL (bits/dim)"]
EXTRA = {"params": "Parameters", "seconds": "Training (s)", "run": "Evaluate run"}
LEGEND = ("≤: an upper bound on −log p(x): −log p(x | z_q(x)) − Σ_l log p(z_l | z_{l−1}) for the VQ models, "
          "the negative ELBO for a VAE; ≈: the importance-weighted estimate with K samples (an upper bound "
          "in expectation that tightens as K grows). Both per image, over the real pixels only: bits/dim "
          "divides by C·h·w·ln 2 of those (MNIST: the 784 of a 28×28 digit, not the 1,024 of the 32×32 "
          "frame its padding makes).")
PUBLISHED = (" (published): a paper's number on the same test set in the same unit, with the bound symbol "
             "its table gives (none: unmarked there); from stages/literature.py.")


def bound_symbol(metrics: dict) -> str:
    """≤ for the VQ bound and the ELBO, ≈ for an importance-weighted estimate with K > 1."""
    return "≈" if metrics.get("test_iw_samples", 1.0) > 1 else "≤"


def _published(r: dict, extra: list[str]) -> list[str]:
    """A row of stages/literature.py: its one number in its unit, its source."""
    b = (r["bound"] + " ") if r["bound"] else ""
    nats = f"{b}{r['test_nll_nats']:.2f}" if "test_nll_nats" in r else "–"
    bpd = f"{b}{r['test_nll_bpd']:.2f}" if "test_nll_bpd" in r else "–"
    return [f"{r['model']} (published)", r["dataset"], r["structure"], nats, bpd, "–", "–"] + [""] * len(extra)


def _cells(r: dict, extra: list[str]) -> list[str]:
    if r.get("published"):
        return _published(r, extra)
    nan = float("nan")
    b = r.get("bound", bound_symbol(r))
    prior = r.get("test_prior_bpd", r.get("test_kl_bpd", nan))
    cells = [r["model"], r["dataset"], r.get("structure", ""), f"{b} {r.get('test_nll_nats', nan):.2f}",
             f"{b} {r.get('test_nll_bpd', nan):.4f}", f"{r.get('test_recon_bpd', nan):.4f}", f"{prior:.4f}"]
    shown = {"params": lambda v: f"{v / 1e6:.2f} M", "seconds": lambda v: f"{v:.0f}", "run": str}
    return cells + [shown[k](r[k]) if k in r else "" for k in extra]


def nll_table(rows: list[dict]) -> str:
    extra = [k for k in EXTRA if any(k in r for r in rows)]
    head = COLUMNS + [EXTRA[k] for k in extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(r, extra)) + " |" for r in rows]
    legend = LEGEND + (PUBLISHED if any(r.get("published") for r in rows) else "")
    return "\n".join(lines + ["", legend]) + "\n"
