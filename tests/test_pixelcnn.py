"""Gated PixelCNN: causal in raster order, normalised, conditioned, reproducible sampling."""
import pytest
import torch

from hvae.stages.priors import prior_args
from hvae.models.pixelcnn import GatedPixelCNN, HierarchicalPrior
from hvae.models.pixelcnn_cache import cached_logits

H = W = 6


def _model(**kw):
    torch.manual_seed(0)
    return GatedPixelCNN(num_codes=7, hidden=8, layers=4, kernel=5, **kw).double()


@pytest.mark.parametrize("kw", [{}, {"cond_codes": 5, "cond_factor": 2, "num_classes": 3},
                                {"attention_every": 2, "attention_heads": 2}])
def test_every_stack_of_every_layer_is_causal_in_raster_order(kw):
    m = _model(**kw)
    x = torch.randn(1, 8, H, W, dtype=torch.double, requires_grad=True)
    cond = m.condition(torch.randint(0, 5, (1, H // 2, W // 2))) if "cond_codes" in kw else None
    labels = torch.tensor([1]) if "num_classes" in kw else None
    logits, stacks = m.forward_embedded(x, cond, labels, return_stacks=True)
    outputs = [("logits", logits)] + [(f"layer{l}.{name}", t) for l, (v, h) in enumerate(stacks)
                                      for name, t in (("vertical", v), ("horizontal", h))]
    for name, out in outputs:
        for i in range(H):
            for j in range(W):
                g, = torch.autograd.grad(out[0, :, i, j].sum(), x, retain_graph=True)
                dep = g[0].abs().sum(0)  # [H, W]
                flat = dep.flatten()
                p = i * W + j
                assert torch.all(flat[p:] == 0), f"{name} at {(i, j)} sees a position >= itself"
                earlier = i > 0 if name.endswith("vertical") else p > 0  # vertical: rows above only
                if earlier:
                    assert flat[:p].abs().sum() > 0, f"{name} at {(i, j)} sees nothing before it"


@pytest.mark.parametrize("kw", [{}, {"attention_every": 2, "attention_heads": 2, "dropout": 0.1}])
def test_no_blind_spot_the_last_position_sees_every_earlier_one(kw):
    m = _model(**kw)
    x = torch.randn(1, 8, H, W, dtype=torch.double, requires_grad=True)
    g, = torch.autograd.grad(m.forward_embedded(x)[0, :, H - 1, W - 1].sum(), x)
    seen = g[0].abs().sum(0).flatten()[: H * W - 1]
    assert torch.all(seen > 0)


def test_probabilities_sum_to_one_and_log_prob_matches():
    m = _model()
    codes = torch.randint(0, 7, (3, H, W))
    probs = torch.softmax(m(codes), dim=1)
    assert torch.allclose(probs.sum(1), torch.ones(3, H, W, dtype=torch.double))
    manual = torch.log(probs.gather(1, codes[:, None]).squeeze(1)).flatten(1).sum(1)
    assert torch.allclose(m.log_prob(codes), manual)


def test_bottom_prior_depends_on_the_top_map():
    m = _model(cond_codes=5, cond_factor=2)
    codes = torch.randint(0, 7, (2, H, W))
    top = torch.randint(0, 5, (2, H // 2, W // 2))
    assert not torch.allclose(m(codes, top), m(codes, (top + 1) % 5))


def test_sampling_with_the_same_seed_is_identical():
    m = _model(num_classes=3)
    labels = torch.tensor([0, 1, 2])
    a = m.sample((3, H, W), labels=labels, generator=torch.Generator().manual_seed(5))
    b = m.sample((3, H, W), labels=labels, generator=torch.Generator().manual_seed(5))
    c = m.sample((3, H, W), labels=labels, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 7


@pytest.mark.parametrize("kw", [{}, {"cond_codes": 5, "cond_factor": 2, "num_classes": 3},
                                {"attention_every": 1, "attention_heads": 2, "cond_codes": 5, "cond_factor": 2}])
def test_the_cached_samplers_logits_are_the_forward_passs(kw):
    m = _model(**kw).eval()
    codes = torch.randint(0, 7, (2, H, W + 2))
    cond = torch.randint(0, 5, (2, H // 2, W // 2 + 1)) if "cond_codes" in kw else None
    labels = torch.tensor([2, 0]) if "num_classes" in kw else None
    torch.testing.assert_close(cached_logits(m, codes, cond, labels), m(codes, cond, labels), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.double, torch.float])
@pytest.mark.parametrize("kw", [{}, {"attention_every": 2, "attention_heads": 2}])
def test_the_cached_sampler_draws_the_naive_samplers_codes(kw, dtype):
    """Top prior and a class-conditional bottom prior (kernel 3 and 5, non-square maps): the
    cached sampler (the default) gives the reference's codes for the same seed and weights."""
    torch.manual_seed(0)
    priors = HierarchicalPrior(**prior_args([7, 9], [[3, 4], [6, 8]], hidden=8, layers=3, kernel=3, num_classes=3,
                               dropout=0.1, **kw)).to(dtype).eval()
    labels = torch.tensor([0, 1, 2, 0])
    naive = priors.sample(4, labels, 0.8, torch.Generator().manual_seed(3), cached=False)
    cached = priors.sample(4, labels, 0.8, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(naive, cached))
    top = _model(**kw).to(dtype).eval()  # kernel 5, no conditioning
    assert torch.equal(top.sample((2, 7, 5), generator=torch.Generator().manual_seed(4), cached=False),
                       top.sample((2, 7, 5), generator=torch.Generator().manual_seed(4)))


def test_attention_reaches_rows_the_convolutions_cannot():
    """Two layers of kernel 3 see two rows up; an attention block sees the whole map above."""
    def reach(**kw):
        torch.manual_seed(0)
        m = GatedPixelCNN(num_codes=7, hidden=8, layers=2, kernel=3, **kw).double()
        x = torch.randn(1, 8, 8, 8, dtype=torch.double, requires_grad=True)
        g, = torch.autograd.grad(m.forward_embedded(x)[0, :, 7, 0].sum(), x)
        return bool(g[0, :, 0].abs().sum() > 0)  # does (7, 0) depend on row 0?

    assert not reach() and reach(attention_every=1, attention_heads=2)
