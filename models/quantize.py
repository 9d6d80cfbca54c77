"""Vector quantizer with an exponential-moving-average codebook (VQ-VAE, van den Oord 2017).

Following the lecture notes:
- q(z = k | x) is one-hot at k = argmin_j ||z_e(x) - e_j||_2;
- the decoder sees e_k, the encoder gets the decoder's gradient straight through;
- the loss adds the commitment term beta * ||z_e - sg[e]||^2 (the codebook term is
  replaced by the EMA update below);
- the codebook is the running k-means of the notes:
      N_i <- gamma * N_i + (1 - gamma) * n_i
      m_i <- gamma * m_i + (1 - gamma) * sum_j z_ij
      e_i  = m_i / N_i
  with N Laplace-smoothed, N_i <- (N_i + eps) / (sum N + K eps) * sum N, so unused codes
  never divide by zero.

Under torch.distributed, n and sum z are all-reduced (summed) over all processes before
the update, so every process ends each step with the same codebook. k-means
initialisation and dead-code restarts are computed on rank 0 and broadcast.

k-means on the first batch sees the untrained encoder's tiny cloud of outputs, which the
first optimizer steps leave behind: within tens of steps most codes are stranded.
``kmeans_at_step`` runs k-means again on the batch of that training step, once the encoder
has found its scale; ``dead_code_fraction`` restarts a code whose EMA count falls below that
fraction of the mean count (the expected count of a code under uniform use), so a stranded
code moves within ``restart_every`` steps, not after the ~70 steps an absolute count of 0.5
takes to decay to.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .precision import fp32


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Plain Lloyd iterations on rows of x; empty clusters keep their previous centre."""
    idx = torch.randperm(x.shape[0], generator=generator, device="cpu")[:k].to(x.device)
    if x.shape[0] < k:  # fewer vectors than codes: repeat them with a little noise
        reps = (k + x.shape[0] - 1) // x.shape[0]
        base = x.repeat(reps, 1)[:k]
        noise = torch.randn(base.shape, generator=generator, device="cpu").to(x.device)
        return base + 0.01 * base.std() * noise
    centres = x[idx].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


