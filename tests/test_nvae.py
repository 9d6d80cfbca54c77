"""NVAE model checks: the residual-normal KL, the importance-weighted bound, temperature sampling."""
import math

import pytest
import torch

from hvae.stages.families import model_args
from hvae.models.nvae import NVAE, IAFCell, iw_bound, kl_balance, normal_log_prob, residual_normal_kl


def test_residual_normal_kl_is_the_closed_form_and_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu_p, log_sigma_p, d_mu, d_log_sigma = (torch.randn(4, 64, generator=g) * 0.5).unbind(0)
    kl = residual_normal_kl(d_mu, d_log_sigma, log_sigma_p)
    # the notes: 1/2 sum (d_mu^2 / sigma_p^2 + d_sigma^2 - log d_sigma^2 - 1)
    sigma_p, d_sigma = log_sigma_p.exp(), d_log_sigma.exp()
    closed = 0.5 * (d_mu ** 2 / sigma_p ** 2 + d_sigma ** 2 - torch.log(d_sigma ** 2) - 1)
    torch.testing.assert_close(kl, closed)
    # and a Monte-Carlo estimate E_q[log q - log p] with q = N(mu_p + d_mu, sigma_p d_sigma)
    mu_q, log_sigma_q = mu_p + d_mu, log_sigma_p + d_log_sigma
    z = mu_q + log_sigma_q.exp() * torch.randn(200_000, 64, generator=g)
    mc = (normal_log_prob(z, mu_q, log_sigma_q) - normal_log_prob(z, mu_p, log_sigma_p)).mean(0)
    torch.testing.assert_close(mc, kl, atol=0.02, rtol=0.02)


@pytest.fixture(scope="module")
def trained_batch():
    torch.manual_seed(0)
    model = NVAE(**model_args("nvae", hidden=16, latent_channels=4, scales=2, groups_per_scale=2))
    x = torch.randint(0, 256, (16, 1, 32, 32), dtype=torch.uint8)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(5):  # a few steps: posterior and prior no longer coincide
        out = model(x)
        opt.zero_grad()
        (out["nll"] + out["kl"].sum(0)).mean().backward()
        opt.step()
    return model.eval(), x


