"""The base of every config section (pydantic), torch-free; the families' sections build on it."""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


class Section(BaseModel):
    """A config section: unknown keys and wrong types fail, naming the dotted key."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


def _odd(kernel: int) -> int:
    if kernel % 2 == 0:
        raise ValueError(f"must be odd (a gated PixelCNN's causal window), got {kernel}")
    return kernel


# a gated PixelCNN's convolution width (the priors', a PixelVAE decoder's)
PixelCNNKernel = Annotated[int, Field(ge=3), AfterValidator(_odd)]
