"""Gated PixelCNN over discrete code maps (van den Oord et al. 2016), optionally conditional.

Two stacks remove the blind spot of masked convolutions:
- the vertical stack sees every row above the current one (all columns); its output at
  row i depends on input rows <= i and is shifted down one row before it feeds the
  horizontal stack, so the horizontal stack at (i, j) only learns of rows < i from it;
- the horizontal stack sees the current row to the left: (i, < j) in the first layer,
  (i, <= j) of the previous layer's output afterwards (which itself only knew (i, < j)).
Every layer is a gated unit, tanh(a) * sigmoid(b), with a residual connection on the
horizontal stack (not in the first layer, whose input is the current pixel) and a skip
connection to the output head.

Attention (optional, ``attention_every`` > 0): a causal self-attention block after every
``attention_every`` gated layers, on the horizontal stack, as PixelSNAIL adds them: the
convolutions see a bounded neighbourhood above (12 layers of kernel 5 reach 24 rows up),
attention sees every earlier position. Position (i, j) attends to every (i', j') <= (i, j)
in raster order: the horizontal stack at a position knows only of the positions before it,
so its own entry is safe to read. Queries and keys get the map coordinates (PixelSNAIL's
"background"). ``dropout`` applies to the attention weights and to every gated layer's output.

Conditioning (all optional, added into every gate of both stacks):
- ``cond_codes``: the code map of the level above (embedded, brought to this map's size
  by nearest upsampling and a 3x3 convolution);
- ``labels``: a class label (embedded to a per-channel bias);
- a conditioning map given as it is (``cond_channels``; a PixelVAE's decoded latents).

Over real values instead of codes (``inputs`` > 0, e.g. pixels: ``forward_values``), the
output is whatever ``outputs`` channels the caller reads (a likelihood's parameters).

The output is a categorical over the codebook at every position: logits [B, K, H, W].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def down_shift(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class CausalAttention(nn.Module):
    """Multi-head self-attention over a map in raster order, residual, pre-normalised per
    position (a norm across positions would leak the future)."""

    def __init__(self, channels: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention: {channels} channels do not split into {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.norm = nn.LayerNorm(channels)
        self.position = nn.Linear(2, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = h.shape
        x = h.flatten(2).transpose(1, 2)  # [B, HW, C], raster order
        rows = torch.linspace(-0.5, 0.5, hgt, device=h.device, dtype=x.dtype)
        cols = torch.linspace(-0.5, 0.5, wid, device=h.device, dtype=x.dtype)
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(1, hgt * wid, 2)
        q, k, v = self.qkv(self.norm(x) + self.position(coords)).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, hgt * wid, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = self.out(y.transpose(1, 2).reshape(b, hgt * wid, c))
        return h + y.transpose(1, 2).reshape(b, c, hgt, wid)


class GatedLayer(nn.Module):
    def __init__(self, channels: int, kernel: int, first: bool, cond_channels: int, num_classes: int,
                 dropout: float = 0.0):
        super().__init__()
        self.first = first
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.k = kernel
        kh = kernel // 2 + 1
        self.v_conv = nn.Conv2d(channels, 2 * channels, (kh, kernel))
        self.h_conv = nn.Conv2d(channels, 2 * channels, (1, kh))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.skip = nn.Conv2d(channels, channels, 1)
        self.cond = nn.Conv2d(cond_channels, 4 * channels, 1) if cond_channels else None
        self.label = nn.Embedding(num_classes, 4 * channels) if num_classes else None

    @staticmethod
    def _gate(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(self, v, h, cond=None, labels=None):
        kh = self.k // 2 + 1
        v_pre = self.v_conv(F.pad(v, (self.k // 2, self.k // 2, kh - 1, 0)))  # rows <= i
        h_in = right_shift(h) if self.first else h  # first layer: columns < j only
        h_pre = self.h_conv(F.pad(h_in, (kh - 1, 0, 0, 0))) + self.v_to_h(down_shift(v_pre))
        extra = None
        if self.cond is not None and cond is not None:
            extra = self.cond(cond)
        if self.label is not None and labels is not None:
            lab = self.label(labels)[:, :, None, None]
            extra = lab if extra is None else extra + lab
        bias_v, bias_h = extra.chunk(2, dim=1) if extra is not None else (0, 0)
        v_new = self._gate(v_pre + bias_v)
        gated_h = self.dropout(self._gate(h_pre + bias_h))
        h_new = self.h_out(gated_h) + (0 if self.first else h)
        return v_new, h_new, self.skip(gated_h)


class GatedPixelCNN(nn.Module):
    def __init__(
        self,
        num_codes: int,
        hidden: int = 64,
        layers: int = 6,
        kernel: int = 5,
        *,  # the rest by name: the conditioning, attention and what it models
        cond_codes: int = 0,  # codebook size of the level above (0: unconditional)
        cond_factor: int = 2,  # this map's size / the level above's
        num_classes: int = 0,  # > 0: class-conditional
        attention_every: int = 0,  # a causal attention block after every this many layers (0: none)
        attention_heads: int = 4,
        dropout: float = 0.0,
        inputs: int = 0,  # > 0: the input is a map of this many real values (pixels), not codes
        outputs: int = 0,  # > 0: output channels (e.g. a likelihood's parameters) instead of num_codes logits
        cond_channels: int = 0,  # channels of a conditioning map given to ``forward_values`` as it is
    ):
        super().__init__()
        if kernel % 2 == 0 or kernel < 3:
            raise ValueError("kernel must be odd and >= 3")
        self.num_codes, self.num_classes = num_codes, num_classes
        self.cond_factor = cond_factor
        # codes are embedded; real values (pixels in [-1, 1]) go through a 1x1 convolution
        self.embed = nn.Conv2d(inputs, hidden, 1) if inputs else nn.Embedding(num_codes, hidden)
        cond_ch = hidden if cond_codes else cond_channels
        if cond_codes:
            self.cond_embed = nn.Embedding(cond_codes, hidden)
            self.cond_net = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(hidden, hidden, 3, padding=1))
        self.layers = nn.ModuleList(
            [GatedLayer(hidden, kernel, i == 0, cond_ch, num_classes, dropout) for i in range(layers)]
        )
        # attention[str(i)] follows layer i
        self.attention = nn.ModuleDict(
            {str(i): CausalAttention(hidden, attention_heads, dropout)
             for i in range(layers) if attention_every and (i + 1) % attention_every == 0}
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                                  nn.Conv2d(hidden, outputs or num_codes, 1))

    def condition(self, cond_codes: torch.Tensor | None) -> torch.Tensor | None:
        if cond_codes is None:
            return None
        c = self.cond_embed(cond_codes).permute(0, 3, 1, 2).contiguous()
        c = F.interpolate(c, scale_factor=self.cond_factor, mode="nearest")
        return self.cond_net(c)

    def forward_embedded(self, x: torch.Tensor, cond: torch.Tensor | None = None,
                         labels: torch.Tensor | None = None, return_stacks: bool = False):
        """x: embedded codes [B, C, H, W]; cond: the output of ``condition``."""
        v = h = x
        skip = 0
        stacks = []
        for i, layer in enumerate(self.layers):
            v, h, s = layer(v, h, cond, labels)
            if str(i) in self.attention:
                h = self.attention[str(i)](h)
            skip = skip + s
            stacks.append((down_shift(v), h))
        logits = self.head(skip + h)  # skip connections of every layer plus the last residual stream
        return (logits, stacks) if return_stacks else logits

    def forward_values(self, values: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """A PixelCNN over real values (``inputs`` > 0): values [B, inputs, H, W] and a
        conditioning map [B, cond_channels, H or 1, W or 1] -> outputs [B, outputs, H, W] at each
        position from the values before it (no channel of the position itself)."""
        return self.forward_embedded(self.embed(values), cond)

    def forward(self, codes: torch.Tensor, cond_codes: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, H, W] -> logits [B, K, H, W] of p(code at each position | codes before it)."""
        x = self.embed(codes).permute(0, 3, 1, 2).contiguous()
        return self.forward_embedded(x, self.condition(cond_codes), labels)

    def log_prob(self, codes, cond_codes=None, labels=None) -> torch.Tensor:
        """log p(codes | condition) in nats, per map [B]."""
        logits = self(codes, cond_codes, labels)
        return -F.cross_entropy(logits, codes, reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, shape: tuple[int, int, int], cond_codes=None, labels=None,
               temperature: float = 1.0, generator: torch.Generator | None = None,
               cached: bool = True) -> torch.Tensor:
        """Ancestral sampling in raster order: [B, H, W] code indices. ``cached``: each layer
        keeps its state and computes the new position only (``pixelcnn_cache``); else the
        reference, a forward pass over the whole map per position. The same codes for a seed."""
        if cached:
            from .pixelcnn_cache import sample_cached

            return sample_cached(self, shape, cond_codes, labels, temperature, generator)
        b, hgt, wid = shape
        device = self.embed.weight.device
        codes = torch.zeros(shape, dtype=torch.long, device=device)
        cond = self.condition(cond_codes)
        for i in range(hgt):
            for j in range(wid):
                x = self.embed(codes).permute(0, 3, 1, 2).contiguous()
                logits = self.forward_embedded(x, cond, labels)[:, :, i, j] / temperature
                probs = torch.softmax(logits.double(), dim=1)
                codes[:, i, j] = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
        return codes


