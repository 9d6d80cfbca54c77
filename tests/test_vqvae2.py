"""The VQ-VAE hierarchy: map sizes per level, top-first codes, decoding codes alone."""
import pytest
import torch

from models.vqvae2 import VQVAE2


def _model(levels, likelihood="dlogistic", channels=1):
    torch.manual_seed(0)
    return VQVAE2(in_channels=channels, levels=levels, hidden=16, res_hidden=8, res_blocks=1, embed_dim=4,
                  codebook_size=[8] * levels, likelihood=likelihood, num_mixtures=2)


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
