"""The one configuration schema of the pipeline (pydantic), YAML loading and overrides.

Every section forbids unknown keys and checks types strictly, so a typo or a wrong type
fails before any work starts, with one line naming the dotted key. Each model family has its
own section (``vqvae2:``, ``nvae:``, ``vae:``, ``pixelvae:``: ``settings/families.py``); the
stages' and the product's sections are here.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from . import families, graph
from .base import ConfigError, PixelCNNKernel, Section, uneven_batch

__all__ = ["ConfigError", "PipelineConfig", "load_config", "to_yaml", "set_key"]


class DataConfig(Section):
    dataset: Literal["mnist5k", "mnist", "fashion_mnist", "cifar10", "imagefolder"] = "mnist5k"
    root: str = "data"  # where torchvision datasets live or are downloaded to; the folder for imagefolder
    image_size: int = Field(32, ge=8)  # images are padded (if smaller) or resized to this square size
    channels: Optional[Literal[1, 3]] = None  # imagefolder only: 1 = grayscale, 3 = RGB (default 3)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)  # of the training images, held out for validation (mnist has its own)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)  # datasets without a test split (mnist5k, imagefolder)
    split_seed: int = 0
    download: bool = True  # try torchvision's download when the files are not under root
    limit: Optional[int] = Field(None, ge=1)  # keep at most this many images per split (tiny runs)
    # CPUs each Ray Data read-and-decode task reserves. 0: decoding shares the CPUs the training
    # workers hold (a machine whose CPUs all train); on a cluster with CPUs to spare, e.g. 1
    decode_cpus: float = Field(0.0, ge=0)
    # training stages: keep the decoded split in Ray's object store (true) or decode it every
    # epoch (false); unset: keep it when it is at most 1 GiB
    in_memory: Optional[bool] = None
    # imagefolder: an image that cannot be read stops the run naming it (fail), or every image is
    # checked once when the dataset is prepared and the unreadable ones are left out, counted
    # and listed in the prepared folder's bad_images.txt (skip)
    on_bad_image: Literal["fail", "skip"] = "fail"
    # binarized images (the MNIST likelihood tables are on binarized MNIST, in nats per image):
    # each pixel drawn as 255 with probability pixel/255, else 0. static: one draw of every
    # image, made when the dataset is prepared; dynamic: a fresh draw of every training image
    # every epoch, validation and test drawn once (as the papers do). The draws are seeded by
    # binarize_seed (and the image's index, the epoch, the worker). Needs stage1.likelihood=bernoulli
    binarize: Literal["none", "static", "dynamic"] = "none"
    binarize_seed: int = 0


class ClusterConfig(Section):
    address: Optional[str] = None  # None: start a local Ray; "auto" or "ray://host:10001": join one
    # Ray Train workers (DDP processes); auto: the layout of the Ray this run starts or joins
    # (pipeline.raycluster.resolve_layout), setting cpus_per_worker too: one worker per GPU, or
    # on CPUs one worker per node with all of its CPUs as threads
    num_workers: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = 2
    use_gpu: bool = False  # NCCL + one GPU per worker when true, gloo on CPU otherwise
    cpus_per_worker: float = Field(1.0, gt=0)
    storage_path: str = "ray_results"  # Ray Train checkpoints; must be shared storage on a multi-node cluster
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint (-1: unlimited)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"  # Ray Train workers over nodes
    # seconds a stage waits for the Ray cluster to hold what it asks for (an autoscaling cluster
    # adds nodes) before it gives up with one line naming the resource; unset: 0 for the local
    # Ray a run starts (nothing will come), 600 for a cluster it joins
    resource_timeout_s: Optional[float] = Field(None, ge=0)
    connect_timeout_s: float = Field(10.0, gt=0)  # the Ray cluster at address must answer within this


class TrainConfig(Section):
    """How every training stage runs (the one training loop): the numerics of its steps."""

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # forward under autocast; fp16 adds a GradScaler
    compile: bool = False  # torch.compile the model (the first steps pay for compiling)
    channels_last: bool = False  # NHWC weights and activations (faster convolutions on GPUs)
    # gradients of this many batches summed per optimizer step: the stage's batch_size is then
    # a micro-batch and the effective global batch is batch_size x accumulate_steps
    accumulate_steps: int = Field(1, ge=1)
    # optimizer steps over which the LR rises linearly from lr/warmup_steps to lr; after it, a
    # cosine decay to lr/10 at the last step (the schedule moves every optimizer step)
    warmup_steps: int = Field(0, ge=0)
    # a step checkpoint every this many batches inside an epoch (0: at epoch ends only); a run
    # killed mid-epoch resumes at the next batch, exactly as if it had not stopped; a multiple
    # of accumulate_steps (checkpoints are taken at optimizer steps)
    checkpoint_every_steps: int = Field(0, ge=0)
    # the weights a training stage hands on: best = the epoch with the lowest validation loss
    # (the task's select_metric; the run's tag hvae.kept says which epoch), last = the last epoch
    keep: Literal["best", "last"] = "best"

    @model_validator(mode="after")
    def _checkpoints_at_updates(self):
        if self.checkpoint_every_steps % self.accumulate_steps:
            raise ValueError(f"checkpoint_every_steps={self.checkpoint_every_steps} must be a multiple of "
                             f"accumulate_steps={self.accumulate_steps} (checkpoints are taken at optimizer steps)")
        return self


class TrackingConfig(Section):
    uri: str = "sqlite:///mlruns.db"  # MLflow tracking URI (relative sqlite paths are made absolute)
    experiment: str = "hvae"
    # where a new experiment keeps artifacts; unset: the tracking server's artifact store
    # (mlflow-artifacts:, outlives the cluster), or mlartifacts/ beside a SQLite store's file
    artifact_location: Optional[str] = None
    timeout_s: float = Field(10.0, gt=0)  # an MLflow server (http[s]:// uri) must answer within this, or the run stops


class Stage1Config(Section):
    """Training keys every model family shares; the model's own keys are in its section
    (``vqvae2:``, ``nvae:``, ``vae:``, ``pixelvae:``: the family named by ``model``)."""

    model: str = families.DEFAULT  # the model family (settings/families.py: FAMILIES) and its config section
    likelihood: Literal["dlogistic", "bernoulli"] = "dlogistic"
    num_mixtures: int = Field(5, ge=1)  # discretized logistic mixture components
    # training steps before the discretized logistic's channel coefficients (G from R, B from R
    # and G) act: until then every channel's mean must come from the latents (unset: 500 for
    # RGB images, 0 otherwise; models/likelihoods.CoefficientWarmup, bench/rgb.py)
    coeff_warmup_steps: Optional[int] = Field(None, ge=0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)  # global batch, split across workers
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(0.0, ge=0)  # max gradient norm (0: off)
    seed: int = 0
    recon_images: int = Field(32, ge=1)  # validation images shown in figures/reconstructions.png

    def coeff_warmup(self, channels: int) -> int:
        """stage1.coeff_warmup_steps, its unset value resolved for images of ``channels``."""
        if self.coeff_warmup_steps is not None:
            return self.coeff_warmup_steps
        return 500 if channels == 3 and self.likelihood == "dlogistic" else 0

    @field_validator("model")
    @classmethod
    def _family(cls, v):
        if v not in families.names():
            raise ValueError(f"unknown model family {v!r} (families: {', '.join(families.names())})")
        return v


# Ray Data actors of one CPU (or one GPU with cluster.use_gpu) holding a model; auto: one per CPU
# (GPU) of the Ray cluster, each with at least 4 batches of the split (stages.data.actor_pool)
ActorCount = Union[Annotated[int, Field(ge=1)], Literal["auto"]]


class ExtractConfig(Section):
    batch_size: int = Field(256, ge=1)
    num_actors: ActorCount = "auto"  # Ray Data actors holding the encoder


class PriorsConfig(Section):
    hidden: int = Field(64, ge=4)
    layers: int = Field(6, ge=1)
    kernel: PixelCNNKernel = 5
    class_conditional: bool = False
    # a causal self-attention block after every this many gated layers (0: none); one value
    # for every level or one per level, top first (the VQ-VAE-2 paper: the top prior only)
    attention_every: Union[int, list[int]] = 0
    attention_heads: int = Field(4, ge=1)  # must divide hidden
    dropout: float = Field(0.0, ge=0, lt=1)  # on the attention weights and every gated layer's output

    @model_validator(mode="after")
    def _attention(self):
        every = self.attention_every if isinstance(self.attention_every, list) else [self.attention_every]
        if any(e < 0 for e in every):
            raise ValueError(f"attention_every must be >= 0, got {self.attention_every}")
        if any(every) and self.hidden % self.attention_heads:
            raise ValueError(f"attention_heads={self.attention_heads} must divide hidden={self.hidden}")
        return self
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0


class SampleConfig(Section):
    num_samples: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)  # VQ: prior logits are divided by it; NVAE: prior sigmas multiplied
    # a smaller grid at each of these temperatures too (samples/grid_t<T>.png, report.html): how sharpness trades for variety
    temperatures: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [0.5, 0.8])
    seed: int = 0
    pixels: Literal["mean", "sample"] = "mean"  # decoder mean, or a draw from the pixel likelihood
    # VQ priors: each layer keeps its state and computes only the new position; false: the
    # reference, a forward pass over the whole map per position (the same codes, far slower)
    cached: bool = True
    # images per Ray task (the tasks share the cluster's workers, a GPU each when use_gpu); each
    # draws from its own generator, seeded from (seed, its first image): the images do not
    # depend on how many workers draw them
    batch_size: int = Field(64, ge=1)
    # grayscale digits: the weights of the fixed MNIST classifier (models/digits.py) that scores
    # the samples (sample_confidence, sample_label_entropy); `make classifier` writes
    # data/mnist_classifier.pt. Unset: not scored
    classifier: Optional[str] = None


class EvaluateConfig(Section):
    batch_size: int = Field(256, ge=1)
    iw_samples: int = Field(16, ge=1)  # VAE families: importance samples per test image (1 = the ELBO)
    # VAE families: importance samples drawn in one forward pass (the test batch repeated this many
    # times): K = 1000 costs K / iw_together passes of batch_size x iw_together images
    iw_together: int = Field(8, ge=1)
    num_actors: ActorCount = "auto"  # Ray Data actors holding the model, scoring test batches
    # the split scored: val gives val_* metrics (a check while tuning; hvae report lists test runs only)
    split: Literal["test", "val"] = "test"


SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform")


class SweepConfig(Section):
    """A Ray Tune search over config keys of one training stage (``hvae sweep``)."""

    stage: str = "stage1"  # the training stage each trial runs; its upstream stages run once
    # dotted key -> one of {grid: [..]}, {choice: [..]}, {uniform: [low, high]}, {loguniform: [low, high]}
    space: dict[str, dict[str, list]] = Field(default_factory=dict)
    metric: str = "val_loss"  # reported by the stage every epoch; ASHA compares trials on it
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(1, ge=1)  # samples of the random dimensions (each repeats the whole grid)
    scheduler: Literal["asha", "fifo"] = "asha"  # asha stops poor trials early; fifo runs all to the end
    grace_period: int = Field(1, ge=1)  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)  # ASHA: keep the best 1/reduction_factor at each rung
    max_concurrent_trials: Optional[int] = Field(None, ge=1)  # None: as many as the cluster's CPUs/GPUs fit
    seed: Optional[int] = None  # seeds the random search (None: a different draw each sweep)
    then: Literal["none", "pipeline"] = "none"  # pipeline: run the stages after the sweep from the best trial

    @field_validator("stage")
    @classmethod
    def _training_stage(cls, v):
        if v not in graph.training_stages():
            raise ValueError(f"{v!r} is not a training stage (sweepable: {', '.join(graph.training_stages())})")
        return v

    @model_validator(mode="after")
    def _space(self):
        if not self.space:
            raise ValueError("the search space is empty: add keys such as stage1.lr: {loguniform: [1e-4, 3e-3]}")
        for key, spec in self.space.items():
            if len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
                raise ValueError(f"space.{key} must be one of {{grid|choice|uniform|loguniform: [...]}} (got {spec!r})")
            kind, values = next(iter(spec.items()))
            if not values:
                raise ValueError(f"space.{key}.{kind} is empty")
            if kind in ("uniform", "loguniform"):
                if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                    raise ValueError(f"space.{key}.{kind} must be [low, high] with low < high (got {values!r})")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"space.{key}.loguniform needs low > 0 (got {values!r})")
        if self.num_samples > 1 and all(next(iter(s)) == "grid" for s in self.space.values()):
            raise ValueError("num_samples > 1 with a grid-only space repeats identical trials: set num_samples: 1")
        return self


_warned: set[str] = set()


def _deprecated(message: str) -> None:
    """One line on stderr, once per process."""
    if message not in _warned:
        _warned.add(message)
        print(f"config: {message}", file=sys.stderr)


class _Checks(Section):
    """Checks across sections (the fields come from create_model below, families included)."""

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        """Keys older configs used: each family upgrades its own section, and model keys that
        were kept in ``stage1:`` move to the family's section. One deprecation line each."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in families.names():
            if isinstance(data.get(name), dict):
                data[name], note = families.section_class(name).upgrade(dict(data[name]))
                if note:
                    _deprecated(note)
        if not isinstance(data.get("stage1"), dict):
            return data
        stage1 = dict(data["stage1"])
        name = stage1.get("model", families.DEFAULT)
        if name not in families.names():
            return data  # the field check names it
        fields = families.section_class(name).model_fields
        moved = [k for k in stage1 if k not in Stage1Config.model_fields and k in fields]
        if moved:
            section = dict(data.get(name) or {})
            for key in moved:
                section.setdefault(key, stage1.pop(key))
            data[name], data["stage1"] = section, stage1
            _deprecated(f"deprecated: stage1.{{{','.join(moved)}}} are {name} settings now: read as "
                        f"{name}.<key>; move them to the {name}: section")
        return data

    @property
    def family(self):
        """The model family's section (stage1.model names it): its name, stages, image-size factor."""
        return getattr(self, self.stage1.model)

    @model_validator(mode="after")
    def _root(self):
        """A folder given for the embedded digits would be ignored in silence: say so instead."""
        default = DataConfig.model_fields["root"].default
        if self.data.dataset == "mnist5k" and self.data.root != default:
            raise ValueError(f"data.root={self.data.root} is set, but data.dataset=mnist5k (the embedded digits) "
                             f"reads no files: for a folder of images set data.dataset=imagefolder (or mnist, "
                             f"fashion_mnist, cifar10 for those datasets' files under data.root)")
        return self

    @model_validator(mode="after")
    def _binarized(self):
        if self.data.binarize != "none" and self.stage1.likelihood != "bernoulli":
            raise ValueError(f"data.binarize={self.data.binarize} makes binary images: set "
                             f"stage1.likelihood=bernoulli (it is {self.stage1.likelihood})")
        if self.data.binarize != "none" and self.data.dataset in ("imagefolder", "cifar10"):
            raise ValueError(f"data.binarize={self.data.binarize}: for the grayscale array datasets "
                             f"(mnist5k, mnist, fashion_mnist), not {self.data.dataset}")
        return self

    @model_validator(mode="after")
    def _sizes(self):
        factor, why = self.family.downsampling()
        if self.data.image_size % factor:
            raise ValueError(f"data.image_size={self.data.image_size} must be a multiple of {factor} for {why}")
        every = self.priors.attention_every
        if isinstance(every, list) and "priors" in self.family.stages and len(every) != self.vqvae2.levels:
            raise ValueError(f"priors.attention_every lists {len(every)} values for vqvae2.levels={self.vqvae2.levels}")
        return self

    @model_validator(mode="after")
    def _batches(self):
        """A fixed worker count splits each training stage's global batch exactly (an ``auto``
        count is known once Ray is up: the stage checks it then, ``stages.base.worker_batch``)."""
        workers = self.cluster.num_workers
        if workers == "auto":
            return self
        for stage in ("stage1", "priors"):
            why = uneven_batch(f"{stage}.batch_size", getattr(self, stage).batch_size, workers)
            if why is not None and stage in self.family.stages:
                raise ValueError(why)
        return self

    @model_validator(mode="after")
    def _sweep(self):
        """The sweep fits the family, and every value it can give a key makes a valid config."""
        sweep = self.sweep
        if sweep is None:
            return self
        family = self.family
        if sweep.stage not in family.stages:
            raise ValueError(f"sweep.stage={sweep.stage}: {family.name} has no {sweep.stage} stage "
                             f"(its stages: {', '.join(family.stages)})")
        sections = next(st.sections for st in graph.for_family(family) if st.name == sweep.stage)
        for key in sweep.space:
            if key.split(".")[0] not in sections:
                raise ValueError(f"sweep.space: {key!r} is not a setting of {sweep.stage} "
                                 f"(its sections: {', '.join(sections)})")
        if not graph.epoch_metric(sweep.stage, family, sweep.metric):
            example = "val_bpd" if sweep.stage == "stage1" else "val_bits_per_code"
            raise ValueError(f"sweep.metric {sweep.metric!r} is not reported by {sweep.stage} each epoch "
                             f"(e.g. val_loss, {example})")
        base = self.model_dump(mode="json", exclude={"sweep"})
        for key, spec in sweep.space.items():
            kind, values = next(iter(spec.items()))
            if kind in ("uniform", "loguniform"):  # draws are floats: an integer setting takes grid or choice
                values = [*values, (values[0] + values[1]) / 2.0]
            for value in values:
                try:
                    PipelineConfig.model_validate(set_key(base, key.split("."), value))
                except ValidationError as err:
                    detail = _format_error(err).removeprefix("config error: ")
                    raise ValueError(f"sweep.space.{key}.{kind} value {value!r}: {detail}") from None
        return self


