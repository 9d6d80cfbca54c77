"""Random draws that follow their generator: drawn on the generator's device (the CPU for a CPU
generator), then moved to where they are used. A seeded CPU generator then gives the same
samples and the same importance-sampling estimates on a CPU and on a GPU worker; without a
generator, the draw is made where it is used."""
from __future__ import annotations

import torch


def _where(generator: torch.Generator | None, device) -> torch.device:
    return generator.device if generator is not None else torch.device(device)


def uniform(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=_where(generator, device), dtype=dtype).to(device)


def normal(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=_where(generator, device), dtype=dtype).to(device)
