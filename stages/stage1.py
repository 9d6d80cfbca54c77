"""Stage 1: train the VQ-VAE-2 on Ray Train workers; leave the model and two figures.

Output folder:
    model/vqvae2.pt          state dict (torch.load(..., weights_only=True))
    model/config.json        the constructor arguments of models.vqvae2.VQVAE2
    figures/reconstructions.png   validation images (odd rows) over their reconstructions
    figures/codebook_usage.png    code usage on the validation split, one panel per level
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from models.vqvae2 import VQVAE2

from .base import StageContext, StageResult
from .train_loop import LoopSpec, TrainTask, final_state, fit, placement_tags

# the source this stage runs: part of its fingerprint
CODE = ["stages/stage1.py", "stages/stage1_nvae.py", "stages/train_loop.py", "stages/base.py", "models/vqvae2.py",
        "models/quantize.py", "models/nvae.py", "models/likelihoods.py", "pipeline/datasets.py"]
MODEL_FILE = "vqvae2.pt"
CONFIG_FILE = "config.json"


def model_config(stage_cfg, channels: int) -> dict:
    keys = ["levels", "hidden", "res_hidden", "res_blocks", "embed_dim", "codebook_size", "beta",
            "decay", "kmeans_init", "dead_code_threshold", "likelihood", "num_mixtures"]
    return {"in_channels": channels, **{k: getattr(stage_cfg, k) for k in keys}}


def load_model(model_dir: Path):
    """Rebuild the trained model (a VQVAE2, or an NVAE) from a stage-1 ``model/`` folder."""
    config = json.loads((Path(model_dir) / CONFIG_FILE).read_text())
    if config.pop("family", "vqvae2") == "nvae":
        from models.nvae import NVAE

        model, weights = NVAE(**config), "nvae.pt"
    else:
        model, weights = VQVAE2(**config), MODEL_FILE
    model.load_state_dict(torch.load(Path(model_dir) / weights, map_location="cpu", weights_only=True))
    return model.eval()


def iterate(images: np.ndarray, batch_size: int):
    for i in range(0, len(images), batch_size):
        yield torch.from_numpy(np.array(images[i : i + batch_size]))


class ImageTask(TrainTask):
    """Batches of uint8 images from the object store, sharded over the workers (both families)."""

    def __init__(self, model_config: dict, data_ref, batch_size: int, world_hint: int, seed: int):
        self.model_config = model_config
        self.data_ref = data_ref
        self.batch_size = max(1, math.ceil(batch_size / world_hint))  # global batch split over workers
        self.seed = seed
        self._data = None
        self.epoch, self.steps_per_epoch = 0, 1

    @property
    def data(self) -> dict:
        if self._data is None:
            import ray

            self._data = ray.get(self.data_ref)
        return self._data

    def train_batches(self, epoch, rank, world):
        images = self.data["train"]
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed * 1009 + epoch)).numpy()
        per_rank = len(order) // world  # equal shards: every rank takes the same number of steps
        mine = order[rank::world][:per_rank]
        self.epoch, self.steps_per_epoch = epoch, max(1, math.ceil(per_rank / self.batch_size))
        for i in range(0, per_rank, self.batch_size):
            yield torch.from_numpy(images[mine[i : i + self.batch_size]])  # fancy indexing copies

    def val_batches(self, rank, world):
        return iterate(self.data["val"][rank::world], self.batch_size)

    def _image_dims(self) -> int:
        return int(np.prod(self.data["train"].shape[1:]))


class VQTask(ImageTask):
    def build_model(self):
        return VQVAE2(**self.model_config)

    def _sums(self, out, x):
        return {"count": torch.tensor(float(x.shape[0])), "nll": out["nll"].sum(), "commit": out["commit"].sum()}

    def train_step(self, model, batch, device):
        x = batch.to(device)
        out = model(x)
        dims = x[0].numel()
        loss = (out["nll"] + out["commit"]).mean() / dims
        sums = self._sums(out, x)
        for l, st in enumerate(out["stats"]):
            sums[f"perplexity_level{l}"] = st["perplexity"] * x.shape[0]
        return loss, sums

    def val_step(self, model, batch, device):
        x = batch.to(device)
        out = model(x)
        sums = self._sums(out, x)
        for l, st in enumerate(out["stats"]):
            sums[f"usage_level{l}"] = st["usage"]
        return sums

    def summarize(self, split, sums):
        n = float(sums["count"])
        dims = self._image_dims()
        nll, commit = float(sums["nll"]) / n, float(sums["commit"]) / n
        out = {f"{split}_loss": (nll + commit) / dims, f"{split}_nll_nats": nll,
               f"{split}_bpd": nll / (dims * math.log(2)), f"{split}_commit": commit}
        for key, v in sums.items():
            if key.startswith("perplexity_level"):
                out[f"{split}_{key}"] = float(v) / n
            if key.startswith("usage_level"):
                p = v / v.sum().clamp(min=1)
                out[f"{split}_perplexity_level{key[-1]}"] = float(torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum()))
                out[f"{split}_dead_codes_level{key[-1]}"] = float((v == 0).sum())
        return out


# ---- figures ---------------------------------------------------------------------------

@torch.no_grad()
def save_reconstructions(model, val: np.ndarray, n_recon: int, folder: Path) -> None:
    """figures/reconstructions.png: validation images (odd rows) over their reconstructions."""
    from torchvision.utils import save_image

    folder.mkdir(parents=True, exist_ok=True)
    pick = np.unique(np.linspace(0, len(val) - 1, min(n_recon, len(val))).round().astype(int))
    x = torch.from_numpy(val[pick])  # spread over the split (it is stored in source order)
    recon = model.likelihood.mean(model(x)["params"]) / 255.0
    rows = []
    per_row = 8
    for i in range(0, len(x), per_row):  # originals over reconstructions, row by row
        rows += [x[i : i + per_row].float() / 255.0, recon[i : i + per_row]]
    save_image(torch.cat(rows), folder / "reconstructions.png", nrow=per_row, padding=2, pad_value=0.5)


@torch.no_grad()
def _figures(model: VQVAE2, val: np.ndarray, n_recon: int, folder: Path) -> dict[str, float]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    save_reconstructions(model, val, n_recon, folder)
    usage = [torch.zeros(k) for k in model.codebook_sizes]
    for batch in iterate(val, 256):
        for l, codes in enumerate(model.encode(batch)):
            usage[l] += torch.bincount(codes.flatten(), minlength=model.codebook_sizes[l]).float()
    fig, axes = plt.subplots(len(usage), 1, figsize=(8, 2.2 * len(usage)), squeeze=False)
    stats = {}
    for l, u in enumerate(usage):
        p = u / u.sum()
        perplexity = float(torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum()))
        used = int((u > 0).sum())
        stats[f"val_codes_used_level{l}"] = float(used)
        ax = axes[l, 0]
        ax.bar(np.arange(len(u)), u.numpy(), width=1.0, color="tab:blue")
        ax.set_title(f"level {l} ({'top' if l == 0 else 'bottom' if l == len(usage) - 1 else 'middle'}): "
                     f"{used}/{len(u)} codes used, perplexity {perplexity:.1f}", fontsize=9)
        ax.set_xlabel("code")
        ax.set_ylabel("count (val)")
    fig.tight_layout()
    fig.savefig(folder / "codebook_usage.png", dpi=100)
    plt.close(fig)
    return stats


# ---- entry point -----------------------------------------------------------------------

def run(ctx: StageContext) -> StageResult:
    if ctx.config.stage1.model == "nvae":
        from .stage1_nvae import run as run_nvae

        return run_nvae(ctx)

    s1 = ctx.config.stage1
    mc = model_config(s1, int(ctx.data["train"].images.shape[1]))
    result, state, meta, checkpoint = train(ctx, VQTask, mc)
    model_dir = ctx.output_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state["model"], model_dir / MODEL_FILE)
    (model_dir / CONFIG_FILE).write_text(json.dumps(mc, indent=2))
    model = load_model(model_dir)
    metrics = {k: float(v) for k, v in meta["metrics"].items()}
    metrics.update(_figures(model, ctx.data["val"].images, s1.recon_images, ctx.output_dir / "figures"))
    metrics["num_params"] = float(sum(p.numel() for p in model.parameters()))
    return StageResult(metrics=metrics, output_dir=ctx.output_dir,
                       tags={"hvae.checkpoint": checkpoint, **placement_tags(result)})


def train(ctx: StageContext, task_cls, mc: dict, **task_args):
    """Fit ``task_cls`` (an ImageTask) on the shared loop -> (result, state, meta, checkpoint path)."""
    import ray

    cfg, s1 = ctx.config, ctx.config.stage1
    data_ref = ray.put({"train": ctx.data["train"].images, "val": ctx.data["val"].images})
    spec = LoopSpec(
        make_task=task_cls,
        task_args=dict(model_config=mc, data_ref=data_ref, batch_size=s1.batch_size,
                       world_hint=cfg.cluster.num_workers, seed=s1.seed, **task_args),
        model_config=mc, epochs=s1.epochs, lr=s1.lr, weight_decay=s1.weight_decay,
        grad_clip=s1.grad_clip, seed=s1.seed, stage=ctx.name, report=ctx.report,
    )
    result = fit(spec, name=ctx.checkpoint_name, storage_path=ctx.storage_path,
                 num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                 cpus_per_worker=cfg.cluster.cpus_per_worker, max_failures=cfg.cluster.max_failures,
                 placement_strategy=cfg.cluster.placement_strategy, callbacks=ctx.train_callbacks)
    return (result, *final_state(result, ctx.storage_path, ctx.checkpoint_name))
