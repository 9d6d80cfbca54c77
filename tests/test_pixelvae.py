"""PixelVAE model checks: an autoregressive decoder, the KL terms, the importance-weighted bound,
samples (the cached sampler equal to the reference), every parameter trained."""
import pytest
import torch

from hvae.stages.families import model_args
from hvae.models.likelihoods import to_model_range
from hvae.models.nvae import free_nats, iw_bound, normal_log_prob
from hvae.models.pixelvae import PixelVAE, gaussian_kl

VARIANTS = {
    "gated": dict(),
    "without upsampling": dict(upsample=False),
    "hierarchical": dict(levels=2, downsample=1),
    "8-bit RGB": dict(likelihood="dlogistic", in_channels=3, image_size=16, num_mixtures=3),
}


def _small(**kwargs) -> PixelVAE:
    return PixelVAE(**model_args("pixelvae", **{"image_size": 28, "hidden": 8, "latent_channels": 2, "pixel_hidden": 8, "pixel_layers": 3,
                       **kwargs}))


def _images(model, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, model.in_channels, model.image_size, model.image_size)
    if model.likelihood.name == "bernoulli":
        return (torch.rand(shape, generator=g) > 0.7).to(torch.uint8) * 255
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def test_the_gaussian_kl_is_the_closed_form_and_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu_q, ls_q, mu_p, ls_p = (torch.randn(4, 1, 32, generator=g) * 0.5).unbind(0)
    z = mu_q + ls_q.exp() * torch.randn(200_000, 32, generator=g)
    mc = (normal_log_prob(z, mu_q, ls_q) - normal_log_prob(z, mu_p, ls_p)).mean(0).sum()
    torch.testing.assert_close(gaussian_kl(mu_q, ls_q, mu_p, ls_p)[0], mc, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_parameter_gets_a_gradient_and_the_decoder_sees_only_earlier_pixels(variant):
    """One training step: a finite loss that reaches every parameter (DDP fails otherwise); the
    likelihood's parameters at a pixel change with the pixels before it, never with it or after."""
    torch.manual_seed(0)
    model = _small(**VARIANTS[variant])
    x = _images(model, 4)
    out = model(x)
    assert out["kl"].shape == (model.levels, 4) and (out["kl"] >= 0).all()
    loss = (out["nll"] + out["kl"].sum(0)).mean()
    assert torch.isfinite(loss)
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.eval()
    cond = model.condition(torch.randn(1, *model.latent_shapes[0]))
    base = model._pixels(x[:1], cond)
    changed = x[:1].clone()
    changed[:, :, 5, 7] = 255 - changed[:, :, 5, 7]
    moved = (model._pixels(changed, cond) - base).abs().sum(1)[0]
    assert moved[:5].max() == 0 and moved[5, :8].max() == 0  # (5, 7) itself and every pixel before it
    assert moved[5, 8:].max() > 0 and moved[6:].max() > 0


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = _small(levels=2, downsample=1)
    x = _images(model, 16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        out = model(x)
        opt.zero_grad()
        (out["nll"] + out["kl"].sum(0)).mean().backward()
        opt.step()
    with torch.no_grad():  # posteriors far from the priors (a few steps on random bits leave them there)
        for head in (model.q1, model.q2[-1]):
            head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return model.eval(), x


def test_the_iw_bound_with_one_sample_is_the_elbo_and_tightens_with_k(trained):
    model, x = trained
    w1 = model.log_weights(x, 1, generator=torch.Generator().manual_seed(3))
    out = model(x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(iw_bound(w1), -out["nll"] + out["log_p"] - out["log_q"])
    # the closed-form KLs are the expectation of log q - log p: the analytic ELBO is below the IW bound
    elbo = -(out["nll"] + out["kl"].sum(0))
    w = model.log_weights(x, 64, generator=torch.Generator().manual_seed(4), together=16)
    assert (iw_bound(w) >= w.mean(0)).all() and iw_bound(w).mean() > elbo.mean()
    g = torch.Generator().manual_seed(5)
    means = [torch.stack([iw_bound(model.log_weights(x, k, generator=g, together=k)).mean() for _ in range(4)]).mean()
             for k in (1, 4, 16)]
    print("IW bound by K (1, 4, 16):", [round(float(m), 3) for m in means])
    assert means[0] < means[1] < means[2], means


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_samples_have_the_image_shape_and_the_cached_sampler_draws_the_reference_pixels(variant):
    torch.manual_seed(0)
    model = _small(**VARIANTS[variant]).eval()
    for p in model.parameters():  # (away from the initial N(0, I) posterior and flat decoder)
        p.data.normal_(0, 0.3)
    images = model.sample(3, 1.0, torch.Generator().manual_seed(1))
    assert images.shape == (3, model.in_channels, model.image_size, model.image_size) and images.dtype == torch.uint8
    if model.likelihood.name == "bernoulli":
        assert set(images.unique().tolist()) <= {0, 255}
    cond = model.condition(torch.randn(2, *model.latent_shapes[0], generator=torch.Generator().manual_seed(2)))
    for pixels in ("sample", "mean"):
        fast = model.draw_pixels(cond, 2, torch.Generator().manual_seed(7), pixels, cached=True)
        slow = model.draw_pixels(cond, 2, torch.Generator().manual_seed(7), pixels, cached=False)
        assert torch.equal(fast, slow), pixels
    # a seed gives the same samples; reconstructions are images too
    assert torch.equal(model.sample(3, 1.0, torch.Generator().manual_seed(1)), images)
    assert model.reconstruct(_images(model, 2)).shape == (2, model.in_channels, model.image_size, model.image_size)


def test_a_lower_temperature_draws_latents_nearer_the_prior_mean():
    model = _small().eval()
    z = {}
    for t in (0.0, 1.0):
        captured = []
        hook = model.condition.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
        model.sample(4, t, torch.Generator().manual_seed(0))
        hook.remove()
        z[t] = captured[0]
    assert z[0.0].abs().max() == 0 and z[1.0].std() > 0.5


def test_sizes_that_do_not_divide_are_refused_by_name():
    with pytest.raises(ValueError, match="image_size 28 must be a multiple of 8"):
        PixelVAE(**model_args("pixelvae", image_size=28, downsample=2, levels=2))
    assert to_model_range(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


def test_padding_is_placed_not_drawn():
    """Padded images (a 28x28 digit in a 32x32 frame): the likelihood counts the real pixels
    only, so the PixelCNN never learns the border; a sample's border is the padding (0)."""
    model = _small(image_size=32, likelihood_region=[2, 2, 28, 28]).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    images = model.sample(4, 1.0, torch.Generator().manual_seed(1))
    inner = images[:, :, 2:30, 2:30]
    assert images.sum() == inner.sum() and inner.float().mean() > 0
    cond = model.condition(torch.randn(2, *model.latent_shapes[0]))
    assert torch.equal(model.draw_pixels(cond, 2, torch.Generator().manual_seed(3), cached=True),
                       model.draw_pixels(cond, 2, torch.Generator().manual_seed(3), cached=False))


def test_free_nats_keep_the_kl_but_take_the_gradient_off_a_level_below_the_floor():
    kl = torch.tensor([[1.0, 3.0], [10.0, 12.0]], requires_grad=True)  # [levels, B]: means 2 and 11 nats
    out = free_nats(kl, 5.0)
    assert torch.equal(out, kl.detach())  # the loss's value is still the true KL
    out.sum().backward()
    assert kl.grad.tolist() == [[0.0, 0.0], [1.0, 1.0]]


def test_the_pixelvae_section_passes_free_nats_to_the_training_loss():
    from hvae.settings.config import load_config
    from hvae.stages.families import of

    cfg = load_config("configs/pixelvae.yaml", ["pixelvae.free_nats=8"])
    assert of(cfg).loss_settings(cfg)["free_nats"] == 8.0
