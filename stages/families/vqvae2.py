"""The VQ-VAE family: VQ-VAE-2 (two code maps), the single-level VQ-VAE and the three-map
variant (``vqvae2.levels``), each followed by gated PixelCNN priors over its codes.

Stages: stage1 (the autoencoder) -> extract (codes to Parquet) -> priors -> sample -> evaluate.
Test NLL: the upper bound of a one-hot posterior,
    -log p(x) <= -log p(x | z_q(x)) - sum_l log p_prior(z_l | z_{l-1}).
"""
from __future__ import annotations

from pathlib import Path

from hvae.settings.families import VQVAE2Config
from hvae.stages.families import IMAGE_NATS, Family, add_up
from hvae.stages.images import ImageTask, quality, save_bars, save_reconstructions, squared_error


class VQTask(ImageTask):
    """Loss per image: -log p(x | z_q(x)) + beta * ||z - sg[e]||^2, over the pixel dimensions."""
    # the kept epoch is the one that reconstructs best: the commitment term grows with the
    # encoder's scale as the codes start to carry information and is no part of the NLL bound
    select_metric = "val_nll_nats"

    def _sums(self, out, x):
        import torch

        sums = {"count": torch.tensor(float(x.shape[0])), "nll": out["nll"].sum(), "commit": out["commit"].sum()}
        for l, st in enumerate(out["stats"]):
            sums[f"quant_err_level{l}"], sums[f"z_sq_level{l}"] = st["quant_err"], st["z_sq"]
        return sums

    def train_step(self, model, batch, device):
        x = batch.to(device, non_blocking=True)  # (pinned when bound for a GPU)
        out = model(x)
        loss = (out["nll"] + out["commit"]).mean() / x[0].numel()
        sums = self._sums(out, x)
        for l, st in enumerate(out["stats"]):
            sums[f"perplexity_level{l}"] = st["perplexity"] * x.shape[0]
        return loss, sums

    def val_step(self, model, batch, device):
        x = batch.to(device, non_blocking=True)  # (pinned when bound for a GPU)
        out = model(x)
        sums = self._sums(out, x)
        for l, st in enumerate(out["stats"]):
            sums[f"usage_level{l}"] = st["usage"]
        sums["sq_err"] = squared_error(getattr(model, "module", model).likelihood, out["params"], x)
        return sums

    def summarize(self, split, sums):
        from hvae.models.likelihoods import to_bits_per_dim
        from hvae.models.quantize import perplexity

        n, dims = float(sums["count"]), self.image_dims()
        nll, commit = float(sums["nll"]) / n, float(sums["commit"]) / n
        out = {f"{split}_loss": (nll + commit) / dims, f"{split}_nll_nats": nll,
               f"{split}_bpd": to_bits_per_dim(nll, dims), f"{split}_commit": commit}
        for key, v in sums.items():
            if key.startswith("perplexity_level"):  # training: the mean of the per-step perplexities
                out[f"{split}_{key}"] = float(v) / n
            if key.startswith("usage_level"):  # validation: the perplexity of the epoch's code counts
                out[f"{split}_perplexity_level{key[-1]}"] = float(perplexity(v))
                out[f"{split}_dead_codes_level{key[-1]}"] = float((v == 0).sum())
            if key.startswith("quant_err_level"):  # ||z - e||^2 / ||z||^2: the codebook's fit, scale-free
                out[f"{split}_rel_quant_err_level{key[-1]}"] = float(v) / max(float(sums[f"z_sq_level{key[-1]}"]), 1e-12)
        if "sq_err" in sums:
            out[f"{split}_mse"] = float(sums["sq_err"]) / n  # of the reconstruction (the decoder's mean), [0, 1] pixels
        return out


def nll_sums(vq, priors, x, y) -> dict:
    """One test batch (uint8 images [B, C, H, W], labels [B]) -> its sums: nats of the
    reconstruction and of each prior level, squared error on [0, 1] pixels, code usage, and every
    image's bound (``IMAGE_NATS``)."""
    import torch

    with torch.no_grad():
        out = vq(x)
        sums = {"count": float(len(x)), "recon": float(out["nll"].sum())}
        labels = y.long() if priors.levels[0].num_classes > 0 else None
        image = out["nll"].double()
        for l, nll in enumerate(priors(out["codes"], labels)):
            sums[f"prior{l}"] = float(nll.sum())
            image = image + nll.double()
        sums[IMAGE_NATS] = image.cpu().numpy()
        if labels is not None:  # the bound is then one on -log p(x | y)
            sums["conditional"] = float(len(x))
        sums["sq_err"] = float(squared_error(vq.likelihood, out["params"], x))
        for l, c in enumerate(out["codes"]):
            sums[f"usage{l}"] = torch.bincount(c.flatten(), minlength=vq.codebook_sizes[l]).double().cpu().numpy()
    return sums


