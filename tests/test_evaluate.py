"""The NLL bound's units, and reproducible sampling through the whole hierarchy."""
import math

import numpy as np
import pytest
import torch

from hvae.stages.priors import prior_args
from hvae.stages.families import model_args
from hvae.models.pixelcnn import HierarchicalPrior
from hvae.models.vqvae2 import VQVAE2, draw
from hvae.stages.families.vqvae2 import nll_bound
from hvae.stages.nll_table import nll_table


def _known_models(likelihood="bernoulli"):
    torch.manual_seed(0)
    vq = VQVAE2(**model_args("vqvae2", in_channels=1, levels=2, hidden=8, res_hidden=4, res_blocks=1, embed_dim=4,
                codebook_size=[8, 16], likelihood=likelihood, num_mixtures=1)).eval()
    priors = HierarchicalPrior(**prior_args([8, 16], [[4, 4], [8, 8]], hidden=8, layers=2, kernel=3)).eval()
    with torch.no_grad():
        last = vq.decoder[-1]  # decoder output 0 everywhere: Bernoulli(0.5) for every pixel
        last.weight.zero_()
        last.bias.zero_()
        for p in priors.levels:  # prior logits 0 everywhere: uniform over each codebook
            p.head[-1].weight.zero_()
            p.head[-1].bias.zero_()
    return vq, priors


def test_nll_bound_units_by_hand():
    vq, priors = _known_models()
    images = np.random.default_rng(0).integers(0, 256, (6, 1, 32, 32)).astype(np.uint8)
    m = nll_bound(vq, priors, images, np.zeros(6, dtype=np.int64), batch_size=4)
    recon = 1024 * math.log(2)  # 1024 fair coins
    prior = 16 * math.log(8) + 64 * math.log(16)  # uniform codes on a 4x4 map of 8 and an 8x8 map of 16
    assert m["test_recon_nats"] == pytest.approx(recon, rel=1e-6)
    assert m["test_prior_nats"] == pytest.approx(prior, rel=1e-6)
    assert m["test_nll_nats"] == pytest.approx(recon + prior, rel=1e-6)
    assert m["test_recon_bpd"] == pytest.approx(1.0, rel=1e-6)
    assert m["test_prior_bpd"] == pytest.approx((16 * 3 + 64 * 4) / 1024, rel=1e-6)  # log2 8 = 3, log2 16 = 4
    assert m["test_nll_bpd"] == pytest.approx(1.0 + 304 / 1024, rel=1e-6)
    table = nll_table([{"model": "m", "dataset": "d", **m}])
    assert f"≤ {recon + prior:.2f}" in table and "| m | d |" in table


def test_same_seed_same_samples():
    vq, priors = _known_models("dlogistic")
    a = draw(vq, priors, 4, 1.0, seed=3, pixels="sample")
    b = draw(vq, priors, 4, 1.0, seed=3, pixels="sample")
    c = draw(vq, priors, 4, 1.0, seed=4, pixels="sample")
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert not all(torch.equal(x, y) for x, y in zip(a[1], c[1]))
    assert a[0].dtype == torch.uint8 and a[0].shape == (4, 1, 32, 32)
    assert [tuple(c.shape) for c in a[1]] == [(4, 4, 4), (4, 8, 8)]


