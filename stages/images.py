"""What every image-training stage shares, whatever the model family: the image task (uint8
batches from the object store, sharded over the workers), batch iteration, the stage-1
training call and the reconstruction figure. Imports no torch until used.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .base import StageContext, TrainTask


def iterate(images: np.ndarray, batch_size: int):
    """uint8 batches of ``images`` in order, as torch tensors."""
    import torch

    for i in range(0, len(images), batch_size):
        yield torch.from_numpy(np.array(images[i : i + batch_size]))


class ImageTask(TrainTask):
    """A stage-1 task: batches of uint8 images [B, C, H, W] for ``build_model``'s model.

    A family subclasses it with the model, the loss of a batch and the epoch summary; the
    model config and the family's extra arguments (``Family.task``) arrive as keywords."""

    def __init__(self, model_config: dict, data_ref, batch_size: int, world_hint: int, seed: int, family: str):
        self.model_config = model_config
        self.data_ref = data_ref
        self.batch_size = max(1, math.ceil(batch_size / world_hint))  # global batch split over workers
        self.seed = seed
        self.family = family
        self._data = None
        self.epoch, self.steps_per_epoch = 0, 1

    def build_model(self):
        from .families import get

        return get(self.family).build(self.model_config)

    @property
    def data(self) -> dict:
        if self._data is None:
            import ray

            self._data = ray.get(self.data_ref)
        return self._data

    def train_batches(self, epoch, rank, world):
        import torch

        images = self.data["train"]
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed * 1009 + epoch)).numpy()
        per_rank = len(order) // world  # equal shards: every rank takes the same number of steps
        mine = order[rank::world][:per_rank]
        self.epoch, self.steps_per_epoch = epoch, max(1, math.ceil(per_rank / self.batch_size))
        for i in range(0, per_rank, self.batch_size):
            yield torch.from_numpy(images[mine[i : i + self.batch_size]])  # fancy indexing copies

    def val_batches(self, rank, world):
        return iterate(self.data["val"][rank::world], self.batch_size)

    def image_dims(self) -> int:
        return int(np.prod(self.data["train"].shape[1:]))


def train_stage1(ctx: StageContext, family, model_config: dict):
    """Fit the family's stage-1 task on the shared loop -> train_loop.Fitted."""
    import ray

    from .train_loop import LoopSpec, fit

    cfg, s1 = ctx.config, ctx.config.stage1
    task_cls, extra = family.task(cfg)
    data_ref = ray.put({"train": ctx.data["train"].images, "val": ctx.data["val"].images})
    spec = LoopSpec(
        make_task=task_cls,
        task_args=dict(model_config=model_config, data_ref=data_ref, batch_size=s1.batch_size,
                       world_hint=cfg.cluster.num_workers, seed=s1.seed, family=family.name, **extra),
        model_config=model_config, epochs=s1.epochs, lr=s1.lr, weight_decay=s1.weight_decay,
        grad_clip=s1.grad_clip, seed=s1.seed, stage=ctx.name, report=ctx.report,
    )
    return fit(spec, name=ctx.checkpoint_name, storage_path=ctx.storage_path, cluster=cfg.cluster,
               callbacks=ctx.train_callbacks)


def quality(mse: float) -> dict[str, float]:
    """Test reconstruction MSE on [0, 1] pixels and its PSNR in dB."""
    return {"test_mse": mse, "test_psnr": 10 * math.log10(1.0 / max(mse, 1e-12))}


def save_reconstructions(model, val: np.ndarray, n_recon: int, folder: Path) -> None:
    """figures/reconstructions.png: validation images (odd rows) over their reconstructions."""
    import torch
    from torchvision.utils import save_image

    folder.mkdir(parents=True, exist_ok=True)
    pick = np.unique(np.linspace(0, len(val) - 1, min(n_recon, len(val))).round().astype(int))
    x = torch.from_numpy(val[pick])  # spread over the split
    with torch.no_grad():
        recon = model.likelihood.mean(model(x)["params"]) / 255.0
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
