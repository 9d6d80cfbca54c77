"""Likelihoods: normalised over all 8-bit values; Bernoulli equals binary cross-entropy."""
import math

import pytest
import torch
import torch.nn.functional as F

from hvae.stages.families import model_args
from hvae.models.likelihoods import Bernoulli, DiscretizedLogistic, to_bits_per_dim


@pytest.mark.parametrize("mixtures,scale", [(1, 0.0), (3, 1.0), (5, 3.0)])
def test_discretized_logistic_sums_to_one_grayscale(mixtures, scale):
    torch.manual_seed(mixtures)
    lik = DiscretizedLogistic(1, mixtures)
    params = torch.randn(1, lik.num_params(), 2, 3) * 2
    params[:, mixtures * 2 :] = scale * torch.randn_like(params[:, mixtures * 2 :]) - 2.0  # log-scales, narrow to wide
    values = torch.arange(256, dtype=torch.uint8)
    # every pixel of the 2x3 image takes value v: log p is a sum over the 6 independent pixels,
    # so test one pixel at a time by evaluating a 1x1 slice
    for i in range(2):
        for j in range(3):
            p = params[:, :, i : i + 1, j : j + 1].expand(256, -1, -1, -1)
            lp = lik.log_prob(p, values.view(256, 1, 1, 1))
            assert float(lp.exp().sum()) == pytest.approx(1.0, abs=1e-5)


def test_the_256_bins_sum_to_one_at_extreme_means_and_scales():
    """Means at and far beyond the pixel range's edges, scales from the clamp's narrowest to
    far wider than the range: every pixel's 256 bin masses sum to 1 within 1e-5."""
    lik = DiscretizedLogistic(1, 1)
    means, log_scales = torch.tensor([-3.0, -1.0, -0.2, 0.0, 1.0, 3.0]), torch.tensor([-7.0, -3.0, 0.0, 5.0])
    m, s = torch.meshgrid(means, log_scales, indexing="ij")
    params = torch.stack([torch.zeros_like(m), m, s]).reshape(1, 3, 1, -1)  # (logit, mean, log-scale) per pixel
    values = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1).expand(-1, -1, -1, m.numel())
    masses = torch.stack([lik.log_prob(params[..., j : j + 1].expand(256, -1, -1, -1), values[..., j : j + 1])
                          for j in range(m.numel())]).double().exp()  # [pixels, 256]
    assert (masses.sum(1) - 1.0).abs().max().item() < 1e-5


def test_discretized_logistic_sums_to_one_rgb_with_channel_coefficients():
    torch.manual_seed(0)
    lik = DiscretizedLogistic(3, 2)
    params = torch.randn(1, lik.num_params(), 1, 1)
    grid = torch.cartesian_prod(*(torch.arange(256),) * 3).to(torch.uint8)  # all 256^3 colours
    total = 0.0
    for chunk in grid.split(1 << 20):
        x = chunk.view(-1, 3, 1, 1)
        total += float(lik.log_prob(params.expand(len(x), -1, -1, -1), x).double().exp().sum())
    assert total == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("log_scale", [-7.0, -4.0, 0.0, 4.0, 9.0])
def test_discretized_logistic_bin_masses_are_exact_in_the_tails(log_scale):
    """Every value's log mass against the CDF difference computed in float64, from the mode out
    to 30 scales away, and for scales from 1/1100 of the range to thousands of times it: float32
    stays within 1e-4 nats (the older form fell back to the density where the mass underflowed)."""
    lik = DiscretizedLogistic(1, 1)
    values = torch.arange(256, dtype=torch.uint8)
    for mean in (-1.0, -0.3, 0.0, 0.9):
        params = torch.tensor([0.0, mean, log_scale]).view(1, 3, 1, 1).expand(256, -1, -1, -1)
        got = lik.log_prob(params.float(), values.view(256, 1, 1, 1)).double()
        x = values.double() / 127.5 - 1
        s = math.exp(log_scale)
        # log(sigmoid(a) - sigmoid(b)) = log sigmoid(a) + log(1 - exp(log sigmoid(b) - log sigmoid(a))), in float64
        a = torch.where(values == 255, torch.full((256,), math.inf, dtype=torch.double), (x + 1 / 255 - mean) / s)
        b = torch.where(values == 0, torch.full((256,), -math.inf, dtype=torch.double), (x - 1 / 255 - mean) / s)
        want = F.logsigmoid(a) + torch.log(-torch.expm1(F.logsigmoid(b) - F.logsigmoid(a)))
        near = (x - mean).abs() / s < 30  # (beyond 30 scales float32 itself runs out)
        assert torch.allclose(got[near], want[near], atol=1e-4, rtol=1e-5), (mean, (got - want)[near].abs().max())


