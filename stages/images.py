"""What every image-training stage shares, whatever the model family: the image task (uint8
batches streamed from the prepared dataset, sharded over the workers by Ray Train), batch
iteration, the stage-1 training call and the reconstruction figure. Imports no torch until used.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .base import StageContext, TrainTask, worker_batch


def shuffle_window(batch_size: int) -> int:
    """Batches a training iterator shuffles together: a window of at least 1024 rows and 16
    batches (the prepared files are in a seeded random order already; this reorders them
    differently every epoch)."""
    return max(16, -(-1024 // batch_size))


SHOWN = 8  # validation images drawn over their reconstructions every epoch (epoch_images)
SAMPLED = 16  # samples drawn every epoch by a model that can sample (the same seed each epoch)


def grid_array(images, nrow: int = 8):
    """uint8 images [N, C, H, W] -> one uint8 H x W x 3 picture (numpy), ``nrow`` to a row,
    with grey lines between them: what ``log_image`` takes."""
    import torch
    from torchvision.utils import make_grid

    grid = make_grid(images.cpu().float() / 255.0, nrow=nrow, padding=2, pad_value=0.5)
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


class ImageTask(TrainTask):
    """A stage-1 task: batches of uint8 images [B, C, H, W] for ``build_model``'s model.

    A family subclasses it with the model, the loss of a batch and the epoch summary; the
    model config and the family's extra arguments (``Family.task``) arrive as keywords."""

    def __init__(self, model_config: dict, shape: tuple, train_rows: int, batch_size: int, world_hint: int,
                 seed: int, *, family: str, hold: bool = False, binarize_seed: int | None = None):
        self.model_config = model_config
        self.shape, self.train_rows = tuple(shape), train_rows
        self.batch_size = worker_batch("stage1.batch_size", batch_size, world_hint)
        self.seed = seed
        self.family = family
        self.hold = hold  # keep this worker's shards in memory after the first pass (DataSpec.held_by_workers)
        self.binarize_seed = binarize_seed  # data.binarize=dynamic: a fresh draw of each training image each epoch
        self.held: dict = {}  # split -> {"image": uint8 [n, C, H, W]}
        self.sources = None  # {"train"|"val": Ray Data dataset} to read instead of Ray Train's shards
        self.epoch = 0

    def build_model(self):
        from .families import get

        return get(self.family).build(self.model_config)

    def shard(self, split: str):
        """This worker's part of the split (Ray Train splits it equally over the workers)."""
        if self.sources is not None:
            return self.sources[split]
        import ray.train

        return ray.train.get_dataset_shard(split)

    def _held(self, split: str) -> dict:
        from . import shards

        if split not in self.held:
            self.held[split] = shards.whole(self.shard(split), ["image"])
        return self.held[split]

    def train_batches(self, epoch, rank, world):
        """This rank's batches, permuted by a generator seeded from (seed, epoch, rank): a held
        shard all at once; a streamed one in windows of ``shuffle_window`` batches fetched whole
        from Ray Data (one formatted Arrow batch per window instead of Ray's per-batch shuffle
        buffer: the training CPUs spend less on batch assembly). Every rank takes
        ceil(rows / batch) batches."""
        import torch

        from . import shards

        self.epoch = epoch
        gen = torch.Generator().manual_seed(self.seed * 1009 + epoch * 31 + rank)
        draw = self._binarizer(epoch, rank)
        if self.hold:
            for batch in shards.batches(self._held("train"), self.batch_size, gen, pin=_cuda()):
                yield draw(batch["image"])
            return
        window = shuffle_window(self.batch_size) * self.batch_size
        for chunk in self.shard("train").iter_torch_batches(batch_size=window, pin_memory=_cuda()):
            images = chunk["image"]
            yield from map(draw, images[torch.randperm(len(images), generator=gen)].split(self.batch_size))

    def _binarizer(self, epoch: int, rank: int):
        """data.binarize=dynamic: uint8 gray levels -> 0 or 255, each pixel 255 with probability
        pixel / 255, drawn afresh for every epoch and worker (its own generator: the draws do not
        depend on how the batches were shuffled); otherwise the images as they are."""
        import torch

        if self.binarize_seed is None:
            return lambda images: images
        gen = torch.Generator().manual_seed(((self.binarize_seed * 1_000_003 + epoch) * 1_009 + rank) % 2**63)

        def draw(images):
            u = torch.rand(images.shape, generator=gen)
            return torch.where(u < images.float() / 255.0, 255, 0).to(torch.uint8)

        return draw

    def val_batches(self, rank, world):
        """This rank's validation batches; the first images of the first one are kept for
        ``epoch_images``."""
        for i, batch in enumerate(self._val_batches(rank, world)):
            if i == 0:
                self._shown = batch[:SHOWN].cpu()
            yield batch

    def epoch_images(self, model, device) -> dict:
        """The first validation images (top row) over their reconstructions by the model as it is
        now (bottom row), as one uint8 H x W x 3 array: logged every epoch, the UI's step slider
        then shows how the reconstructions came about."""
        import torch

        x = getattr(self, "_shown", None)
        if x is None:
            return {}
        with torch.no_grad():
            recon = reconstructions(model, x.to(device))
        return {"reconstructions": grid_array(torch.cat([x, recon.cpu()]), nrow=len(x))}

    def _val_batches(self, rank, world):
        from . import shards

        if self.hold:
            for batch in shards.batches(self._held("val"), self.batch_size, pin=_cuda()):
                yield batch["image"]
            return
        for batch in self.shard("val").iter_torch_batches(batch_size=self.batch_size, pin_memory=_cuda()):
            yield batch["image"]

    def image_dims(self) -> int:
        """The dimensions the likelihood counts (bits/dim's denominator): the real pixels'."""
        region = self.model_config.get("likelihood_region")
        return int(self.shape[0] * region[2] * region[3]) if region else int(np.prod(self.shape))


