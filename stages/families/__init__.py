"""Model families: one module in this package per family of the registry
(``hvae.settings.families.FAMILIES``), found by name.

A family's config section (``settings/families.py``) says what the config must know of it:
its name, its keys, which stages of the graph apply to it, its image-size factor. Its module
here says the rest: how to build, save and load the model, the training task of stage 1, its
figures, how it samples and how it evaluates. Stages and the pipeline ask the family; nothing
else branches on the model name.

Adding a family = one model file in ``models/``, its section in ``settings/families.py``
(with its registry entry), one module here, one config in ``configs/``. Importing this
package imports no torch (hooks import it when called).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable

from hvae.settings.families import DEFAULT, FamilySection, names

__all__ = ["DEFAULT", "names"]
# a scorer's per-image -log p(x) (an array over the batch's images, in their order): kept per image
# for standard errors and paired differences, where every other sum is added up over the batches
IMAGE_NATS = "image_nats"
WEIGHTS_FILE = "{name}.pt"  # model/<family>.pt, beside model/config.json
CONFIG_FILE = "config.json"


class Family:
    """The interface a family module implements as ``FAMILY = SomeFamily()``."""

    title: str = ""  # what the model is, for people
    Config: type[FamilySection] = FamilySection  # its config section (hvae.settings.families)
    figures_note: str = ""  # what its stage-1 figures show
    # read from its section, where the config reads them too:
    name: str = ""  # the value of stage1.model, and the name of its config section
    stages: tuple[str, ...] = ()  # the stages of hvae.settings.graph that apply to it, in order
    epoch_metrics: str = ""  # regex alternatives of the extra per-epoch stage-1 metrics it reports

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.name, cls.stages, cls.epoch_metrics = cls.Config.name, cls.Config.stages, cls.Config.epoch_metrics

    # ---- config ---------------------------------------------------------------------
    def section(self, cfg):
        """This family's config section of a PipelineConfig."""
        return getattr(cfg, self.name)

    # ---- model ----------------------------------------------------------------------
    def model_config(self, cfg, channels: int) -> dict:
        """The model's constructor arguments, saved as model/config.json."""
        raise NotImplementedError

    def build(self, model_config: dict):
        raise NotImplementedError

    def param_counts(self, cfg, channels: int, num_classes: int) -> dict[str, int]:
        """Trainable parameters of every model the config trains, by what it is (``--dry-run``:
        the models are built on the meta device, no memory, no data)."""
        import torch

        with torch.device("meta"):
            return {"stage1": count_params(self.build(self.model_config(cfg, channels)))}

    def describe(self, model_config: dict) -> tuple[str, str]:
        """(model name, structure) for tables, e.g. ("VQ-VAE-2 (K=64/128) + ...", "2 levels, K=64/128")."""
        raise NotImplementedError

    # ---- stages ---------------------------------------------------------------------
    def task(self, cfg) -> tuple[type, dict]:
        """Stage 1's TrainTask class (an ImageTask) and its extra constructor arguments."""
        raise NotImplementedError

    def figures(self, model, data, cfg, folder: Path, val_sums: dict) -> dict[str, float]:
        """Stage 1's figures (written into ``folder``) from the last epoch's validation sums
        (``val_sums``: its TrainTask's val_step sums, added up over the training workers) and a
        few validation images of ``data`` (a stages.data.DataSpec); returns metrics they computed.
        The driver runs it: it must not pass over the data."""
        raise NotImplementedError

    def sampler(self, model, upstream: dict[str, Path], scfg) -> "OnDevice":
        """Built on the driver, run on Ray workers: (first, count) -> images ``first`` to
        ``first + count`` of the samples, drawn from a generator seeded by ``chunk_seed``:
        (images uint8 [count, C, H, W], codes per level (may be empty), labels or None), on the CPU."""
        raise NotImplementedError

    def scorer(self, model, upstream: dict[str, Path], ecfg) -> "OnDevice":
        """Built on the driver, run in the evaluate stage's actors: (uint8 images [B, C, H, W],
        labels [B], the batch's first source index) -> its sums (floats or arrays) and every
        image's total nats under ``IMAGE_NATS`` ([B]; ``add_up`` puts the batches' together)."""
        raise NotImplementedError

    def summary(self, sums: dict, dims: int, ecfg) -> dict[str, float]:
        """The test metrics from every batch's sums added up: test_nll_nats, test_nll_bpd (with
        test_iw_samples when estimated), their parts."""
        raise NotImplementedError


