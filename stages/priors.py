"""Priors: a gated PixelCNN per code level, trained on the extracted codes with the shared
Ray Train loop, the codes read as Ray Data shards of the Parquet dataset.

Output folder:
    model/prior_level{l}.pt   state dict of level l's PixelCNN (level 0 = top)
    model/priors.json         constructor arguments of models.pixelcnn.HierarchicalPrior
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from hvae.models.pixelcnn import HierarchicalPrior

from hvae.models.likelihoods import to_bits_per_dim

from . import shards
from .base import StageContext, StageResult, TrainTask, load_weights, worker_batch
from .data import read_here
from .families import load_model
from .extract import SCHEMA_FILE
from .train_loop import LoopSpec, fit

CONFIG_FILE = "priors.json"


def prior_config(schema: dict, pcfg) -> dict:
    return {"codebook_sizes": schema["codebook_sizes"], "shapes": schema["shapes"], "hidden": pcfg.hidden,
            "layers": pcfg.layers, "kernel": pcfg.kernel,
            "num_classes": schema["num_classes"] if pcfg.class_conditional else 0,
            "attention_every": pcfg.attention_every, "attention_heads": pcfg.attention_heads, "dropout": pcfg.dropout}


def prior_args(codebook_sizes: list[int], shapes: list[list[int]], num_classes: int = 0, **changes) -> dict:
    """HierarchicalPrior's arguments for code maps of these sizes and shapes at the ``priors:``
    section's defaults, with ``changes`` (a notebook's, a test's or a benchmark's way to build one)."""
    from hvae.settings.config import PriorsConfig

    schema = {"codebook_sizes": codebook_sizes, "shapes": shapes, "num_classes": num_classes}
    return {**prior_config(schema, PriorsConfig(class_conditional=num_classes > 0)), **changes}


def save_priors(model: HierarchicalPrior, config: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for l, prior in enumerate(model.levels):
        torch.save(prior.state_dict(), folder / f"prior_level{l}.pt")
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def load_priors(folder: Path) -> HierarchicalPrior:
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    model = HierarchicalPrior(**config)
    for l, prior in enumerate(model.levels):
        load_weights(prior, folder / f"prior_level{l}.pt")
    return model.eval()


class PriorTask(TrainTask):
    def __init__(self, config: dict, batch_size: int, world_hint: int, seed: int, train_rows: int, decoder=None):
        self.config, self.train_rows = config, train_rows
        self.decoder = decoder  # stage 1's model: decodes the codes drawn every epoch (epoch_images)
        self.levels = len(config["codebook_sizes"])
        self.batch_size = worker_batch("priors.batch_size", batch_size, world_hint)
        self.seed = seed
        self.held: dict = {}  # split -> this worker's shard of the codes, after its first pass

    def build_model(self):
        return HierarchicalPrior(**self.config)

    def _batches(self, split: str, epoch: int | None):
        import ray.train

        if split not in self.held:  # (the codes are small: a worker holds its shard, stages/shards.py)
            self.held[split] = shards.whole(ray.train.get_dataset_shard(split))
        return self.batches(self.held[split], epoch)

    def batches(self, rows: dict, epoch: int | None):
        """Batches of the codes ``rows``; for training (``epoch`` given) in an order drawn for
        the epoch from the whole shard."""
        gen = torch.Generator().manual_seed(self.seed * 1009 + epoch) if epoch is not None else None
        return shards.batches(rows, self.batch_size, gen, pin=torch.cuda.is_available())

    def train_batches(self, epoch, rank, world):
        return self._batches("train", epoch)

    def val_batches(self, rank, world):
        return self._batches("val", None)

    def _forward(self, model, batch, device):
        codes = [batch[f"level{l}"].to(device, non_blocking=True).long() for l in range(self.levels)]
        labels = batch["label"].to(device, non_blocking=True).long() if self.config["num_classes"] else None
        nlls = model(codes, labels)
        sums = {"count": torch.tensor(float(codes[0].shape[0]))}
        for l, nll in enumerate(nlls):
            sums[f"nll_level{l}"] = nll.detach().sum()
        return nlls, codes, sums

    def train_step(self, model, batch, device):
        nlls, codes, sums = self._forward(model, batch, device)
        positions = sum(c[0].numel() for c in codes)
        loss = torch.stack(nlls).sum(0).mean() / positions
        return loss, sums

    def val_step(self, model, batch, device):
        return self._forward(model, batch, device)[2]

    def epoch_images(self, model, device) -> dict:
        """``SAMPLED`` samples of the priors as they are now, decoded by stage 1's model (the
        same seed every epoch: the step slider shows the samples improve)."""
        if self.decoder is None:
            return {}
        from hvae.models.vqvae2 import draw
        from .images import SAMPLED, grid_array

        self.decoder.to(device).eval()
        images = draw(self.decoder, model, SAMPLED, 1.0, self.seed)[0]
        return {"samples": grid_array(images)}

    def summarize(self, split, sums):
        n = float(sums["count"])
        out, total_nats, total_pos = {}, 0.0, 0
        for l, (h, w) in enumerate(self.config["shapes"]):
            nats = float(sums[f"nll_level{l}"]) / n
            out[f"{split}_bits_per_code_level{l}"] = to_bits_per_dim(nats, h * w)
            out[f"{split}_nll_nats_level{l}"] = nats
            total_nats += nats
            total_pos += h * w
        out[f"{split}_loss"] = total_nats / total_pos
        out[f"{split}_bits_per_code"] = to_bits_per_dim(total_nats, total_pos)
        return out


def training_datasets(data, upstream: dict) -> dict:
    """The extracted codes, read on this (the driver's) node, whose folder holds them, and
    materialized: the trainer's workers then need no CPU for read tasks (a 2-CPU machine hangs
    otherwise)."""
    import ray.data

    codes_dir = upstream["extract"] / "codes"
    return {s: ray.data.read_parquet(str(codes_dir / s), **read_here()).materialize()
            for s in ("train", "val")}


def run(ctx: StageContext) -> StageResult:
    codes_dir = ctx.upstream["extract"] / "codes"
    schema = json.loads((codes_dir / SCHEMA_FILE).read_text())
    pcfg, cluster = ctx.config.priors, ctx.config.cluster
    config = prior_config(schema, pcfg)
    datasets = ctx.datasets or training_datasets(ctx.data, ctx.upstream)
    spec = LoopSpec(
        make_task=PriorTask,
        task_args=dict(config=config, batch_size=pcfg.batch_size, world_hint=cluster.num_workers, seed=pcfg.seed,
                       train_rows=schema["rows"]["train"], decoder=load_model(ctx.upstream["stage1"] / "model")[1]),
        model_config=config, epochs=pcfg.epochs, lr=pcfg.lr, seed=pcfg.seed, stage=ctx.name, report=ctx.report,
        train=ctx.config.train,
    )
    fitted = fit(spec, name=ctx.checkpoint_name, storage_path=ctx.storage_path, cluster=cluster, datasets=datasets,
                 callbacks=ctx.train_callbacks)
    model = HierarchicalPrior(**config)
    model.load_state_dict(fitted.weights)
    save_priors(model, config, ctx.output_dir / "model")
    metrics = dict(fitted.metrics)
    metrics["num_params"] = float(sum(p.numel() for p in model.parameters()))
    return StageResult(metrics=metrics, output_dir=ctx.output_dir,
                       tags=fitted.tags)