def test_discretized_logistic_prefers_values_near_the_mean():
    lik = DiscretizedLogistic(1, 1)
    params = torch.tensor([0.0, 0.0, -4.0]).view(1, 3, 1, 1)  # mean 0 (value 127.5), small scale
    lp = lik.log_prob(params.expand(3, -1, -1, -1), torch.tensor([0, 127, 255], dtype=torch.uint8).view(3, 1, 1, 1))
    assert lp[1] > lp[0] and lp[1] > lp[2]
    assert float(lik.mean(params)) == pytest.approx(127.5)


def test_bernoulli_matches_binary_cross_entropy():
    torch.manual_seed(0)
    lik = Bernoulli(1)
    logits = torch.randn(4, 1, 5, 5)
    x = torch.randint(0, 256, (4, 1, 5, 5), dtype=torch.uint8)
    target = (x > 127).float()
    expected = -F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1)
    assert torch.allclose(lik.log_prob(logits, x), expected)


def test_samples_lie_on_the_pixel_grid():
    lik = DiscretizedLogistic(3, 4)
    s = lik.sample(torch.randn(2, lik.num_params(), 4, 4), torch.Generator().manual_seed(0))
    assert s.dtype == torch.uint8 and s.shape == (2, 3, 4, 4)


def test_bits_per_dim():
    assert float(to_bits_per_dim(torch.tensor(1024 * math.log(2.0)), 1024)) == pytest.approx(1.0)


def test_the_channel_coefficients_wait_for_the_warmup_steps_and_the_count_is_saved():
    from hvae.models.vqvae2 import VQVAE2

    torch.manual_seed(0)
    kw = dict(in_channels=3, levels=1, hidden=8, res_hidden=4, res_blocks=1, embed_dim=4, codebook_size=8,
              num_mixtures=2, coeff_warmup_steps=2)
    model = VQVAE2(**model_args("vqvae2", **kw)).train()
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    gates = []
    for _ in range(3):
        model(x)
        gates.append(model.likelihood.coeff_gate)
    assert gates == [0.0, 0.0, 1.0]
    # with the gate at 0 the likelihood is that of coefficients of 0
    lik = model.likelihood
    params = torch.randn(2, lik.num_params(), 4, 4)
    lik.coeff_gate = 0.0
    off = lik.log_prob(params, x[:, :, :4, :4])
    k, c = lik.num_mixtures, lik.channels
    zeroed = params.clone()
    zeroed[:, k + 2 * k * c:] = 0.0  # tanh(0) = 0
    lik.coeff_gate = 1.0
    torch.testing.assert_close(off, lik.log_prob(zeroed, x[:, :, :4, :4]))
    assert not torch.allclose(off, lik.log_prob(params, x[:, :, :4, :4]))
    # a model rebuilt from the state dict goes on where it was; a fresh one starts with them off
    again = VQVAE2(**model_args("vqvae2", **kw))
    assert again.likelihood.coeff_gate == 0.0
    again.load_state_dict(model.state_dict())
    assert again.likelihood.coeff_gate == 1.0 and again.coeff_warmup.done == 3
    assert VQVAE2(**model_args("vqvae2", **{**kw, "coeff_warmup_steps": 0})).likelihood.coeff_gate == 1.0