class OnDevice:
    """A function of some torch modules, built on the driver (which holds the upstream files)
    and shipped whole to a Ray worker, which moves it to its device: ``to(device)`` moves the
    modules; a call moves its tensor arguments there and gives ``fn(*args, **modules, **kwargs)``
    (which returns host values). Random draws follow their CPU generators (models/noise.py),
    so a seed gives the same result on any device."""

    def __init__(self, fn: Callable, modules: dict, **kwargs):
        import torch

        self.fn, self.modules, self.kwargs, self.device = fn, dict(modules), kwargs, torch.device("cpu")

    def to(self, device) -> "OnDevice":
        import torch

        self.device = torch.device(device)
        self.modules = {k: m.to(self.device).eval() for k, m in self.modules.items()}
        return self

    def __call__(self, *args):
        import torch

        args = [a.to(self.device) if torch.is_tensor(a) else a for a in args]
        with torch.no_grad():
            return self.fn(*args, **self.modules, **self.kwargs)


def add_up(total: dict, part: dict) -> dict:
    """Add one batch's sums (floats or arrays) into ``total``; its per-image values (``IMAGE_NATS``)
    are appended."""
    import numpy as np

    for k, v in part.items():
        if k == IMAGE_NATS:
            total[k] = np.concatenate([total[k], v]) if k in total else np.asarray(v)
        else:
            total[k] = total[k] + v if k in total else v
    return total


def chunk_seed(seed: int, first: int) -> int:
    """The seed of the samples from index ``first`` on (``seed`` itself for the first chunk)."""
    return seed + 1_000_003 * first


def worker_device(use_gpu: bool):
    """The device of a Ray worker the stage asked a GPU for (``use_gpu``), else the CPU."""
    import torch

    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def get(name: str) -> Family:
    if name not in names():
        raise KeyError(f"no model family {name!r} (families: {', '.join(names())})")
    return importlib.import_module(f"{__name__}.{name}").FAMILY


def of(cfg) -> Family:
    """The family a config trains (its stage1.model)."""
    return get(cfg.stage1.model)


def module_of(name: str) -> str:
    return f"{__name__}.{name}"


def model_args(name: str, **changes) -> dict:
    """The constructor arguments of family ``name``'s model as its stage builds them at the
    config's defaults (one channel, 32x32 images), with ``changes``: keys of its section or
    ``likelihood``/``num_mixtures`` change the config first (so what follows from them, such as
    the default downsampling of more levels, follows); any other key replaces its argument as
    given. The models have no defaults of their own: this is how a notebook, a test or a
    benchmark builds one."""
    from hvae.settings.config import load_config

    cfg = load_config(None, [f"stage1.model={name}"])
    own = getattr(cfg, name)
    section = {k: changes.pop(k) for k in list(changes) if k in type(own).model_fields}
    stage1 = {k: changes.pop(k) for k in list(changes) if k in ("likelihood", "num_mixtures")}
    cfg = cfg.model_copy(update={name: own.model_copy(update=section), "stage1": cfg.stage1.model_copy(update=stage1)})
    return {**get(name).model_config(cfg, changes.get("in_channels", 1)), **changes}


# ---- a trained stage-1 model on disk ------------------------------------------------

def save_model(family: Family, model, model_config: dict, folder: Path) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / WEIGHTS_FILE.format(name=family.name))
    (folder / CONFIG_FILE).write_text(json.dumps({"family": family.name, **model_config}, indent=2))


def load_model(folder: Path):
    """Rebuild a trained stage-1 model from its ``model/`` folder -> (family, model in eval mode)."""
    from ..base import load_weights

    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    family = get(config.pop("family", "vqvae2"))  # (models saved before families had no tag)
    model = family.build(config)
    weights = Path(folder) / WEIGHTS_FILE.format(name=family.name)
    load_weights(model, weights)
    return family, model.eval()
