"""Where the time of one `hvae run` goes: the work, and the orchestration around it.

    .venv/bin/python bench/overhead.py [CONFIG] [key=value ...]     (default: configs/default.yaml)

Runs `hvae run` in a fresh temporary folder (nothing reused) and reads back from MLflow the
clocks every stage keeps: the training workers' (per epoch: training steps, time blocked on
data, validation, the previous epoch's checkpoint and reports; once: the start-up from the
driver's fit call to a built model on every worker), the driver's (Ray start, the fit call,
figures, artifact upload and download, each stage's wall time). The work of the stages
that are not training loops (encoding, sampling, scoring) is measured again here, in this
one process on the same artifacts and threads: what a script with no orchestration would
spend on it. Orchestration is the run's wall time minus all of the work. Last, two fits of a
function that does nothing, on the run's layout, measure how much of the Train start-ups is
Ray Train's own fixed cost.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from common import config_and_overrides, curve, fresh_run, metrics, record  # noqa: E402


def _compute(cfg, artifacts: dict[str, Path]) -> dict[str, float]:
    """Seconds of the work of extract, sample and evaluate, done in this process."""
    import numpy as np
    import torch

    from hvae.pipeline import datasets
    from hvae.stages.families import load_model

    data = datasets.prepare(cfg.data, cfg.cluster.storage_path)
    family, model = load_model(artifacts["stage1"] / "model")
    out = {}
    if "extract" in artifacts:
        t0 = time.perf_counter()
        with torch.no_grad():
            for split in ("train", "val", "test"):
                x = torch.from_numpy(data.read_all(split)["image"])
                for i in range(0, len(x), cfg.extract.batch_size):
                    model.encode(x[i:i + cfg.extract.batch_size])
        out["extract"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sampler = family.sampler(model, artifacts, cfg.sample)
    n, size = cfg.sample.num_samples, cfg.sample.batch_size
    for first in range(0, n, size):
        sampler(first, min(size, n - first))
    out["sample"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scorer = family.scorer(model.eval(), artifacts, cfg.evaluate)
    test = data.read_all("test")
    for i in range(0, len(test["label"]), cfg.evaluate.batch_size):
        scorer(torch.from_numpy(np.array(test["image"][i:i + cfg.evaluate.batch_size])),
               torch.from_numpy(test["label"][i:i + cfg.evaluate.batch_size]), i)
    out["evaluate"] = time.perf_counter() - t0
    return out


def main(argv: list[str]) -> int:
    from hvae.settings.config import load_config
    from hvae.pipeline.runner import resolve_paths

    config, overrides = config_and_overrides(argv)
    with fresh_run(config, overrides) as (tmp, total, client, runs):

        def history(run, key):
            return curve(client, run, key)

        artifacts = {s: Path(client.download_artifacts(r.info.run_id, "", f"{tmp}/in/{s}")) for s, r in runs.items()}
        cwd = os.getcwd()
        os.chdir(tmp)  # (the config's relative paths, as the run saw them)
        try:
            cfg = resolve_paths(load_config(config, overrides))
            torch_threads(cfg)
            compute = _compute(cfg, artifacts)
            floor = _train_floor(cfg, f"{tmp}/floor")
        finally:
            os.chdir(cwd)

    work, over = [], []  # (what, seconds)
    stage_walls, moved = 0.0, 0.0  # (moved: artifacts logged to MLflow and downloaded by the next stages)
    for stage, run in sorted(runs.items(), key=lambda kv: kv[1].info.start_time):
        m = metrics(run)
        wall = m[f"{stage}_seconds"]
        stage_walls += wall + m.get("upload_seconds", 0.0) + m.get("download_seconds", 0.0)
        over += [(f"{stage}: Ray start", m["ray_connect_seconds"])] if m.get("ray_connect_seconds", 0) > 0.5 else []
        moved += m.get("download_seconds", 0.0) + m.get("upload_seconds", 0.0)
        if "fit_seconds" in m:
            epochs, waits = history(run, "epoch_seconds"), sum(history(run, "data_wait_s"))
            val, reports, startup = sum(history(run, "val_seconds")), sum(history(run, "report_seconds")), \
                history(run, "startup_seconds")[0]
            entered = history(run, "entered_seconds")[0]
            work += [(f"{stage}: training steps ({len(epochs)} epochs)", sum(epochs) - waits),
                     (f"{stage}: validation", val)]
            rest = m["fit_seconds"] - startup - sum(epochs) - val - reports
            over += [(f"{stage}: Train start-up: the fit call to the training function's first line (Ray Train)",
                      entered),
                     (f"{stage}: Train start-up: model built, checkpoint looked for, optimizer made", startup - entered),
                     (f"{stage}: blocked on data in the epochs (Ray Data)", waits),
                     (f"{stage}: checkpoints and per-epoch reports (MLflow from the worker)", reports),
                     (f"{stage}: the last report and the worker group's teardown", rest),
                     (f"{stage}: on the driver (datasets, figures, saving the model)",
                      wall - m["fit_seconds"] - m.get("ray_connect_seconds", 0.0))]
        else:
            done = compute[stage]
            work += [(f"{stage}: its computation (in one process)", done)]
            over += [(f"{stage}: Ray tasks or Ray Data around it", wall - m.get("ray_connect_seconds", 0.0) - done)]
    over += [("every stage: artifacts logged to MLflow and downloaded by the next", moved),
             ("CLI start, imports, data preparation, MLflow parent run, summary, shutdown", total - stage_walls)]
    worked = sum(s for _, s in work)
    starts = [s for w, s in over if "(Ray Train)" in w]
    rows = [f"| work | {w} | {s:.1f} | {100 * s / total:.1f} % |" for w, s in work]
    rows += [f"| orchestration | {w} | {s:.1f} | {100 * s / total:.1f} % |" for w, s in over]
    cmd = " ".join(["python bench/overhead.py", os.path.relpath(config, ROOT), *overrides])
    stem = Path(config).stem
    record("overhead" if stem == "default" else f"overhead_{stem}", cmd, "\n".join([
        f"`hvae run` took **{total:.0f} s**: work {worked:.0f} s, orchestration **{total - worked:.0f} s = "
        f"{100 * (total - worked) / total:.0f} %** of the run.", "",
        "| kind | what | s | of the run |", "|---|---|---|---|", *rows, "",
        f"Ray Train's own part of the start-ups: after the run, in a new Ray started the same way, "
        f"{len(floor)} fits of a function that does nothing, on the run's layout "
        f"({floor[0][2]}), took {', '.join(f'{entry:.1f}' for entry, _, _ in floor)} s from the fit call to "
        f"the function's first line ({', '.join(f'{whole:.1f}' for _, whole, _ in floor)} s the whole fit): "
        f"**{sum(e for e, _, _ in floor):.1f} s**, against the run's {sum(starts):.1f} s to its training function. "
        "Each fit starts new processes one after another (its controller, the worker group, its "
        "helpers and, with datasets, their manager), each importing Ray and Ray Train. In the part "
        "after it, the optimizer's first parameter group imports `torch._dynamo` (any `torch.optim` "
        "optimizer does, once per process).",
    ]))
    return 0


def _train_floor(cfg, storage: str, fits: int = 2) -> list[tuple[float, float, str]]:
    """Ray Train's fixed cost: ``fits`` TorchTrainer fits of a function that only writes down the
    time it started (rank 0, in the local folder ``storage``), on ``cfg``'s layout in a Ray started as the pipeline starts it ->
    [(seconds from the fit call to that first line, seconds of the whole fit, the layout)]."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from hvae.pipeline import raycluster

    raycluster.connect(cfg.cluster)
    try:
        cluster = raycluster.resolve_layout(cfg.cluster)
        layout = f"{cluster.num_workers} worker{'s' if cluster.num_workers != 1 else ''} × " \
                 f"{cluster.cpus_per_worker:g} CPU"
        out = []
        for i in range(fits):
            mark = Path(storage) / f"entered{i}"
            t0 = time.time()
            TorchTrainer(
                _entered, train_loop_config={"mark": str(mark)}, torch_config=TorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
                scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu,
                                             resources_per_worker={"CPU": cluster.cpus_per_worker}),
                run_config=RunConfig(name=f"floor{i}", storage_path=storage)).fit()
            out.append((float(mark.read_text()) - t0, time.time() - t0, layout))
        return out
    finally:
        raycluster.shutdown()


def _entered(config: dict) -> None:
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        Path(config["mark"]).write_text(repr(time.time()))


def torch_threads(cfg) -> None:
    """This process computes with as many threads as one worker of the run had."""
    import torch

    from hvae.pipeline.raycluster import layout_for

    cluster = layout_for(cfg.cluster, [{"CPU": float(os.cpu_count())}]) if cfg.cluster.num_workers == "auto" \
        else cfg.cluster
    torch.set_num_threads(max(1, int(cluster.cpus_per_worker)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
