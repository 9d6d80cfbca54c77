"""Evaluate: the test NLL of the trained model family, its parts and reconstruction quality,
in nats per image and bits per dimension (nats / (C*h*w*ln 2)), both over the real pixels
(h x w: a dataset padded for the models' strides, MNIST's 28x28 in 32x32, leaves the padding
out of the likelihood and of the denominator, as NVAE's code does).

VQ families report the upper bound of a one-hot posterior,
    -log p(x) <= -log p(x | z_q(x)) - sum_l log p_prior(z_l | z_{l-1});
VAE families the importance-weighted estimate with K = ``evaluate.iw_samples``
    -log p(x) ≈ -log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x),  z_k ~ q(z | x)
(an upper bound in expectation, tighter as K grows; K = 1 is the negative ELBO, shown as ≤).

The test split streams through ``map_batches`` with a pool of ``evaluate.num_actors`` actors
(auto: one per CPU, or GPU), each holding the model (``Family.scorer``) on its device (one GPU
each when ``cluster.use_gpu``); every batch comes back as its sums, which the driver adds up
(``Family.summary``); every image's own value comes back too, for the standard error over the
test images (``test_nll_nats_se``) and for paired comparisons of two models on the same test
set (``hvae report``). Output: report/nll_table.md and report/per_image_nll.csv (source index,
nats). With ``evaluate.split=val`` the validation split is scored instead and every ``test_*``
metric is named ``val_*`` (the run is tagged ``hvae.split``; ``hvae report`` leaves it out).
"""
from __future__ import annotations


import numpy as np

from .base import StageContext, StageResult
from .data import actor_pool
from hvae.settings.config import setup_key

from .families import IMAGE_NATS, add_up, load_model
from . import literature
from .nll_table import bound_symbol, nll_records, nll_table


PER_IMAGE_FILE = "per_image_nll.csv"


class Scorer:
    """Ray Data actor: one test batch -> one row of its sums, on the actor's device (a GPU when
    the stage asked for one). The row also holds every image's nats and source index, padded to
    ``batch_size`` (NaN, -1) so that every row has the same shape."""

    def __init__(self, score, use_gpu: bool, batch_size: int):
        from .families import worker_device

        self.score, self.batch_size = score.to(worker_device(use_gpu)), batch_size

    def __call__(self, batch: dict) -> dict:
        import torch

        x = torch.from_numpy(np.array(batch["image"]))
        sums = self.score(x, torch.from_numpy(np.array(batch["label"])), int(batch["index"][0]))
        pad = self.batch_size - len(x)
        sums[IMAGE_NATS] = np.pad(np.asarray(sums[IMAGE_NATS], np.float64), (0, pad), constant_values=np.nan)
        sums["image_index"] = np.pad(np.asarray(batch["index"], np.float64), (0, pad), constant_values=-1)
        return {k: np.asarray(v, dtype=np.float64)[None] for k, v in sums.items()}


def score(ctx: StageContext, family, model) -> tuple[dict, np.ndarray, int]:
    """The test split's sums, added up over every batch the actors scored, every image's
    (source index, nats) in index order, and how many actors scored (auto resolved)."""
    ecfg = ctx.config.evaluate
    # the scorer is built here, with what it needs from the upstream folders, and shipped to the
    # actors whole: an actor on another node cannot see the driver's files
    scorer = family.scorer(model.eval(), dict(ctx.upstream), ecfg)
    use_gpu = ctx.config.cluster.use_gpu
    pool = actor_pool(ecfg.num_actors, use_gpu, ctx.data.rows[ecfg.split], ecfg.batch_size)
    rows = ctx.data.stream(ecfg.split).map_batches(
        Scorer, fn_constructor_kwargs={"score": scorer, "use_gpu": use_gpu, "batch_size": ecfg.batch_size},
        batch_size=ecfg.batch_size, compute=pool, num_cpus=1,
        num_gpus=1 if use_gpu else 0)
    total: dict = {}
    for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
        batch = {k: np.asarray(v) for k, v in batch.items()}
        index, nats = batch.pop("image_index").ravel(), batch.pop(IMAGE_NATS).ravel()
        add_up(total, {k: v.sum(0) for k, v in batch.items()})
        add_up(total, {IMAGE_NATS: np.stack([index, nats], 1)[index >= 0]})
    images = total.pop(IMAGE_NATS)
    return total, images[np.argsort(images[:, 0], kind="stable")], pool.max_size


def standard_errors(nats: np.ndarray, dims: int) -> dict[str, float]:
    """The standard error of the mean NLL over the test images (their sample s.d. / sqrt(n)), in
    nats per image and bits per dimension."""
    from hvae.models.likelihoods import to_bits_per_dim

    se = float(np.std(nats, ddof=1) / np.sqrt(len(nats))) if len(nats) > 1 else float("nan")
    return {"test_nll_nats_se": se, "test_nll_bpd_se": to_bits_per_dim(se, dims)}


def run(ctx: StageContext) -> StageResult:
    model_dir = ctx.upstream["stage1"] / "model"
    family, model = load_model(model_dir)
    # nats per image and bits per dimension over the real pixels (DataSpec.content): the
    # padding added for the model's strides is no data and not counted
    sums, images, actors = score(ctx, family, model)
    dims = ctx.data.likelihood_dims
    metrics = {**family.summary(sums, dims, ctx.config.evaluate), **standard_errors(images[:, 1], dims)}
    metrics["test_dims"] = float(dims)
    name, structure = family.describe(model)
    d = ctx.config.data
    binarized = f", binarized {d.binarize} (seed {d.binarize_seed})" if d.binarize != "none" else ""
    split = ctx.config.evaluate.split
    dataset = f"{d.dataset}{binarized} ({int(metrics['test_images'])} {split} images, {ctx.data.describe_pixels()})"
    bench = literature.benchmark(d) if split == "test" else None
    row = {"model": name, "dataset": dataset, "structure": structure, "bound": bound_symbol(metrics), **metrics,
           "benchmark": bench}
    folder = ctx.output_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    np.savetxt(folder / PER_IMAGE_FILE, images, fmt=["%d", "%.6f"], delimiter=",", header="index,nats", comments="")
    table = literature.ordered([row, *literature.rows([bench] if bench else [])])
    (folder / "nll_table.md").write_text(nll_table(table))
    # what `hvae report` lists, kept on the run
    tags = {"hvae.model": family.name, "hvae.model_name": name, "hvae.dataset": ctx.config.data.dataset,
            "hvae.dataset_desc": dataset, "hvae.structure": structure, "hvae.bound": row["bound"],
            "hvae.actors": str(actors),  # (how many scored: evaluate.num_actors=auto resolved)
            # runs with the same setup differ in their training seeds alone (hvae report: mean ± s.d.)
            "hvae.setup": setup_key(ctx.config, ctx.data.fingerprint), "hvae.seed": f"{ctx.config.stage1.seed}/{ctx.config.priors.seed}"}
    if bench:  # its test set and unit are a published benchmark's: hvae report shows those rows beside it
        tags["hvae.benchmark"] = bench
    if split != "test":  # (the metrics say which split they are of; the table above already does)
        tags["hvae.split"] = split
        metrics = {f"{split}_{k[len('test_'):]}" if k.startswith("test_") else k: v for k, v in metrics.items()}
    return StageResult(metrics=metrics, output_dir=ctx.output_dir, tags=tags,
                       tables={"report/nll_table.json": nll_records(table)})
