"""The stage graph as data (torch-free): every stage's name, its upstream stages, whether it
trains, the config sections that shape its output, the artifacts it leaves and the metrics it
shows and reports each epoch. The runner, the CLI, ``hvae sweep`` and ``hvae submit`` read it;
``hvae run --dry-run`` prints it. Which stages apply is the model family's to say
(``stages.families``): an NVAE learns its prior in stage 1, so it has no extract or priors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

FAMILY = "<family>"  # in Stage.sections: the config section of the run's model family


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # defines run(ctx) -> StageResult
    summary: str
    sections: tuple[str, ...]  # config sections that shape its output (part of its fingerprint)
    upstream: tuple[str, ...] = ()  # stages whose outputs it reads (when they apply to the family)
    trains: bool = False  # runs a Ray Train TorchTrainer (checkpoints, resume, sweepable)
    on_ray: bool = False  # runs on Ray workers: on a multi-node cluster it needs shared storage
    artifacts: tuple[str, ...] = ()  # what its MLflow run holds (names are part of the interface)
    shown: tuple[str, ...] = ()  # metrics printed in the run's summary line
    printed: str = ""  # an artifact whose text the run's summary prints
    linked: str = ""  # an artifact whose location the run's summary prints
    epoch_metrics: str = ""  # regex alternatives of the metrics it reports every epoch (train_/val_)
    not_in_fingerprint: dict[str, frozenset] = field(default_factory=dict)  # keys that do not shape output
    reads: tuple[str, ...] = ()  # the data's splits it reads, or the config key naming one (its run's dataset inputs)


# train: keys that change speed or resilience, not what is learned
SPEED_ONLY = frozenset({"compile", "channels_last", "checkpoint_every_steps"})

STAGES = (
    Stage("stage1", "hvae.stages.stage1", "train the model family's autoencoder on Ray Train", ("stage1", FAMILY, "train"),
          trains=True, on_ray=True, not_in_fingerprint={"train": SPEED_ONLY}, reads=("train", "val"),
          artifacts=("model/<family>.pt", "model/config.json", "figures/*.png"),
          shown=("val_bpd",), epoch_metrics=r"loss|bpd|nll_nats"),
    Stage("extract", "hvae.stages.extract", "encode every split into code maps with a Ray Data actor pool", (),
          ("stage1",), on_ray=True, artifacts=("codes/{train,val,test}/*.parquet", "codes/schema.json"),
          shown=("rows_train",)),
    Stage("priors", "hvae.stages.priors", "train a gated PixelCNN per code level on Ray Train", ("priors", "train"),
          ("extract", "stage1"), trains=True, on_ray=True, not_in_fingerprint={"train": SPEED_ONLY}, artifacts=("model/prior_level{l}.pt", "model/priors.json"),
          shown=("val_bits_per_code",), epoch_metrics=r"loss|bits_per_code|bits_per_code_level\d|nll_nats_level\d"),
    Stage("sample", "hvae.stages.sample", "draw samples through the hierarchy and decode them", ("sample",),
          ("stage1", "priors"), on_ray=True, artifacts=("samples/grid.png", "samples/samples.npz"), linked="samples/grid.png"),
    Stage("evaluate", "hvae.stages.evaluate", "test NLL (bound or importance-weighted estimate) and its parts",
          ("evaluate",), ("stage1", "priors"), on_ray=True, artifacts=("report/nll_table.md",),
          shown=("test_nll_bpd", "test_nll_nats", "val_nll_bpd", "val_nll_nats"), printed="report/nll_table.md",
          reads=("evaluate.split",),
          not_in_fingerprint={"evaluate": frozenset({"batch_size", "num_actors"})}),
)


def names() -> tuple[str, ...]:
    return tuple(st.name for st in STAGES)


def get(name: str) -> Stage:
    for st in STAGES:
        if st.name == name:
            return st
    raise KeyError(f"unknown stage {name!r} (stages: {', '.join(names())})")


def training_stages() -> tuple[str, ...]:
    return tuple(st.name for st in STAGES if st.trains)


def for_family(family) -> list[Stage]:
    """The stages that apply to ``family``, in order, with its section and only applying upstreams."""
    out = []
    for st in STAGES:
        if st.name not in family.stages:
            continue
        sections = tuple(family.name if s == FAMILY else s for s in st.sections)
        artifacts = tuple(a.replace("<family>", family.name) for a in st.artifacts)
        upstream = tuple(u for u in st.upstream if u in family.stages)
        out.append(replace(st, sections=sections, upstream=upstream, artifacts=artifacts))
    return out


def not_applicable(family) -> list[str]:
    return [st.name for st in STAGES if st.name not in family.stages]


def epoch_metric(stage: str, family, metric: str) -> bool:
    """Whether ``stage`` of ``family`` reports ``metric`` every epoch (what a sweep may compare)."""
    alternatives = get(stage).epoch_metrics
    if stage == "stage1" and family.epoch_metrics:
        alternatives += "|" + family.epoch_metrics
    return bool(alternatives) and re.fullmatch(rf"(train|val)_({alternatives})", metric) is not None


def describe(family) -> list[str]:
    """The graph of ``family`` as lines (``--dry-run``)."""
    lines = []
    for st in for_family(family):
        after = ", ".join(st.upstream) or "data"
        kind = "trains on Ray Train" if st.trains else ("on Ray workers" if st.on_ray else "on the driver")
        lines.append(f"{st.name:<9} <- {after:<15} {kind:<20} {st.summary}; leaves {', '.join(st.artifacts)}")
    return lines
