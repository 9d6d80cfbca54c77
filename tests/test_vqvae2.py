"""The VQ-VAE hierarchy: map sizes per level, top-first codes, decoding codes alone."""
import pytest
import torch

from hvae.stages.families import model_args
from hvae.models.vqvae2 import VQVAE2


def _model(levels, likelihood="dlogistic", channels=1):
    torch.manual_seed(0)
    return VQVAE2(**model_args("vqvae2", in_channels=channels, levels=levels, hidden=16, res_hidden=8, res_blocks=1, embed_dim=4,
                  codebook_size=[8] * levels, likelihood=likelihood, num_mixtures=2))


@pytest.mark.parametrize("levels,shapes", [(1, [(8, 8)]), (2, [(4, 4), (8, 8)]), (3, [(2, 2), (4, 4), (8, 8)])])
def test_levels_give_top_first_code_maps(levels, shapes):
    m = _model(levels)
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    out = m(x)
    assert [tuple(c.shape[1:]) for c in out["codes"]] == shapes
    assert out["params"].shape == (3, m.likelihood.num_params(), 32, 32)
    assert out["nll"].shape == (3,) and torch.isfinite(out["nll"]).all()


@pytest.mark.parametrize("likelihood,channels", [("dlogistic", 1), ("dlogistic", 3), ("bernoulli", 1)])
def test_decoding_the_codes_reproduces_the_reconstruction_exactly(likelihood, channels):
    m = _model(2, likelihood, channels).eval()
    x = torch.randint(0, 256, (4, channels, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        out = m(x)
        assert torch.equal(m.decode_codes(m.encode(x)), out["params"])


def test_lower_level_depends_on_the_level_above():
    m = _model(2).eval()
    x = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        quants, codes, _, _ = m.quantize(x.float() / 127.5 - 1)
        feats = m._features(x.float() / 127.5 - 1)
        other_top = m.quantizers[0].embed((codes[0] + 1) % 8)
        z_b = m.pre_quant[1](torch.cat([feats[1], m.cond_up[0](other_top)], 1))
        assert not torch.equal(z_b, m.pre_quant[1](torch.cat([feats[1], m.cond_up[0](quants[0])], 1)))


def test_gradients_reach_the_encoders_through_the_quantizers():
    m = _model(2).train()
    out = m(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))
    (out["nll"] + out["commit"]).mean().backward()
    for enc in m.encoders:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


@pytest.mark.parametrize("downsample,size,shapes", [
    ([2, 2, 8], 128, [(4, 4), (8, 8), (16, 16)]),  # FFHQ-1024's factors (128/64/32 maps at 1024)
    ([4, 2], 64, [(8, 8), (32, 32)]),
    ([8], 32, [(4, 4)]),
])
def test_per_level_downsampling_gives_the_configured_maps(downsample, size, shapes):
    torch.manual_seed(0)
    m = VQVAE2(**model_args("vqvae2", in_channels=3, levels=len(downsample), hidden=16, res_hidden=8, res_blocks=1, embed_dim=8,
               codebook_size=16, downsample=downsample)).eval()
    x = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    out = m(x)
    assert [tuple(c.shape[1:]) for c in out["codes"]] == shapes == m.map_shapes(size)
    assert out["params"].shape[-2:] == (size, size)
    torch.testing.assert_close(m.decode_codes(out["codes"]), out["params"])


def test_downsampling_factors_are_checked():
    from hvae.settings.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="downsample lists 1 factors for 2 levels"):
        load_config(None, ["vqvae2.downsample=[4]"])
    with pytest.raises(ConfigError, match="powers of two"):
        load_config(None, ["vqvae2.downsample=[3,4]"])
    with pytest.raises(ConfigError, match="data.image_size=32 must be a multiple of 64 for vqvae2.downsample"):
        load_config(None, ["vqvae2.downsample=[8,8]"])
    from hvae.stages import families

    cfg = load_config(None, ["vqvae2.downsample=[4,2]"])
    assert families.of(cfg).model_config(cfg, 1)["downsample"] == [4, 2]


@pytest.mark.parametrize("family", ["vqvae2", "nvae"])
def test_the_likelihood_counts_the_real_pixels_only(family):
    """A 28x28 digit in a 32x32 frame: the NLL is the likelihood of the 28x28 crop, the border's
    pixels left out."""
    from hvae.models.likelihoods import real_pixels
    from hvae.models.nvae import NVAE

    torch.manual_seed(0)
    region = [2, 2, 28, 28]
    kw = dict(in_channels=1, likelihood_region=region, num_mixtures=2)
    model = (VQVAE2(**model_args("vqvae2", levels=2, hidden=8, res_hidden=4, res_blocks=1, embed_dim=4, codebook_size=8,
                    sync_codebooks=False, **kw)) if family == "vqvae2" else
             NVAE(**model_args("nvae", image_size=32, hidden=8, latent_channels=2, **kw))).eval()
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        g = lambda: torch.Generator().manual_seed(1)  # noqa: E731 (the NVAE draws its latents)
        out = model(x, **({} if family == "vqvae2" else {"generator": g()}))
        crop = -model.likelihood.log_prob(real_pixels(out["params"], region), real_pixels(x, region))
        torch.testing.assert_close(out["nll"], crop)
        full = -model.likelihood.log_prob(out["params"], x)
        assert (full > out["nll"]).all()  # the border's pixels cost something when counted