def _section(cls):
    return (cls, Field(default_factory=cls))


# The one schema: the product's sections, each model family's section after stage1, the stages'.
PipelineConfig = create_model(
    "PipelineConfig", __base__=_Checks,
    data=_section(DataConfig), cluster=_section(ClusterConfig), train=_section(TrainConfig),
    tracking=_section(TrackingConfig),
    stage1=_section(Stage1Config), **{name: _section(families.section_class(name)) for name in families.names()},
    extract=_section(ExtractConfig), priors=_section(PriorsConfig), sample=_section(SampleConfig),
    evaluate=_section(EvaluateConfig), sweep=(Optional[SweepConfig], None),
)


def set_key(raw: dict, path: list[str], value) -> dict:
    """A deep copy of ``raw`` with the dotted ``path`` set to ``value``."""
    import copy

    out = copy.deepcopy(raw)
    node = out
    for i, part in enumerate(path[:-1]):
        if not isinstance(node.get(part, {}), dict):
            raise ConfigError(f"config error: {'.'.join(path[: i + 1])} is not a section")
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return out


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

def _near(loc: tuple) -> str | None:
    """The known key closest to an unknown one (``stage1.epochz`` -> ``epochs``), if any is close."""
    import difflib

    model = PipelineConfig
    for part in loc[:-1]:
        field_ = getattr(model, "model_fields", {}).get(part)
        model = field_.annotation if field_ is not None else None
    names = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    return close[0] if close else None


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if not key and e["type"] == "value_error":  # a check across sections names its keys itself
            parts.append(e["msg"].removeprefix("Value error, "))
            continue
        key = key or "config"
        if e["type"] == "extra_forbidden":
            near = _near(e["loc"])
            parts.append(f"{key}: unknown key" + (f" (did you mean {near}?)" if near else ""))
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


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping, with ``extends: other.yaml`` (relative to it) merged underneath."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (extended by {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} extends itself (through {', '.join(map(str, seen))})")
    try:
        raw = _yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path}{where}: not valid YAML: {what}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"config error: extends: must be a file name (in {path})")
    return _merge(_read(path.parent / parent, (*seen, path.resolve())), raw)


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> PipelineConfig:
    """Read a YAML config (or the defaults when path is None), apply key=value overrides, validate."""
    raw: dict = _read(Path(path)) if path is not None else {}
    raw = apply_overrides(raw, list(overrides))
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def to_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def active_yaml(cfg: PipelineConfig) -> str:
    """The config as it applies: the model family's own section and not the others', no section
    of a stage the family does not run, no sweep section unless there is one."""
    family = cfg.family
    left_out = {name for name in families.names() if name != family.name} | set(graph.not_applicable(family))
    if cfg.sweep is None:
        left_out.add("sweep")
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude=left_out), sort_keys=False)


TRAINING_SEEDS = ("stage1.seed", "priors.seed")  # what `hvae run --seeds N` varies


def setup_key(cfg: PipelineConfig, data_fingerprint: str) -> str:
    """The config without its training seeds and without where it runs (cluster, tracking, sweep,
    the data's folder: its fingerprint stands for it): runs with the same key differ in seed alone,
    and ``hvae report`` gives their mean ± s.d."""
    import hashlib
    import json

    raw = cfg.model_dump(mode="json")
    for key in ("cluster", "tracking", "sweep"):
        raw.pop(key, None)
    raw["data"].pop("root", None)
    raw["data_fingerprint"] = data_fingerprint
    for path in TRAINING_SEEDS:
        section, name = path.split(".")
        raw.get(section, {}).pop(name, None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]
