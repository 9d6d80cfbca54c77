"""The ``hvae`` command line (also ``python -m pipeline``).

    hvae run [CONFIG] [key=value ...] [--dry-run]
    hvae ui [--port 5000] [--uri sqlite:///mlruns.db]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from .config import ConfigError, load_config


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """The first item is the config file unless it is a key=value override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_run(args) -> int:
    config_path, overrides = _split_args(args.items)
    cfg = load_config(config_path, overrides)
    from .runner import run_pipeline

    return run_pipeline(cfg, dry_run=args.dry_run, config_path=config_path)


def cmd_ui(args) -> int:
    from .tracking import resolve_uri

    uri = resolve_uri(args.uri)
    print(f"MLflow UI for {uri} at http://127.0.0.1:{args.port} (Ctrl-C stops it)")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
    return subprocess.call(cmd, env=env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hvae", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline on a config")
    run.add_argument("items", nargs="*", metavar="CONFIG | key=value",
                     help="a YAML config (optional, first), then dotted overrides like stage1.epochs=3")
    run.add_argument("--dry-run", action="store_true", help="print the resolved config and the stages, run nothing")
    run.set_defaults(func=cmd_run)

    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--uri", default="sqlite:///mlruns.db", help="tracking URI (default: ./mlruns.db)")
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (hvae run CONFIG --dry-run a.b=1): argparse leaves them over
    if extra and hasattr(args, "items") and all("=" in e and not e.startswith("-") for e in extra):
        args.items += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}" if not str(exc).startswith("config error") else str(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