def test_the_sampler_draws_the_same_images_however_its_chunks_are_shared_out():
    """Chunks of sample.batch_size images, each from its own generator seeded by (seed, first
    image): drawn in any order, by any worker, they make the same set; labels count on."""
    from hvae.stages.families import OnDevice, chunk_seed
    from hvae.stages.families.vqvae2 import _draw

    vq, priors = _known_models("dlogistic")
    sampler = OnDevice(_draw, {"vq": vq, "priors": priors}, temperature=1.0, seed=3, pixels="sample")
    forward = [sampler(first, 2) for first in (0, 2, 4)]
    backward = [sampler(first, 2) for first in (4, 2, 0)][::-1]
    for f, b in zip(forward, backward):
        assert torch.equal(f[0], b[0]) and all(torch.equal(x, y) for x, y in zip(f[1], b[1]))
    assert torch.equal(forward[0][0], draw(vq, priors, 2, 1.0, seed=3, pixels="sample")[0])  # chunk 0: the seed itself
    assert torch.equal(forward[1][0], draw(vq, priors, 2, 1.0, seed=chunk_seed(3, 2), pixels="sample")[0])
    assert not torch.equal(forward[0][0], forward[1][0])
    priors.levels[0].num_classes = 3  # (labels only: class i % 3 for sample i, across chunks)
    assert draw(vq, priors, 2, 1.0, seed=3, first=4)[2].tolist() == [1, 2]


def test_published_rows_stand_beside_ours_only_on_the_same_test_set_and_unit():
    from hvae.settings.config import load_config
    from hvae.stages import literature

    bern = ["stage1.likelihood=bernoulli"]
    bench = lambda *o: literature.benchmark(load_config(None, list(o)).data)  # noqa: E731
    assert bench("data.dataset=mnist", "data.binarize=dynamic", *bern) == literature.BINARIZED_MNIST
    assert bench("data.dataset=mnist", "data.binarize=static", *bern) == literature.BINARIZED_MNIST
    assert bench("data.dataset=mnist", "data.binarize=dynamic", "data.limit=100", *bern) is None  # a subset
    assert bench("data.dataset=mnist") is None  # 8-bit MNIST: nothing published in this unit here
    assert bench("data.binarize=dynamic", *bern) is None  # the 5,000-digit sample: another test set
    assert bench("data.dataset=cifar10") == literature.CIFAR10
    assert bench("data.dataset=cifar10", "data.image_size=64") is None
    ours = {"model": "VQ-VAE-2", "dataset": "mnist, binarized dynamic (seed 0) (10000 test images, …)",
            "structure": "2 levels", "bound": "≤", "test_nll_nats": 80.5, "test_nll_bpd": 0.148,
            "test_recon_bpd": 0.1, "test_prior_bpd": 0.048, "benchmark": literature.BINARIZED_MNIST}
    table = nll_table(literature.ordered([ours, *literature.rows([literature.BINARIZED_MNIST])]))
    lines = [ln for ln in table.splitlines() if ln.startswith("| ") and "Model" not in ln]
    names = [ln.split(" | ")[0][2:] for ln in lines]
    assert names.index("VQ-VAE-2") == names.index("Gated PixelCNN (published)") + 1  # 80.10 < 80.5 < 80.64
    assert "| PixelCNN (published) | binarized MNIST | PixelVAE (Gulrajani et al., 2017)" in table
    assert "| = 81.30 | – |" in table and not any("CIFAR" in ln for ln in lines)


def test_every_image_has_its_own_bound_and_the_table_shows_estimator_and_standard_error():
    from hvae.stages.evaluate import standard_errors
    from hvae.stages.families import IMAGE_NATS
    from hvae.stages.families.vqvae2 import nll_sums, nll_summary

    vq, priors = _known_models()
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (5, 1, 32, 32)).astype(np.uint8))
    sums = nll_sums(vq, priors, x, torch.zeros(5, dtype=torch.int64))
    images = sums[IMAGE_NATS]
    assert images.shape == (5,) and images.sum() == pytest.approx(sums["recon"] + sums["prior0"] + sums["prior1"])
    m = {**nll_summary(sums, 1024), **standard_errors(np.array([1.0, 2.0, 3.0, 6.0]), 1024)}
    assert m["test_nll_nats_se"] == pytest.approx(np.std([1, 2, 3, 6], ddof=1) / 2)
    assert m["test_nll_bpd_se"] == pytest.approx(m["test_nll_nats_se"] / (1024 * math.log(2)))
    table = nll_table([{"model": "m", "dataset": "d", **m}])
    assert f"| ≤ VQ bound | ≤ {m['test_nll_nats']:.2f} ± {m['test_nll_nats_se']:.2f} |" in table
    conditional = nll_table([{"model": "m", "dataset": "d", **m, "test_class_conditional": 1.0}])
    assert "| ≤ VQ bound, −log p(x|y) |" in conditional
    iw = nll_table([{"model": "v", "dataset": "d", **m, "test_iw_samples": 1000.0}])
    assert "| ≈ IW, K=1000 |" in iw and "≤ −ELBO" in nll_table([{"model": "v", "dataset": "d", "test_iw_samples": 1.0}])