def training_datasets(data, upstream: dict) -> dict:
    """Stage 1's datasets: the prepared splits, as ``DataSpec.for_training`` keeps them."""
    return {s: data.for_training(s) for s in ("train", "val")}


def train_stage1(ctx: StageContext, family, model_config: dict):
    """Fit the family's stage-1 task on the shared loop -> train_loop.Fitted."""
    from .train_loop import LoopSpec, fit

    cfg, s1, data = ctx.config, ctx.config.stage1, ctx.data
    task_cls, extra = family.task(cfg)
    spec = LoopSpec(
        make_task=task_cls,
        task_args=dict(model_config=model_config, shape=data.shape, train_rows=data.rows["train"],
                       batch_size=s1.batch_size, world_hint=cfg.cluster.num_workers, seed=s1.seed,
                       family=family.name, hold=data.held_by_workers("train") and data.held_by_workers("val"),
                       binarize_seed=cfg.data.binarize_seed if cfg.data.binarize == "dynamic" else None, **extra),
        model_config=model_config, epochs=s1.epochs, lr=s1.lr, weight_decay=s1.weight_decay,
        grad_clip=s1.grad_clip, seed=s1.seed, stage=ctx.name, report=ctx.report, train=cfg.train,
    )
    return fit(spec, name=ctx.checkpoint_name, storage_path=ctx.storage_path, cluster=cfg.cluster,
               datasets=ctx.datasets or training_datasets(data, ctx.upstream), callbacks=ctx.train_callbacks)


def squared_error(likelihood, params, x):
    """The summed per-image mean squared error of the reconstruction (the decoder's mean) on
    [0, 1] pixels: a tensor; ``sq_err`` in every family's sums, ``*_mse`` once divided by n."""
    mean = likelihood.mean(params.float()) / 255.0
    return ((mean - x.float() / 255.0) ** 2).flatten(1).mean(1).sum()


def quality(mse: float) -> dict[str, float]:
    """Test reconstruction MSE on [0, 1] pixels and its PSNR in dB."""
    return {"test_mse": mse, "test_psnr": 10 * math.log10(1.0 / max(mse, 1e-12))}


def _cuda() -> bool:
    """Batches bound for a GPU come through pinned memory (Ray Data then copies them to the
    training device without blocking)."""
    import torch

    return torch.cuda.is_available()


def reconstructions(model, x):
    """What a stage-1 model makes of the uint8 images ``x``, as uint8 images: its decoder's mean,
    or its own ``reconstruct`` (a decoder that reads the pixels it predicts, a PixelVAE's, would
    copy them: it draws from the latents instead)."""
    import torch

    own = getattr(model, "reconstruct", None)
    if own is not None:
        return own(x, torch.Generator().manual_seed(0))
    return model.likelihood.mean(model(x)["params"]).round().clamp(0, 255).to(torch.uint8)


def save_reconstructions(model, data, n_recon: int, folder: Path) -> None:
    """figures/reconstructions.png: the first ``n_recon`` validation images (odd rows; the split
    is in random order) over their reconstructions."""
    import torch
    from torchvision.utils import save_image

    folder.mkdir(parents=True, exist_ok=True)
    x = torch.from_numpy(data.read_all("val", limit=n_recon)["image"])
    with torch.no_grad():
        recon = reconstructions(model, x).float() / 255.0
    rows = []
    per_row = 8
    for i in range(0, len(x), per_row):  # originals over reconstructions, row by row
        rows += [x[i : i + per_row].float() / 255.0, recon[i : i + per_row]]
    save_image(torch.cat(rows), folder / "reconstructions.png", nrow=per_row, padding=2, pad_value=0.5)


def save_bars(panels: list[tuple[np.ndarray, str]], path: Path, xlabel: str, ylabel: str,
              color: str = "tab:blue", width: float = 8.0) -> None:
    """Bar charts stacked in one figure, one panel per (values, title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 2.2 * len(panels) + 0.6), squeeze=False)
    for ax, (values, title) in zip(axes[:, 0], panels):
        ax.bar(np.arange(len(values)), values, width=1.0 if len(values) > 32 else 0.8, color=color)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
