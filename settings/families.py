"""The config section of each model family, and the registry that names every family.

A family's section holds its model keys (training keys stay in ``stage1:``) and the facts the
config needs about the family without importing it: its name, the stages that apply to it, the
per-epoch metrics its stage 1 reports, what its image size must divide by, and the keys older
configs used. The family's code (``hvae.stages.families.<name>``) reads them from here.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Optional, Union

from pydantic import Field, model_validator

from .base import PixelCNNKernel, Section


def default_downsample(levels: int) -> list[int]:
    """A VQ-VAE's default factors, top first: the bottom level (last) downsamples the image x4,
    each level above x2 more."""
    return [2] * (levels - 1) + [4]


class FamilySection(Section):
    """What every family's section says about its family (class attributes, not settings)."""

    name: ClassVar[str] = ""  # the value of stage1.model, and the name of this section
    stages: ClassVar[tuple[str, ...]] = ("stage1", "sample", "evaluate")  # of hvae.settings.graph, in order
    epoch_metrics: ClassVar[str] = ""  # regex alternatives of the extra per-epoch stage-1 metrics

    def downsampling(self) -> tuple[int, str]:
        """(factor the image size must be a multiple of, the setting that asks for it)."""
        raise NotImplementedError

    @classmethod
    def upgrade(cls, section: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Keys of this section that older configs used -> (the section as it reads now, a
        one-line deprecation note or ""); raise ValueError for a key that now means another family."""
        return section, ""


class VQVAE2Config(FamilySection):
    """The ``vqvae2:`` section (stage1.model: vqvae2); training keys (epochs, lr, ...) stay in stage1."""

    name: ClassVar[str] = "vqvae2"
    stages: ClassVar[tuple[str, ...]] = ("stage1", "extract", "priors", "sample", "evaluate")
    epoch_metrics: ClassVar[str] = r"commit|mse|perplexity_level\d|dead_codes_level\d|rel_quant_err_level\d"

    levels: int = Field(2, ge=1, le=4)  # 1 = VQ-VAE, 2 = VQ-VAE-2, 3 = three maps (FFHQ-1024)
    # per level, top first: the factor its encoder shrinks its input by (the bottom's input is
    # the image); powers of two; unset: 4 for the bottom and 2 for each level above
    downsample: Optional[list[int]] = None
    hidden: int = Field(64, ge=4)
    res_hidden: int = Field(32, ge=1)
    res_blocks: int = Field(2, ge=0)
    embed_dim: int = Field(64, ge=1)
    codebook_size: Union[int, list[int]] = 512  # one per level (top first) or one for all
    beta: float = Field(0.25, ge=0)  # commitment weight
    decay: float = Field(0.99, gt=0, lt=1)  # EMA gamma of the codebook
    kmeans_init: bool = True  # initialise each codebook by k-means on its first batch
    # and again on the batch of this training step, once the encoder has left its initial scale
    # (0: the first batch only)
    kmeans_at_step: int = Field(50, ge=0)
    dead_code_threshold: float = Field(0.0, ge=0)  # restart codes whose EMA count falls below this (0: off)
    # restart codes whose EMA count falls below this fraction of the mean count (0: off)
    dead_code_fraction: float = Field(0.03, ge=0, lt=1)

    @model_validator(mode="after")
    def _codebooks(self):
        if isinstance(self.codebook_size, list) and len(self.codebook_size) != self.levels:
            raise ValueError(f"codebook_size lists {len(self.codebook_size)} sizes for {self.levels} levels")
        sizes = self.codebook_size if isinstance(self.codebook_size, list) else [self.codebook_size]
        if any(k < 2 for k in sizes):
            raise ValueError("codebook_size must be >= 2")
        if self.downsample is not None:
            if len(self.downsample) != self.levels:
                raise ValueError(f"downsample lists {len(self.downsample)} factors for {self.levels} levels")
            if any(f < 2 or f & (f - 1) for f in self.downsample):
                raise ValueError(f"downsample factors must be powers of two >= 2, got {self.downsample}")
        return self

    def factors(self) -> list[int]:
        """Each level's downsampling factor, top first (the unset default resolved)."""
        return list(self.downsample) if self.downsample is not None else default_downsample(self.levels)

    def downsampling(self) -> tuple[int, str]:
        setting = f"vqvae2.downsample={self.downsample}" if self.downsample is not None else f"vqvae2.levels={self.levels}"
        return math.prod(self.factors()), setting


class NVAEConfig(FamilySection):
    """The ``nvae:`` section (stage1.model: nvae); training keys (epochs, lr, ...) stay in stage1."""

    name: ClassVar[str] = "nvae"
    epoch_metrics: ClassVar[str] = r"recon_bpd|kl_bpd|kl_nats_group\d+"

    hidden: int = Field(32, ge=4)  # channels of both towers
    latent_channels: int = Field(8, ge=1)  # channels of each latent group
    scales: int = Field(2, ge=1, le=4)  # latent scales: image/2 (finest) down to image/2^scales
    groups_per_scale: int = Field(2, ge=1)
    cells_per_group: int = Field(1, ge=1)  # residual cells per group in each tower
    flows: int = Field(0, ge=0)  # inverse autoregressive flow cells in each group's posterior (NVAE with flow)
    kl_warmup: float = Field(0.3, ge=0, le=1)  # fraction of training over which the KL weight rises to 1
    kl_min: float = Field(1e-2, ge=0, le=1)  # the KL weight at the start of warm-up
    kl_balance: bool = True  # NVAE's per-group KL balancing during warm-up
    spectral_weight: float = Field(1e-2, ge=0)  # spectral regularisation of the conv weights

    def downsampling(self) -> tuple[int, str]:
        return 2 ** self.scales, f"nvae.scales={self.scales}"

    @classmethod
    def upgrade(cls, section: dict[str, Any]) -> tuple[dict[str, Any], str]:
        if "residual_posterior" not in section:
            return section, ""
        if section.pop("residual_posterior") is False:
            raise ValueError("nvae.residual_posterior=false is the plain VAE: use stage1.model=vae "
                             "(its settings in the vae: section)")
        return section, "deprecated: nvae.residual_posterior (an NVAE always has it; the plain VAE is stage1.model=vae)"


class VAEConfig(FamilySection):
    """The ``vae:`` section (stage1.model: vae); training keys (epochs, lr, ...) stay in stage1."""

    name: ClassVar[str] = "vae"
    epoch_metrics: ClassVar[str] = r"recon_bpd|kl_bpd|kl_nats_group0"

    hidden: int = Field(32, ge=4)  # channels of encoder and decoder
    latent_channels: int = Field(8, ge=1)  # channels of the latent map (at image/2)
    cells_per_group: int = Field(1, ge=1)  # residual cells in encoder and decoder
    kl_warmup: float = Field(0.3, ge=0, le=1)  # fraction of training over which the KL weight rises to 1
    kl_min: float = Field(1e-2, ge=0, le=1)  # the KL weight at the start of warm-up
    spectral_weight: float = Field(1e-2, ge=0)  # spectral regularisation of the conv weights

    def downsampling(self) -> tuple[int, str]:
        return 2, "stage1.model=vae (one latent scale at image/2)"


class PixelVAEConfig(FamilySection):
    """The ``pixelvae:`` section (stage1.model: pixelvae); training keys stay in stage1."""

    name: ClassVar[str] = "pixelvae"
    epoch_metrics: ClassVar[str] = r"recon_bpd|kl_bpd|kl_nats_group\d+"

    hidden: int = Field(32, ge=4)  # channels of the encoder and of the latents' conditioning network
    latent_channels: int = Field(4, ge=1)  # channels of the latent map z1 (and z2)
    downsample: int = Field(2, ge=0, le=4)  # stride-2 stages to z1: a map at image / 2^downsample
    upsample: bool = True  # the latents reach the PixelCNN upsampled to a map (false: one linear bias per gate)
    levels: int = Field(1, ge=1, le=2)  # 2: the hierarchical PixelVAE (z2 at half z1's size)
    pixel_hidden: int = Field(32, ge=4)  # channels of the PixelCNN decoder
    pixel_layers: int = Field(2, ge=1)  # gated layers of the PixelCNN decoder (few: the latents must carry the shape)
    kernel: PixelCNNKernel = 5  # its convolution width (odd)
    kl_warmup: float = Field(0.3, ge=0, le=1)  # fraction of training over which the KL weight rises to 1
    kl_min: float = Field(0.1, ge=0, le=1)  # the KL weight at the start of warm-up
    free_nats: float = Field(0.0, ge=0)  # per latent level: below this batch-mean KL (nats/image) no KL gradient

    def downsampling(self) -> tuple[int, str]:
        return (2 ** (self.downsample + self.levels - 1),
                f"pixelvae.downsample={self.downsample}, pixelvae.levels={self.levels}")


# The registry: every model family by name (= stage1.model = its section), with its section.
# Its code is the module hvae.stages.families.<name>.
FAMILIES: dict[str, type[FamilySection]] = {
    "nvae": NVAEConfig,
    "pixelvae": PixelVAEConfig,
    "vae": VAEConfig,
    "vqvae2": VQVAE2Config,
}
DEFAULT = "vqvae2"  # the family of a config that names none


def names() -> list[str]:
    """Every family, by name."""
    return sorted(FAMILIES)


def section_class(name: str) -> type[FamilySection]:
    if name not in FAMILIES:
        raise KeyError(f"no model family {name!r} (families: {', '.join(names())})")
    return FAMILIES[name]
