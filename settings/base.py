"""The base of every config section (pydantic), torch-free; the families' sections build on it."""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


def uneven_batch(key: str, batch_size: int, workers: int) -> str | None:
    """Why a global batch ``batch_size`` (the setting ``key``) cannot train on ``workers``, or
    None: each worker takes exactly ``batch_size / workers`` images, so that a stage trains the
    same batch (the one its fingerprint hashes) on any worker count."""
    if batch_size % workers == 0:
        return None
    below = batch_size - batch_size % workers
    fits = max(d for d in range(1, workers + 1) if batch_size % d == 0)
    choices = [f"{key}={n}" for n in (below, below + workers) if n > 0]
    return (f"{key}={batch_size} does not split evenly over cluster.num_workers={workers} (each worker takes an "
            f"equal share of the global batch): set {' or '.join(choices)}, or cluster.num_workers={fits}")


class Section(BaseModel):
    """A config section: unknown keys and wrong types fail, naming the dotted key."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


def _odd(kernel: int) -> int:
    if kernel % 2 == 0:
        raise ValueError(f"must be odd (a gated PixelCNN's causal window), got {kernel}")
    return kernel


# a gated PixelCNN's convolution width (the priors', a PixelVAE decoder's)
PixelCNNKernel = Annotated[int, Field(ge=3), AfterValidator(_odd)]