class HierarchicalPrior(nn.Module):
    """One PixelCNN per code level: level 0 (top) unconditional, level l conditioned on level l-1.

    ``shapes`` are the code maps' [H, W], top first; ``num_classes`` > 0 makes every level
    class-conditional as well; ``attention_every``: one for all levels or one per level, top
    first (the VQ-VAE-2 paper attends in the top prior only).
    """

    # every setting comes from the priors: section (hvae.stages.priors: prior_config): no
    # defaults here, so the schema's are the only ones
    def __init__(self, *, codebook_sizes: list[int], shapes: list[list[int]], hidden: int, layers: int,
                 kernel: int, num_classes: int, attention_every: int | list[int], attention_heads: int,
                 dropout: float):
        super().__init__()
        self.shapes = [list(s) for s in shapes]
        self.levels = nn.ModuleList()
        every = attention_every if isinstance(attention_every, list) else [attention_every] * len(codebook_sizes)
        for l, k in enumerate(codebook_sizes):
            cond = codebook_sizes[l - 1] if l > 0 else 0
            factor = shapes[l][0] // shapes[l - 1][0] if l > 0 else 1
            self.levels.append(GatedPixelCNN(k, hidden, layers, kernel, cond_codes=cond, cond_factor=factor,
                                             num_classes=num_classes, attention_every=every[l],
                                             attention_heads=attention_heads, dropout=dropout))

    def forward(self, codes: list[torch.Tensor], labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-level negative log-likelihood in nats per map, [B] each (teacher-forced)."""
        return [-prior.log_prob(codes[l], codes[l - 1] if l > 0 else None, labels)
                for l, prior in enumerate(self.levels)]

    @torch.no_grad()
    def sample(self, n: int, labels=None, temperature: float = 1.0, generator=None,
               cached: bool = True) -> list[torch.Tensor]:
        codes: list[torch.Tensor] = []
        for l, prior in enumerate(self.levels):
            h, w = self.shapes[l]
            codes.append(prior.sample((n, h, w), codes[l - 1] if l > 0 else None, labels, temperature, generator,
                                      cached))
        return codes
