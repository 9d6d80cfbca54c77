"""The reported NLL against the exact one, on models small enough to sum over every latent.

VQ families report -log p(x|z*) - log p(z*) at the code map z* the encoder picks, an upper
bound on -log p(x) = -log sum_z p(z) p(x|z); the gap is exactly -log p(z*|x). VAE families
report the importance-weighted estimate, which approaches -log p(x) from above as K grows.
Both exact values come from enumerating (or integrating over) every latent of a tiny model.
"""
import itertools
import math

import torch

from hvae.stages.priors import prior_args
from hvae.stages.families import model_args
from hvae.models.nvae import NVAE
from hvae.models.pixelcnn import HierarchicalPrior
from hvae.models.vqvae2 import VQVAE2


def _vq_models():
    """Binary 4x4 images; a 1x1 top map of 3 codes over a 2x2 bottom map of 2 codes: 3 x 2^4 = 48
    code maps. Random weights: the bound holds for any model, trained or not."""
    torch.manual_seed(0)
    vq = VQVAE2(**model_args("vqvae2", in_channels=1, levels=2, hidden=8, res_hidden=4, res_blocks=1, embed_dim=4, codebook_size=[3, 2],
                likelihood="bernoulli", downsample=[2, 2], sync_codebooks=False)).eval()
    priors = HierarchicalPrior(**prior_args([3, 2], [[1, 1], [2, 2]], hidden=8, layers=2, kernel=3)).eval()
    with torch.no_grad():
        for p in list(vq.parameters()) + list(priors.parameters()):
            p.add_(0.5 * torch.randn_like(p))  # (away from the initialisation's near-uniform outputs)
    return vq, priors


def reported_vq_nll(vq, priors, x) -> torch.Tensor:
    """What the evaluate stage adds up per image (stages/families/vqvae2.py: nll_sums)."""
    out = vq(x)
    return out["nll"] + sum(priors(out["codes"]))


def test_the_vq_bound_is_above_the_exact_nll_by_minus_log_the_posterior_of_its_code_map():
    vq, priors = _vq_models()
    maps = [(torch.tensor([[[t]]]), torch.tensor([b]).reshape(1, 2, 2))
            for t in range(3) for b in itertools.product(range(2), repeat=4)]
    top = torch.cat([t for t, _ in maps])
    bottom = torch.cat([b for _, b in maps])
    with torch.no_grad():
        log_prior = -sum(priors([top, bottom]))  # [48]
        params = vq.decode_codes([top, bottom])  # [48, 1, 4, 4]
        # the priors are one distribution over all 48 maps
        assert abs(torch.logsumexp(log_prior.double(), 0).item()) < 1e-5
        g = torch.Generator().manual_seed(1)
        x = (torch.rand(16, 1, 4, 4, generator=g) < 0.5).to(torch.uint8) * 255
        reported = reported_vq_nll(vq, priors, x)
        codes = vq(x)["codes"]
        for i in range(len(x)):
            log_joint = log_prior + vq.likelihood.log_prob(params, x[i : i + 1].expand(len(maps), -1, -1, -1))
            exact = -torch.logsumexp(log_joint.double(), 0)
            chosen = [j for j, (t, b) in enumerate(maps) if t.equal(codes[0][i : i + 1])
                      and b.equal(codes[1][i : i + 1])]
            assert len(chosen) == 1
            assert reported[i] >= exact - 1e-4, (i, float(reported[i]), float(exact))
            # bound - exact = -log p(z* | x): the bound is tight exactly when the posterior is one-hot
            gap = -(log_joint[chosen[0]].double() - torch.logsumexp(log_joint.double(), 0))
            assert abs((reported[i] - exact).item() - gap.item()) < 1e-4


def _vae():
    """The plain Gaussian VAE on binary 2x2 images with one latent number: p(x) is a 1-D integral."""
    torch.manual_seed(0)
    model = NVAE(**model_args("nvae", in_channels=1, image_size=2, hidden=8, latent_channels=1, scales=1, groups_per_scale=1,
                 residual_posterior=False, likelihood="bernoulli"))
    images = torch.tensor(list(itertools.product((0, 255), repeat=4)), dtype=torch.uint8).reshape(16, 1, 2, 2)
    # trained on two images, all black and all white: the decoder must read z to tell them apart,
    # so the posterior is far narrower than the prior and one sample is a poor estimate
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = images[[0, 15]].repeat(8, 1, 1, 1)
    for _ in range(150):
        out = model(data)
        opt.zero_grad()
        (out["nll"] + out["kl"].sum(0)).mean().backward()
        opt.step()
    with torch.no_grad():  # batch norm's running statistics: those of the training batch, exactly
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        model(data)
    return model.eval(), images


def _iw_nll(model, images, k: int, repeats: int, generator) -> torch.Tensor:
    """-log (1/K) sum_k w_k, [repeats, images]: every draw made in one batch (model.log_weights
    makes the K draws one after another)."""
    with torch.no_grad():
        out = model(images.repeat(repeats * k, 1, 1, 1), generator=generator)
    w = (-out["nll"] + out["log_p"] - out["log_q"]).reshape(repeats, k, len(images))
    return -(torch.logsumexp(w.double(), 1) - math.log(k))


def exact_vae_nll(model, images) -> torch.Tensor:
    """-log p(x) = -log of the integral of N(z; 0, 1) p(x|z) dz, by the midpoint rule on [-12, 12]."""
    n, lo, hi = 24_001, -12.0, 12.0
    dz = (hi - lo) / n
    z = (lo + dz * (torch.arange(n, dtype=torch.float64) + 0.5)).float()
    with torch.no_grad():
        out = []
        for chunk in z.split(4_000):
            h, _ = model._top_down(len(chunk), None, top=chunk.reshape(-1, 1, 1, 1))
            out.append(model.post(h))
        params = torch.cat(out)
        log_prior = -0.5 * z.double() ** 2 - 0.5 * math.log(2 * math.pi)
        rows = [log_prior + model.likelihood.log_prob(params, x[None].expand(n, -1, -1, -1)).double()
                for x in images]
    return -(torch.logsumexp(torch.stack(rows), 1) + math.log(dz))


def test_the_importance_weighted_estimate_approaches_the_exact_nll_as_k_grows():
    model, images = _vae()
    exact = exact_vae_nll(model, images)
    assert abs(torch.logsumexp(-exact, 0).item()) < 1e-6  # the 16 images' probabilities sum to 1
    seen = [0, 15]  # the images it was trained on (where q(z|x) is near the posterior)
    g = torch.Generator().manual_seed(2)
    gap, se = {}, {}
    for k, repeats in ((1, 512), (10, 256), (100, 64), (1000, 32), (10000, 16)):  # (the estimate is noisy: repeat it)
        rows = (_iw_nll(model, images[seen], k, repeats, g) - exact[seen]).mean(1)
        gap[k], se[k] = rows.mean().item(), rows.std().item() / math.sqrt(repeats)
    # from above, tighter with K: a real gap at K=1, none left at K=10^4 within its error
    assert gap[1] - 3 * se[1] > 0.05, (gap, se)
    assert gap[1] > gap[10] > gap[10000] and gap[1] - gap[100] > 3 * (se[1] + se[100]), (gap, se)
    assert abs(gap[10000]) < max(3 * se[10000], 0.01) and se[10000] < 0.01, (gap, se)
