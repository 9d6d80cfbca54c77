"""The EMA vector quantizer against the notes' formulas, and its DDP synchronisation."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hvae.models.quantize import VectorQuantizerEMA


def _vq(k=3, d=2, decay=0.5, eps=1e-5, **kw):
    vq = VectorQuantizerEMA(k, d, beta=0.25, decay=decay, eps=eps, **kw)
    with torch.no_grad():
        vq.embedding.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
        vq.embed_sum.copy_(vq.embedding)
        vq.cluster_size.fill_(1.0)
    return vq


def test_ema_update_matches_hand_computation():
    vq = _vq()
    # six 2-d vectors as a [1, 2, 2, 3] map: nearest codes are 0, 0, 1, 1, 1, 2... by hand below
    z = torch.tensor([[0.1, -0.2], [0.3, 0.1], [0.9, 1.2], [1.1, 0.8], [1.4, 1.0], [4.0, 6.0]])
    vq.train()
    _, codes, _, stats = vq(z.t().reshape(1, 2, 2, 3))
    assert codes.flatten().tolist() == [0, 0, 1, 1, 1, 2]

    gamma, eps, K = 0.5, 1e-5, 3
    n = np.array([2.0, 3.0, 1.0])
    s = np.array([z[:2].sum(0).numpy(), z[2:5].sum(0).numpy(), z[5].numpy()])
    N = gamma * np.ones(3) + (1 - gamma) * n  # N <- gamma N + (1 - gamma) n
    m = gamma * np.array([[0, 0], [1, 1], [5, 5]]) + (1 - gamma) * s  # m <- gamma m + (1 - gamma) sum z
    N_s = (N + eps) / (N.sum() + K * eps) * N.sum()  # Laplace smoothing
    e = m / N_s[:, None]
    np.testing.assert_allclose(vq.cluster_size.numpy(), N, rtol=1e-6)
    np.testing.assert_allclose(vq.embed_sum.numpy(), m, rtol=1e-6)
    np.testing.assert_allclose(vq.embedding.numpy(), e, rtol=1e-5)
    assert stats["usage"].tolist() == n.tolist()
    p = n / n.sum()
    assert float(stats["perplexity"]) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)


def test_eval_mode_leaves_codebook_alone():
    vq = _vq().eval()
    before = vq.embedding.clone()
    vq(torch.randn(2, 2, 3, 3))
    assert torch.equal(before, vq.embedding)


def test_straight_through_gradient_and_commitment():
    vq = _vq(decay=0.99)
    z = torch.randn(2, 2, 3, 3, requires_grad=True)
    z_q, codes, loss, _ = vq(z)
    w = torch.randn_like(z_q)
    (z_q * w).sum().backward()
    # the decoder's gradient reaches the encoder output unchanged
    assert torch.allclose(z.grad, w)

    z2 = z.detach().clone().requires_grad_(True)
    vq.eval()
    _, codes2, loss2, _ = vq(z2)
    loss2.sum().backward()
    target = vq.embed(codes2)
    assert torch.allclose(z2.grad, 2 * 0.25 * (z2.detach() - target), atol=1e-6)


def test_forward_value_is_the_code_vector():
    vq = _vq().eval()
    z = torch.randn(2, 2, 3, 3)
    z_q, codes, _, _ = vq(z)
    assert torch.equal(z_q, vq.embed(codes))


def test_kmeans_init_and_dead_code_restart():
    torch.manual_seed(0)
    centres = torch.tensor([[-5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    pts = torch.cat([c + 0.1 * torch.randn(50, 2) for c in centres])
    vq = VectorQuantizerEMA(3, 2, kmeans_init=True).train()
    vq(pts.t().reshape(1, 2, 1, 150))
    got = sorted(vq.embedding.tolist())
    for g, c in zip(got, sorted(centres.tolist())):
        assert np.allclose(g, c, atol=0.2)

    vq = _vq(decay=0.5, dead_code_threshold=0.3, restart_every=1).train()
    near_zero = 0.01 * torch.randn(1, 2, 4, 4)  # all vectors pick code 0: codes 1, 2 decay 1 -> .5 -> .25
    vq(near_zero)
    assert int(vq.restarts) == 0
    vq(near_zero)
    assert int(vq.restarts) == 2  # both fell below 0.3 and were moved onto encoder outputs
    assert vq.embedding[1:].abs().max() < 0.1

    vq = _vq(decay=0.5, dead_code_threshold=0.3, restart_every=3).train()  # checks at steps 0, 3, 6, ...
    seen = []
    for _ in range(4):
        vq(near_zero)
        seen.append(int(vq.restarts))
    assert seen == [0, 0, 0, 2]  # dead from step 1 on, restarted at the next check


def test_kmeans_again_at_a_later_step_and_restarts_relative_to_the_mean_count():
    torch.manual_seed(0)
    tiny = 0.001 * torch.randn(1, 2, 10, 15)  # the untrained encoder's cloud: k-means fits it
    centres = torch.tensor([[-5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    grown = torch.cat([c + 0.1 * torch.randn(50, 2) for c in centres]).t().reshape(1, 2, 10, 15)
    vq = VectorQuantizerEMA(3, 2, kmeans_init=True, kmeans_at_step=2).train()
    vq(tiny)
    assert vq.embedding.abs().max() < 0.01
    vq(grown)  # step 1: the EMA drifts towards the clusters, most codes far from them
    assert (torch.cdist(centres, vq.embedding).min(1).values > 1.0).sum() >= 2
    vq(grown)  # step 2: k-means again, on the encoder's outputs as they are now
    for g, c in zip(sorted(vq.embedding.tolist()), sorted(centres.tolist())):
        assert np.allclose(g, c, atol=0.2)

    # 2 of 3 codes take every vector: their EMA counts grow, the third's stays at its start (1)
    vq = _vq(decay=0.5, dead_code_fraction=0.3, restart_every=1).train()
    two = torch.tensor([[-1.0, 0.0]] * 20 + [[1.0, 0.0]] * 20).t().reshape(1, 2, 5, 8)
    with torch.no_grad():
        vq.embedding.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 50.0]]))
        vq.embed_sum.copy_(vq.embedding)
    vq(two)  # counts 10.5, 10.5, 0.5: mean 7.2; 0.5 < 0.3 x 7.2: the third is restarted
    assert int(vq.restarts) == 1 and vq.embedding[2].abs().max() <= 1.0
    # the absolute threshold of the old default would wait: 0.5 is not below 0.5
    old = _vq(decay=0.5, dead_code_threshold=0.5, restart_every=1).train()
    with torch.no_grad():
        old.embedding.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 50.0]]))
    old(two)
    assert int(old.restarts) == 0


# ---- two gloo processes --------------------------------------------------------------

def _train_rank(rank, world, init_file, sync, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    encoder = torch.nn.Conv2d(1, 4, 3, padding=1)
    vq = VectorQuantizerEMA(8, 4, decay=0.9, kmeans_init=True, dead_code_threshold=0.05, sync=sync).train()
    opt = torch.optim.SGD(encoder.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1000 + rank)  # every rank sees different data
    for _ in range(5):
        x = torch.randn(4, 1, 6, 6, generator=gen) + rank
        z_q, _, loss, _ = vq(encoder(x))
        opt.zero_grad()
        (loss.mean() + z_q.pow(2).mean()).backward()
        opt.step()
    torch.save(vq.embedding, os.path.join(out, f"codebook{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("sync", [True, False])
def test_two_processes_share_one_codebook_only_when_synced(tmp_path, sync):
    mp.spawn(_train_rank, args=(2, str(tmp_path / "init"), sync, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"codebook{r}.pt") for r in (0, 1))
    if sync:
        assert torch.equal(a, b)  # bit-identical
    else:
        assert not torch.allclose(a, b)
