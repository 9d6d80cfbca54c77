"""Evaluate: the test NLL of the trained model family (``Family.evaluate``), its parts and
reconstruction quality, in nats per image and bits per dimension (nats / (C*H*W*ln 2)).

VQ families report the upper bound of a one-hot posterior,
    -log p(x) <= -log p(x | z_q(x)) - sum_l log p_prior(z_l | z_{l-1});
VAE families the importance-weighted estimate with K = ``evaluate.iw_samples``
    -log p(x) ≈ -log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x),  z_k ~ q(z | x)
(an upper bound in expectation, tighter as K grows; K = 1 is the negative ELBO, shown as ≤).
Output: report/nll_table.md.
"""
from __future__ import annotations

from .base import StageContext, StageResult
from .families import load_model
from .nll_table import bound_symbol, nll_table


def run(ctx: StageContext) -> StageResult:
    family, model = load_model(ctx.upstream["stage1"] / "model")
    test = ctx.data["test"]
    metrics = family.evaluate(model, ctx.upstream, test, ctx.config.evaluate)
    name, structure = family.describe(model)
    shape = "×".join(str(s) for s in test.images.shape[1:])
    dataset = f"{ctx.config.data.dataset} ({len(test)} test images, {shape})"
    row = {"model": name, "dataset": dataset, "structure": structure, "bound": bound_symbol(metrics), **metrics}
    folder = ctx.output_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nll_table.md").write_text(nll_table([row]))
    # what `hvae report` lists, kept on the run
    tags = {"hvae.model": family.name, "hvae.model_name": name, "hvae.dataset": ctx.config.data.dataset,
            "hvae.dataset_desc": dataset, "hvae.structure": structure, "hvae.bound": row["bound"]}
    return StageResult(metrics=metrics, output_dir=ctx.output_dir, tags=tags)