def test_runs_differing_only_in_seed_give_a_mean_and_sd_row():
    from hvae.settings.config import load_config, setup_key
    from hvae.pipeline.report import over_seeds

    a, b = (load_config(None, [f"stage1.seed={s}", f"priors.seed={s}"]) for s in (0, 1))
    key = lambda cfg, data="fp": setup_key(cfg, data)  # noqa: E731
    assert key(a) == key(b) != key(load_config(None, ["stage1.lr=1e-3"]))
    assert key(a) == key(load_config(None, ["cluster.num_workers=1", "cluster.storage_path=/x"]))  # where it runs is no setup
    mnist = lambda *more: key(load_config(None, ["data.dataset=mnist", *more]))  # noqa: E731
    assert mnist() == mnist("data.root=/elsewhere") != key(a)  # nor where its files are
    assert key(a) != key(a, "other data")
    row = lambda nats, run: {"model": "m", "dataset": "d", "setup": "k", "test_nll_nats": nats,  # noqa: E731
                             "test_nll_bpd": nats / 100, "seconds": 10.0, "run": run}
    rows = [row(100.0, "a"), row(102.0, "b"), row(104.0, "c"), {**row(90.0, "d"), "setup": "other"}]
    (mean,) = over_seeds(rows)
    assert mean["seeds"] == 3 and mean["test_nll_nats"] == pytest.approx(102.0)
    assert mean["test_nll_nats_se"] == pytest.approx(2.0)  # the s.d. over the seeds
    table = nll_table([mean])
    assert "m (mean of 3 seeds)" in table and "102.00 ± 2.00" in table and "over the seeds" in table


def test_digit_scores_are_confidence_and_the_entropy_of_the_mean_label_distribution():
    from hvae.models.digits import DigitClassifier, digit_scores

    class Fixed(DigitClassifier):  # logits given by the image's first pixel: class (pixel % 10), sure of it
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long() % 10, 10).float() * 100.0

    uniform = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 4, 4).contiguous()
    s = digit_scores(Fixed(), uniform)
    assert s["confidence"] == pytest.approx(1.0) and s["label_entropy"] == pytest.approx(math.log(10))
    assert s["digits_seen"] == 1.0
    ones = torch.full((8, 1, 4, 4), 3, dtype=torch.uint8)  # every sample the same digit
    s = digit_scores(Fixed(), ones)
    assert s["label_entropy"] == pytest.approx(0.0, abs=1e-6) and s["digits_seen"] == 0.1


def test_the_printed_report_is_aligned_and_fits_a_terminal_by_cutting_text_not_numbers():
    from hvae.pipeline.report import aligned

    table = ("| Model | Dataset | NLL (nats/image) |\n|---|---|---|\n"
             "| VQ-VAE-2 (K=512) + gated PixelCNN priors | mnist (10000 test images, binarized) | ≤ 276.19 ± 0.28 |\n"
             "| NVAE | mnist | ≈ 99.14 ± 0.22 |\n\nlegend\n")
    wide = aligned(table).splitlines()
    assert len({len(line) for line in wide[:4]}) == 1 and wide[-1] == "legend"
    narrow = aligned(table, 60).splitlines()
    assert all(len(line) <= 60 for line in narrow[:4]) and "…" in narrow[2]
    assert "≤ 276.19 ± 0.28" in narrow[2] and "≈ 99.14 ± 0.22" in narrow[3]
