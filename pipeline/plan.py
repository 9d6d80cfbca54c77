"""What a pipeline run will do, before it does it: the stages of the config's model family
(``settings.graph``), each with its fingerprint, and per stage whether it is reused, resumed
from a checkpoint or run. Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass

from hvae.stages import checkpoints, families

from hvae.settings import graph
from .fingerprint import code_hash, stage_fingerprint
from hvae.settings.base import ConfigError


@dataclass
class PlannedStage:
    stage: graph.Stage
    fingerprint: str

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def checkpoint_name(self) -> str:
        return f"{self.stage.name}-{self.fingerprint}"

    def renewed(self, made: set[str]) -> list[str]:
        """The stages this one reads that the pipeline makes anew (``made``), in pipeline order:
        its checkpoints were made from earlier runs of them, so it must not resume from those."""
        return [u for u in graph.names() if u in self.stage.upstream and u in made]


def plan(cfg, data_fp: str, until: str | None = None, pinned: dict[str, str] | None = None) -> list[PlannedStage]:
    """The stages that apply to the config's model family (up to ``until``), each with its fingerprint.

    A fingerprint hashes the stage's config sections (the family's own section for stage 1),
    the data, the upstream fingerprints and the source the stage and the family run.
    ``pinned``: stages whose fingerprint is given (an earlier run's, whatever code made it):
    the stages after them chain on from those."""
    family = families.of(cfg)
    data_slice = cfg.data.model_dump(mode="json", exclude={"root", "download"})
    fps: dict[str, str] = {}
    out = []
    for st in graph.for_family(family):
        cfg_slice = {s: getattr(cfg, s).model_dump(mode="json", exclude=st.not_in_fingerprint.get(s))
                     for s in st.sections}
        cfg_slice["data"] = data_slice
        code = code_hash([st.module, families.module_of(family.name)])
        fps[st.name] = (pinned or {}).get(st.name) or stage_fingerprint(st.name, cfg_slice, [fps[u] for u in st.upstream],
                                                                        data_fp, code)
        out.append(PlannedStage(st, fps[st.name]))
        if st.name == until:
            break
    return out


def stages_from(name: str) -> list[str]:
    """``name`` and every stage after it (what ``--force name`` re-runs)."""
    names = list(graph.names())
    if name not in names:
        raise ConfigError(f"--force {name}: unknown stage (stages: {', '.join(names)})")
    return names[names.index(name):]


def action(cfg, planned: PlannedStage, forced: set[str], tracker, chosen: dict[str, str | None]) -> str:
    """What the run will do with a stage: reuse <run>, resume from epoch N, or run. ``chosen``:
    the run this pipeline uses of each earlier stage (None: one it makes anew), the stage's own added here."""
    renewed = planned.renewed({u for u, run_id in chosen.items() if run_id is None})
    found = None
    if planned.name not in forced and tracker is not None and not renewed:
        found = tracker.find_finished(planned.name, planned.fingerprint, {u: chosen[u] for u in planned.stage.upstream})
    chosen[planned.name] = found.info.run_id if found is not None else None
    if planned.name in forced:
        return "run (forced)"
    if found is not None:
        return f"reuse {found.info.run_id}"
    found = checkpoints.newest(cfg.cluster.storage_path, planned.checkpoint_name)
    if found is None:
        return "run"
    if renewed:  # (its checkpoints were made from an earlier run of the stage before)
        return f"run (its checkpoints moved aside: {' and '.join(renewed)} run{'s' if len(renewed) == 1 else ''} again)"
    if found.step is None:
        return f"resume after epoch {found.epoch + 1} (from {found.describe()})"
    return f"resume in epoch {found.epoch + 1} at batch {found.step} (from {found.describe()})"


def describe(cfg, stages: list[PlannedStage], forced: set[str], tracker) -> list[str]:
    """``--dry-run``: the family's stage graph, then per stage what the run would do."""
    family = families.of(cfg)
    lines = [f"model family: {family.name} ({family.title})", "stage graph:"]
    lines += [f"    {line}" for line in graph.describe(family)]
    lines += [f"    {name:<9} not applicable to {family.name}" for name in graph.not_applicable(family)]
    lines.append("stages:")
    chosen: dict[str, str | None] = {}
    lines += [f"  {p.name:<9} {action(cfg, p, forced, tracker, chosen)}  (fingerprint {p.fingerprint})" for p in stages]
    return lines
