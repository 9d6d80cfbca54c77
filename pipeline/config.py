"""The one configuration schema of the pipeline (pydantic), YAML loading and overrides.

Every section forbids unknown keys and checks types strictly, so a typo or a wrong type
fails before any work starts, with one line naming the dotted key.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class DataConfig(_Section):
    dataset: Literal["mnist5k", "mnist", "fashion_mnist", "cifar10", "imagefolder"] = "mnist5k"
    root: str = "data"  # where torchvision datasets live or are downloaded to; the folder for imagefolder
    image_size: int = Field(32, ge=8)  # images are padded (if smaller) or resized to this square size
    channels: Optional[Literal[1, 3]] = None  # imagefolder only: 1 = grayscale, 3 = RGB (default 3)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)  # of the training images, held out for validation
    test_fraction: float = Field(0.1, gt=0, lt=0.5)  # datasets without a test split (mnist5k, imagefolder)
    split_seed: int = 0
    download: bool = True  # try torchvision's download when the files are not under root
    limit: Optional[int] = Field(None, ge=1)  # keep at most this many images per split (tiny runs)


class ClusterConfig(_Section):
    address: Optional[str] = None  # None: start a local Ray; "auto" or "ray://host:10001": join one
    num_workers: int = Field(2, ge=1)  # Ray Train workers (DDP processes)
    use_gpu: bool = False  # NCCL + one GPU per worker when true, gloo on CPU otherwise
    cpus_per_worker: float = Field(1.0, gt=0)
    storage_path: str = "ray_results"  # Ray Train checkpoints; must be shared storage on a multi-node cluster
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint (-1: unlimited)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"  # Ray Train workers over nodes


class TrackingConfig(_Section):
    uri: str = "sqlite:///mlruns.db"  # MLflow tracking URI (relative sqlite paths are made absolute)
    experiment: str = "hvae"
    artifact_location: str = "mlartifacts"  # used when the experiment is created


class Stage1Config(_Section):
    model: Literal["vqvae2"] = "vqvae2"
    levels: int = Field(2, ge=1, le=3)  # 1 = VQ-VAE, 2 = VQ-VAE-2, 3 = three maps
    hidden: int = Field(64, ge=4)
    res_hidden: int = Field(32, ge=1)
    res_blocks: int = Field(2, ge=0)
    embed_dim: int = Field(64, ge=1)
    codebook_size: Union[int, list[int]] = 512  # one per level (top first) or one for all
    beta: float = Field(0.25, ge=0)  # commitment weight
    decay: float = Field(0.99, gt=0, lt=1)  # EMA gamma of the codebook
    kmeans_init: bool = True  # initialise each codebook by k-means on its first batch
    dead_code_threshold: float = Field(0.0, ge=0)  # restart codes whose EMA count falls below this (0: off)
    likelihood: Literal["dlogistic", "bernoulli"] = "dlogistic"
    num_mixtures: int = Field(5, ge=1)  # discretized logistic mixture components
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)  # global batch, split across workers
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(0.0, ge=0)  # max gradient norm (0: off)
    seed: int = 0
    recon_images: int = Field(32, ge=1)  # validation images shown in figures/reconstructions.png

    @model_validator(mode="after")
    def _codebooks(self):
        if isinstance(self.codebook_size, list) and len(self.codebook_size) != self.levels:
            raise ValueError(
                f"codebook_size lists {len(self.codebook_size)} sizes for {self.levels} levels"
            )
        sizes = self.codebook_size if isinstance(self.codebook_size, list) else [self.codebook_size]
        if any(k < 2 for k in sizes):
            raise ValueError("codebook_size must be >= 2")
        return self


class ExtractConfig(_Section):
    batch_size: int = Field(256, ge=1)
    num_actors: int = Field(1, ge=1)  # Ray Data actors holding the encoder


class PriorsConfig(_Section):
    hidden: int = Field(64, ge=4)
    layers: int = Field(6, ge=1)
    kernel: int = Field(5, ge=3)
    class_conditional: bool = False
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0


class SampleConfig(_Section):
    num_samples: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)  # prior logits are divided by this
    seed: int = 0
    pixels: Literal["mean", "sample"] = "mean"  # decoder mean, or a draw from the pixel likelihood


class EvaluateConfig(_Section):
    batch_size: int = Field(256, ge=1)


class PipelineConfig(_Section):
    data: DataConfig = DataConfig()
    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()
    stage1: Stage1Config = Stage1Config()
    extract: ExtractConfig = ExtractConfig()
    priors: PriorsConfig = PriorsConfig()
    sample: SampleConfig = SampleConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @model_validator(mode="after")
    def _sizes(self):
        factor = 2 ** (self.stage1.levels + 1)
        if self.data.image_size % factor:
            raise ValueError(
                f"data.image_size={self.data.image_size} must be a multiple of {factor} "
                f"for stage1.levels={self.stage1.levels}"
            )
        return self


# ---- loading -------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-3 as a string; accept the exponent forms people write for rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass

def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            parts.append(f"{key}: unknown key")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{key}: {msg} (got {e.get('input')!r})" if e["type"] != "value_error" else f"{key}: {msg}")
    return "config error: " + "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. stage1.epochs=3)")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"config error: {'.'.join(path[: i + 1])} is not a section (override {text!r})")
            node = nxt
        node[path[-1]] = value
    return raw


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> PipelineConfig:
    """Read a YAML config (or the defaults when path is None), apply key=value overrides, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = _yaml(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
    raw = apply_overrides(raw, list(overrides))
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def to_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