def nll_summary(sums: dict, dims: int) -> dict[str, float]:
    """The test metrics from the sums of every batch."""
    import torch

    from hvae.models.likelihoods import to_bits_per_dim
    from hvae.models.quantize import perplexity

    n, recon = float(sums["count"]), float(sums["recon"])
    levels = sorted(int(k[len("prior"):]) for k in sums if k.startswith("prior"))
    prior = sum(float(sums[f"prior{l}"]) for l in levels)
    metrics = {
        "test_nll_nats": (recon + prior) / n, "test_nll_bpd": to_bits_per_dim((recon + prior) / n, dims),
        "test_recon_nats": recon / n, "test_recon_bpd": to_bits_per_dim(recon / n, dims),
        "test_prior_nats": prior / n, "test_prior_bpd": to_bits_per_dim(prior / n, dims),
        **quality(float(sums["sq_err"]) / n), "test_images": n,
        "test_class_conditional": float(sums.get("conditional", 0.0) > 0),
    }
    for l in levels:
        metrics[f"test_perplexity_level{l}"] = float(perplexity(torch.as_tensor(sums[f"usage{l}"])))
        metrics[f"test_prior_nats_level{l}"] = float(sums[f"prior{l}"]) / n
    return metrics


def nll_bound(vq, priors, images, labels, batch_size: int) -> dict[str, float]:
    """Test metrics of a stage-1 model and its priors on uint8 images [N, C, H, W], in this process."""
    import numpy as np
    import torch

    total: dict = {}
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))
        add_up(total, nll_sums(vq, priors, x, torch.from_numpy(labels[i : i + batch_size])))
    return nll_summary(total, int(np.prod(images.shape[1:])))


def _score(x, y, first_index, *, vq, priors) -> dict:
    return nll_sums(vq, priors, x, y)


def _draw(first, count, *, vq, priors, temperature, seed, pixels, cached=True):
    from . import chunk_seed

    from hvae.models.vqvae2 import draw

    images, codes, labels = draw(vq, priors, count, temperature, chunk_seed(seed, first), pixels=pixels, first=first,
                                 cached=cached)
    return images.cpu(), [c.cpu() for c in codes], None if labels is None else labels.cpu()


class VQVAE2Family(Family):
    title = "VQ-VAE / VQ-VAE-2 with gated PixelCNN priors"
    Config = VQVAE2Config
    figures_note = "reconstructions.png (validation images over their reconstructions), codebook_usage.png"

    def model_config(self, cfg, channels):
        v = cfg.vqvae2
        return {"in_channels": channels, **v.model_dump(exclude={"downsample"}), "downsample": v.factors(),
                "likelihood": cfg.stage1.likelihood, "num_mixtures": cfg.stage1.num_mixtures,
                "coeff_warmup_steps": cfg.stage1.coeff_warmup(channels)}

    def build(self, model_config):
        from hvae.models.vqvae2 import VQVAE2

        return VQVAE2(**model_config)

    def param_counts(self, cfg, channels, num_classes):
        import torch

        from hvae.models.pixelcnn import HierarchicalPrior
        from hvae.stages.priors import prior_config

        from . import count_params

        counts = super().param_counts(cfg, channels, num_classes)
        with torch.device("meta"):
            vq = self.build(self.model_config(cfg, channels))
            schema = {"codebook_sizes": vq.codebook_sizes, "shapes": [list(s) for s in vq.map_shapes(cfg.data.image_size)],
                      "num_classes": num_classes}
            priors = HierarchicalPrior(**prior_config(schema, cfg.priors))
        for l, level in enumerate(priors.levels):
            h, w = schema["shapes"][l]
            counts[f"priors level {l} ({h}x{w} codes)"] = count_params(level)
        return counts

    def describe(self, model):
        sizes = "/".join(map(str, model.codebook_sizes))
        base = {1: "VQ-VAE", 2: "VQ-VAE-2"}.get(model.levels, f"VQ-VAE-2 ({model.levels} levels)")
        plural = "s" if model.levels > 1 else ""
        return f"{base} (K={sizes}) + gated PixelCNN priors", f"{model.levels} level{plural}, K={sizes}"

    def task(self, cfg):
        return VQTask, {}

    def figures(self, model, data, cfg, folder: Path, val_sums: dict):
        import torch

        from hvae.models.quantize import perplexity

        save_reconstructions(model, data, cfg.stage1.recon_images, folder)
        # the code counts of the last validation pass, summed over the training workers
        usage = [torch.tensor(val_sums[f"usage_level{l}"], dtype=torch.float64) for l in range(model.levels)]
        panels, stats = [], {}
        for l, u in enumerate(usage):
            used = int((u > 0).sum())
            stats[f"val_codes_used_level{l}"] = float(used)
            where = "top" if l == 0 else "bottom" if l == len(usage) - 1 else "middle"
            panels.append((u.numpy(), f"level {l} ({where}): {used}/{len(u)} codes used, "
                                      f"perplexity {float(perplexity(u)):.1f}"))
        save_bars(panels, folder / "codebook_usage.png", xlabel="code", ylabel="count (val)")
        return stats

    def sampler(self, model, upstream, scfg):
        from hvae.stages.priors import load_priors

        from . import OnDevice

        priors = load_priors(upstream["priors"] / "model")
        return OnDevice(_draw, {"vq": model, "priors": priors}, temperature=scfg.temperature, seed=scfg.seed,
                        pixels=scfg.pixels, cached=scfg.cached)

    def scorer(self, model, upstream, ecfg):
        from hvae.stages.priors import load_priors

        from . import OnDevice

        return OnDevice(_score, {"vq": model, "priors": load_priors(upstream["priors"] / "model")})

    def summary(self, sums, dims, ecfg):
        return nll_summary(sums, dims)


FAMILY = VQVAE2Family()
