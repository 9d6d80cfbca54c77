"""The base of every config section (pydantic), torch-free; the families' sections build on it."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


class Section(BaseModel):
    """A config section: unknown keys and wrong types fail, naming the dotted key."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)
