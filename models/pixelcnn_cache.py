"""Cached ancestral sampling for the gated PixelCNN (the idea of Fast PixelCNN++,
Ramachandran et al. 2017): a new code changes only what lies after it in raster order, so
every layer keeps its state and only the new position is computed.

Row by row:
- the vertical stacks of row i see rows <= i only: once row i is drawn, one pass of each
  layer's vertical convolution over its last kh input rows (a rolling buffer) gives row i
  of every vertical stack and, through ``v_to_h``, the vertical term of row i + 1's
  horizontal stacks;
- inside row i, position j needs per layer only the horizontal input at columns
  j-kh+1 .. j of that row (a row buffer), the vertical term and the conditioning at (i, j):
  a few [B, C] x [C, .] products instead of a forward pass over the whole map;
- an attention block keeps its keys and values (a KV cache) and attends from the new
  position only.

The logits are those of ``GatedPixelCNN.forward`` up to float rounding, so for a seed the
codes are those of the naive sampler (``GatedPixelCNN.sample(..., cached=False)``, the
reference a test compares against). Sampling reads the model as in eval mode: no dropout.
A PixelCNN over real values (a PixelVAE's decoder) samples the same way (``sample_values``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _KVCache:
    """One ``CausalAttention`` block, one position at a time."""

    def __init__(self, att, b: int, hgt: int, wid: int, like: torch.Tensor):
        self.att, self.heads = att, att.heads
        c = att.qkv.in_features
        self.d = c // att.heads
        self.keys = like.new_zeros(b, att.heads, hgt * wid, self.d)
        self.values = like.new_zeros(b, att.heads, hgt * wid, self.d)
        rows = torch.linspace(-0.5, 0.5, hgt, device=like.device, dtype=like.dtype)
        cols = torch.linspace(-0.5, 0.5, wid, device=like.device, dtype=like.dtype)
        self.position = att.position(torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(hgt * wid, 2))

    def step(self, h: torch.Tensor, p: int) -> torch.Tensor:
        """h [B, C] at raster position p -> h plus its attention over positions <= p."""
        b, c = h.shape
        q, k, v = self.att.qkv(self.att.norm(h) + self.position[p]).chunk(3, dim=-1)
        self.keys[:, :, p] = k.reshape(b, self.heads, self.d)
        self.values[:, :, p] = v.reshape(b, self.heads, self.d)
        y = F.scaled_dot_product_attention(q.reshape(b, self.heads, 1, self.d),
                                           self.keys[:, :, :p + 1], self.values[:, :, :p + 1])
        return h + self.att.out(y.reshape(b, c))


def _gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


@torch.no_grad()
def sample_cached(net, shape: tuple[int, int, int], cond_codes=None, labels=None,
                  temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """``net``: a ``GatedPixelCNN``. The same contract as its ``sample``: [B, H, W] codes."""
    def draw(i: int, j: int, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax((logits / temperature).double(), dim=1)
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)

    return _raster(net, shape, cond_codes, labels, draw)


@torch.no_grad()
def sample_values(net, shape: tuple[int, int, int], cond: torch.Tensor | None, draw) -> torch.Tensor:
    """``net``: a ``GatedPixelCNN`` over real values (``inputs`` > 0), ``cond`` its conditioning
    map as ``forward_values`` takes it. Raster order: ``draw(i, j, outputs [B, outputs])`` -> the
    values [B, inputs] placed at position (i, j) -> [B, H, W, inputs]."""
    return _raster(net, shape, None, None, draw, cond=cond)


@torch.no_grad()
def cached_logits(net, codes: torch.Tensor, cond_codes=None, labels=None, cond=None) -> torch.Tensor:
    """The logits [B, K, H, W] the cached sampler computes when it is handed ``codes`` [B, H, W]
    (or values [B, H, W, inputs] with their ``cond``) position by position (teacher forcing):
    ``net(codes, ...)``'s (``net.forward_values``'), up to float rounding."""
    out = []

    def given(i: int, j: int, logits: torch.Tensor) -> torch.Tensor:
        out.append(logits)
        return codes[:, i, j]

    _raster(net, tuple(codes.shape[:3]), cond_codes, labels, given, cond=cond)
    return torch.stack(out, -1).unflatten(-1, codes.shape[1:3])


def _embed(net, t: torch.Tensor) -> torch.Tensor:
    """Codes [...] or values [..., inputs] -> their embedding [..., C] (the net's first step)."""
    if isinstance(net.embed, torch.nn.Embedding):
        return net.embed(t)
    return F.linear(t, net.embed.weight[:, :, 0, 0], net.embed.bias)


def _raster(net, shape, cond_codes, labels, pick, cond=None) -> torch.Tensor:
    """Every position in raster order: its logits [B, K] from the layers' kept state, then
    ``pick(i, j, logits)`` -> the codes [B] (values [B, inputs]) placed there."""
    b, hgt, wid = shape
    weight = net.embed.weight
    layers = net.layers
    device, c = weight.device, layers[0].h_out.weight.shape[0]
    k = layers[0].k
    kh, half = k // 2 + 1, k // 2
    values = not isinstance(net.embed, torch.nn.Embedding)
    codes = (torch.zeros((*shape, weight.shape[1]), dtype=weight.dtype, device=device) if values
             else torch.zeros(shape, dtype=torch.long, device=device))
    if cond is None:
        cond = net.condition(cond_codes)
    label_bias = [layer.label(labels)[:, :, None, None] if layer.label is not None and labels is not None else None
                  for layer in layers]
    # per layer, as matrices: the horizontal convolution over its window (C x kh, flattened as
    # the window is), and h_out and skip fused (both read the gated horizontal output)
    h_weight = [layer.h_conv.weight.reshape(2 * c, c * kh) for layer in layers]
    out_weight = [torch.cat([layer.h_out.weight, layer.skip.weight]).reshape(2 * c, c) for layer in layers]
    out_bias = [torch.cat([layer.h_out.bias, layer.skip.bias]) for layer in layers]
    head1, head2 = net.head[1], net.head[3]
    kv = {int(i): _KVCache(att, b, hgt, wid, weight) for i, att in net.attention.items()}
    # vertical inputs of each layer: the last kh rows, zero above the map and beside it
    v_rows = [weight.new_zeros(b, c, kh, wid + 2 * half) for _ in layers]
    # the vertical term of each layer's horizontal stack for the row being drawn (row 0: none)
    v_term = [layer.v_to_h.bias[None, :, None].expand(b, -1, wid) for layer in layers]
    for i in range(hgt):
        extra = []  # per layer: the conditioning of row i [B, 4C, 1, W] (or None)
        for l, layer in enumerate(layers):
            e = None
            if layer.cond is not None and cond is not None:  # (a map of one row and column: the same everywhere)
                e = layer.cond(cond[:, :, i:i + 1] if cond.shape[2] > 1 else cond).expand(b, -1, 1, wid)
            if label_bias[l] is not None:
                e = label_bias[l] if e is None else e + label_bias[l]
            extra.append(e)
        row_h = [v_term[l] + extra[l][:, 2 * c:, 0] if extra[l] is not None else v_term[l] for l in range(len(layers))]
        # horizontal inputs of row i, kh - 1 zero columns on the left; layer 0's is the embedded
        # codes shifted right by one (position j sees the codes before it only)
        h_in = [weight.new_zeros(b, c, kh + wid) for _ in layers]
        for j in range(wid):
            h = skip = None
            for l, layer in enumerate(layers):
                pre = F.linear(h_in[l][:, :, j:j + kh].reshape(b, c * kh), h_weight[l], layer.h_conv.bias) + row_h[l][:, :, j]
                out, s = F.linear(_gate(pre), out_weight[l], out_bias[l]).chunk(2, dim=1)
                h = out if layer.first else out + h_in[l][:, :, kh - 1 + j]
                if l in kv:
                    h = kv[l].step(h, i * wid + j)
                skip = s if skip is None else skip + s
                if l + 1 < len(layers):
                    h_in[l + 1][:, :, kh - 1 + j] = h
            logits = F.linear(F.relu(F.linear(F.relu(skip + h), head1.weight[:, :, 0, 0], head1.bias)),
                              head2.weight[:, :, 0, 0], head2.bias)
            drawn = pick(i, j, logits)
            codes[:, i, j] = drawn
            h_in[0][:, :, kh + j] = _embed(net, drawn)
        # row i is drawn: row i of every vertical stack, and the vertical term of row i + 1
        new = F.pad(_embed(net, codes[:, i]).transpose(1, 2), (half, half))[:, :, None]  # [B, C, 1, W + 2 half]
        for l, layer in enumerate(layers):
            v_rows[l] = torch.cat([v_rows[l][:, :, 1:], new], dim=2)
            v_pre = layer.v_conv(v_rows[l])  # [B, 2C, 1, W]
            v_term[l] = layer.v_to_h(v_pre)[:, :, 0]
            bias_v = extra[l][:, :2 * c] if extra[l] is not None else 0
            new = F.pad(_gate(v_pre + bias_v), (half, half))
    return codes
