"""Stage fingerprints: a hash of what a stage's output depends on.

fingerprint = hash(stage name, the stage's config slice, upstream fingerprints,
                   data fingerprint, hash of the source files the stage runs)
An edit to a stage's own module or to the models it uses changes its fingerprint; an
edit elsewhere (the CLI, the README) does not.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # holds models/, stages/, pipeline/


def code_hash(paths: list[str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(paths):
        h.update(rel.encode())
        h.update((ROOT / rel).read_bytes())
    return h.hexdigest()[:16]


def stage_fingerprint(stage: str, config_slice: dict, upstream: list[str], data_fp: str, code: str) -> str:
    blob = json.dumps(
        {"stage": stage, "config": config_slice, "upstream": upstream, "data": data_fp, "code": code},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