def test_iw_bound_with_one_sample_is_the_elbo_and_grows_with_k(trained_batch):
    model, x = trained_batch
    # K = 1: exactly the single-sample ELBO log p(x|z) + log p(z) - log q(z|x) of the same draw
    w1 = model.log_weights(x, 1, generator=torch.Generator().manual_seed(3))
    out = model(x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(iw_bound(w1), -out["nll"] + out["log_p"] - out["log_q"])
    # the analytic ELBO (closed-form KL) is the expectation of that estimate
    elbo = -(out["nll"] + out["kl"].sum(0))
    w = model.log_weights(x, 64, generator=torch.Generator().manual_seed(4))
    assert (iw_bound(w) >= w.mean(0)).all()  # Jensen, draw by draw
    assert iw_bound(w).mean() > elbo.mean()
    # in expectation the bound tightens with K: average over repeats
    g = torch.Generator().manual_seed(5)
    means = [torch.stack([iw_bound(model.log_weights(x, k, generator=g)).mean() for _ in range(4)]).mean()
             for k in (1, 4, 16)]
    assert means[0] < means[1] < means[2], means


def test_temperature_zero_is_deterministic_given_the_top_latent(trained_batch):
    model, _ = trained_batch
    top = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a = model.sample(3, temperature=0.0, top=top, generator=torch.Generator().manual_seed(1))
    b = model.sample(3, temperature=0.0, top=top, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == (3, 1, 32, 32)
    c = model.sample(3, temperature=1.0, top=top, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, c)


def test_plain_vae_is_one_group_with_a_standard_normal_prior():
    model = NVAE(**model_args("nvae", hidden=16, latent_channels=4, scales=1, groups_per_scale=1, residual_posterior=False))
    x = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    out = model(x)
    assert out["kl"].shape == (1, 4) and model.group_sizes() == [4 * 16 * 16]
    z = torch.zeros(2, 4, 16, 16)
    assert model.sample(2, temperature=0.0, top=z).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="plain VAE"):
        NVAE(**model_args("nvae", scales=2, residual_posterior=False))


def test_kl_balancing_keeps_the_total_once_warm_and_reweights_groups_before():
    kl = torch.tensor([[4.0, 4.0], [0.1, 0.1]])
    assert torch.equal(kl_balance(kl, [10, 10], beta=1.0), kl.sum(0))
    warm = kl_balance(kl, [10, 10], beta=0.5)
    assert torch.all(warm < kl.sum(0))  # warm-up scales it down
    assert math.isfinite(float(warm.sum()))


def test_kl_balancing_weights_groups_by_kl_per_dimension_not_by_size():
    # two groups of different size with the same KL per dimension get the same coefficient;
    # the coefficients are constants (detached): d loss / d KL_g = beta * gamma_g
    sizes = [16, 64]
    kl = torch.tensor([[0.5 * 16, 0.3 * 16], [0.5 * 64, 0.3 * 64]], requires_grad=True)
    kl_balance(kl, sizes, beta=0.5).sum().backward()
    gamma = kl.grad[:, 0] / 0.5
    torch.testing.assert_close(gamma[0], gamma[1])
    torch.testing.assert_close(gamma.mean(), torch.tensor(1.0))
    # a group with half the KL per dimension gets a smaller coefficient, whatever its size
    kl2 = torch.tensor([[0.25 * 16], [0.5 * 64]], requires_grad=True)
    kl_balance(kl2, sizes, beta=0.5).sum().backward()
    assert kl2.grad[0, 0] < kl2.grad[1, 0]


def test_spectral_loss_converges_to_the_largest_singular_value():
    model = NVAE(**model_args("nvae", hidden=8, latent_channels=2, scales=1, groups_per_scale=1)).train()
    conv = model.stem
    for _ in range(50):
        loss = model.spectral_loss()
    sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
    estimate = torch.dot(conv.sr_u, conv.weight.detach().flatten(1) @ conv.sr_v)
    torch.testing.assert_close(estimate, sigma, rtol=1e-3, atol=1e-4)
    assert loss.requires_grad and "stem.sr_u" in model.state_dict()


@pytest.mark.parametrize("kwargs", [dict(scales=2, groups_per_scale=2), dict(scales=1, groups_per_scale=1,
                                                                          residual_posterior=False),
                                    dict(scales=1, groups_per_scale=2, flows=2)])
def test_every_parameter_gets_a_gradient(kwargs):
    """DDP (several Ray Train workers) fails on parameters the loss does not reach."""
    model = NVAE(**model_args("nvae", hidden=8, latent_channels=2, **kwargs))
    out = model(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))
    (out["nll"] + out["kl"].sum(0)).mean().add(model.spectral_loss()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_a_flow_cell_is_autoregressive_over_channels_and_its_log_determinant_is_exact():
    """The full Jacobian of one IAF cell on a 3-channel 2x2 map (12x12): zero across positions,
    lower triangular over channels with the gates on its diagonal; log|det| = the cell's."""
    torch.manual_seed(0)
    cell = IAFCell(3, context_channels=4).double()
    for p in cell.out.parameters():  # away from the identity it starts at
        torch.nn.init.normal_(p, std=0.5)
    z, context = torch.randn(1, 3, 2, 2, dtype=torch.double), torch.randn(1, 4, 2, 2, dtype=torch.double)
    jac = torch.autograd.functional.jacobian(lambda t: cell(t.view(1, 3, 2, 2), context)[0].flatten(), z.flatten())
    per = jac.view(3, 4, 3, 4)  # [out channel, out position, in channel, in position]
    for a in range(4):
        for b in range(4):
            block = per[:, a, :, b]
            if a != b:
                assert torch.all(block == 0), "a position's output depends on another position"
            else:
                assert torch.all(block.triu(1) == 0), "channel i depends on channel j >= i"
                assert torch.all(block.diagonal() > 0) and block.tril(-1).abs().sum() > 0
    sign, log_abs_det = torch.linalg.slogdet(jac)
    torch.testing.assert_close(cell(z, context)[1], log_abs_det.reshape(1))
    assert sign > 0


def test_with_flows_each_groups_kl_is_the_one_sample_estimate_log_q_minus_log_p():
    torch.manual_seed(0)
    model = NVAE(**model_args("nvae", hidden=8, latent_channels=3, scales=1, groups_per_scale=2, flows=2))
    for cell in (c for cells in model.flows for c in cells):
        torch.nn.init.normal_(cell.out.weight, std=0.3)
    out = model(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))
    torch.testing.assert_close(out["kl"].sum(0), out["log_q"] - out["log_p"])
    assert torch.isfinite(model.log_weights(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8), 3)).all()


def test_importance_samples_drawn_together_are_independent_draws_of_the_same_estimate(trained_batch):
    model, x = trained_batch
    w = model.log_weights(x, 16, generator=torch.Generator().manual_seed(6), together=8)
    assert w.shape == (16, x.shape[0])
    assert (w.std(0) > 0).all()  # every repeat of the batch drew its own latents
    g = torch.Generator().manual_seed(7)
    one = torch.stack([iw_bound(model.log_weights(x, 16, generator=g)) for _ in range(6)])
    together = torch.stack([iw_bound(model.log_weights(x, 16, generator=g, together=16)) for _ in range(6)])
    spread = torch.cat([one, together]).std(0).mean() / 6 ** 0.5
    assert abs(one.mean() - together.mean()) < 4 * spread, (one.mean(), together.mean(), spread)