class VectorQuantizerEMA(nn.Module):
    """Quantize [B, D, H, W] feature maps against K codes of dimension D."""

    # Left out of torch.compile (whoever compiles the model disables it for modules that say
    # so): compiled, its in-place codebook updates came out wrong (torch 2.14, CPU: the codebook
    # 11 away from eager after one step); it is cheap next to the convolutions.
    not_compiled = True

    def __init__(
        self,
        num_codes: int,
        dim: int,
        *,  # the rest by name: the codebook's settings
        beta: float = 0.25,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.0,
        sync: bool = True,
        restart_every: int = 10,
        kmeans_at_step: int = 0,
        dead_code_fraction: float = 0.0,
    ):
        super().__init__()
        self.num_codes, self.dim = num_codes, dim
        self.beta, self.decay, self.eps = beta, decay, eps
        self.kmeans_iters = kmeans_iters
        self.dead_code_threshold = dead_code_threshold
        self.dead_code_fraction = dead_code_fraction
        self.kmeans_at_step = kmeans_at_step  # > 0: k-means again on the batch of this training step
        self.sync = sync
        self.restart_every = restart_every  # training steps between dead-code checks
        self._steps = 0  # training forwards so far (the same count on every rank)
        embedding = torch.randn(num_codes, dim)
        self.register_buffer("embedding", embedding)
        self.register_buffer("cluster_size", torch.ones(num_codes))  # N
        self.register_buffer("embed_sum", embedding.clone())  # m
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))
        self._known_initialized = False  # read the buffer (a host sync) until it says so

    def get_extra_state(self) -> dict:
        return {"steps": self._steps}  # (in checkpoints: a resumed run checks at the same steps)

    def set_extra_state(self, state: dict) -> None:
        self._steps = int(state["steps"])

    def _load_from_state_dict(self, *args, **kwargs):
        self._known_initialized = False  # the loaded buffer decides again
        super()._load_from_state_dict(*args, **kwargs)

    # ---- distributed helpers -------------------------------------------------------
    def _all_reduce(self, *tensors: torch.Tensor) -> None:
        if self.sync and _distributed():
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def _broadcast(self, t: torch.Tensor) -> None:
        if self.sync and _distributed():
            dist.broadcast(t, src=0)

    # ---- codebook ----------------------------------------------------------------
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (L2) for each row of flat [N, D]."""
        dist2 = (
            flat.pow(2).sum(1, keepdim=True)
            - 2 * flat @ self.embedding.t()
            + self.embedding.pow(2).sum(1)[None, :]
        )
        return dist2.argmin(1)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices [B, H, W] -> code vectors [B, D, H, W]."""
        return F.embedding(codes, self.embedding).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(0)
        centres = _kmeans(flat.detach(), self.num_codes, self.kmeans_iters, g)
        self._broadcast(centres)
        self.embedding.copy_(centres)
        self.embed_sum.copy_(centres)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(codes, self.num_codes).type(flat.dtype)  # [N, K]
        counts = onehot.sum(0)  # n_i
        sums = onehot.t() @ flat  # sum_j z_ij, [K, D]
        self._all_reduce(counts, sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        return counts

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor) -> None:
        """Move codes whose EMA count fell below the threshold onto random encoder outputs (rank
        0's, when synced). Called every ``restart_every`` steps: its one host sync and, only when
        a code is dead, its one broadcast stay off the other steps. ``dead`` needs no broadcast:
        the counts behind it are all-reduced, the same bits on every rank."""
        dead = self.cluster_size < self.dead_code_threshold
        if self.dead_code_fraction > 0:
            dead |= self.cluster_size < self.dead_code_fraction * self.cluster_size.mean()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        fresh = flat[pick].clone()
        self._broadcast(fresh)
        self.embedding[dead] = fresh
        self.embed_sum[dead] = fresh
        self.cluster_size[dead] = 1.0
        self.restarts += n_dead

    # ---- forward -----------------------------------------------------------------
    @fp32  # distances, assignments and the EMA codebook in float32 under any autocast
    def forward(self, z: torch.Tensor):
        """z: [B, D, H, W] -> (z_q with straight-through gradient, codes [B, H, W], loss, stats)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.training and not self._known_initialized:
            if not bool(self.initialized):  # a host sync, until the codebook is known initialised
                self._kmeans_init(flat)
            self._known_initialized = True
        if self.training and self.kmeans_at_step > 0 and self._steps == self.kmeans_at_step:
            self._kmeans_init(flat)
        codes = self.nearest(flat.detach())
        z_q = self.embed(codes.view(b, h, w))  # the codebook that chose the codes
        if self.training:
            counts = self._ema_update(flat.detach(), codes)
            if (self.dead_code_threshold > 0 or self.dead_code_fraction > 0) and self._steps % self.restart_every == 0:
                self._restart_dead(flat.detach())
            self._steps += 1
        else:
            counts = torch.bincount(codes, minlength=self.num_codes).to(flat.dtype)
        codes = codes.view(b, h, w)
        commitment = F.mse_loss(z, z_q.detach(), reduction="none").flatten(1).sum(1)
        loss = self.beta * commitment  # per image
        if z.requires_grad:
            z_q = z + (z_q - z).detach()  # straight-through estimator
        # without gradients z_q stays the exact code vectors, so decoding codes reproduces it
        # usage: code counts of this step (summed over ranks in training), for epoch statistics
        # the relative quantisation error ||z - e||^2 / ||z||^2 from these two sums: the raw
        # commitment grows with the encoder's scale, which says nothing about the codebook's fit
        stats = {"perplexity": perplexity(counts).detach(), "usage": counts.detach(),
                 "quant_err": commitment.detach().sum(), "z_sq": z.detach().float().pow(2).sum()}
        return z_q, codes, loss, stats


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code distribution given by ``counts``: the number of codes in
    effective use (1 = collapse, K = uniform over a codebook of K)."""
    probs = counts / counts.sum().clamp(min=1)
    return torch.exp(-(probs * torch.log(probs.clamp(min=1e-12))).sum())
