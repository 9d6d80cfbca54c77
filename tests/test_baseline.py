"""The histogram baseline stage 1 is held against (stages/baseline.py)."""
import numpy as np
import pytest

from hvae.stages.baseline import histogram_bpd


def test_uniform_bytes_cost_eight_bits_and_bernoulli_pixels_their_entropy():
    rng = np.random.default_rng(0)
    assert histogram_bpd(rng.integers(0, 256, (400, 3, 8, 8), dtype=np.uint8)) == pytest.approx(8.0, abs=0.05)
    p = 0.3
    binary = (rng.random((400, 1, 28, 28)) < p).astype(np.uint8) * 255
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    assert histogram_bpd(binary) == pytest.approx(entropy, abs=0.01)


def test_positions_with_their_own_values_are_learnt_per_position_and_padding_is_left_out():
    rng = np.random.default_rng(1)
    # each position holds its own constant: a per-position histogram knows it (~0 bits), one
    # histogram per channel sees 64 values (6 bits)
    images = np.broadcast_to(np.arange(64, dtype=np.uint8).reshape(1, 1, 8, 8), (200, 1, 8, 8)).copy()
    assert histogram_bpd(images) < 0.1
    # a noisy 4x4 centre in a constant frame: only the centre counts
    framed = np.zeros((400, 1, 8, 8), np.uint8)
    framed[:, :, 2:6, 2:6] = rng.integers(0, 256, (400, 1, 4, 4))
    assert histogram_bpd(framed, (2, 2, 4, 4)) == pytest.approx(8.0, abs=0.1)
    assert histogram_bpd(framed) < 4.0
    with pytest.raises(ValueError, match="at least 2 images"):
        histogram_bpd(framed[:1])
