"""Artifact manifests: every stage output folder lists its files with size and sha256.

A consumer verifies the manifest after download; a missing or altered file is reported
by name, and the run is not used.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"


class ManifestError(RuntimeError):
    """An artifact folder that does not match its manifest; the message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> dict:
    folder = Path(folder)
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            files[f.relative_to(folder).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    manifest = {"files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_manifest(folder: Path) -> None:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{MANIFEST} is missing")
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError):
        raise ManifestError(f"{MANIFEST} is not a valid manifest") from None
    for rel, want in files.items():
        f = folder / rel
        if not f.is_file():
            raise ManifestError(f"{rel} is missing")
        if f.stat().st_size != want["size"]:
            raise ManifestError(f"{rel} has {f.stat().st_size} bytes, the manifest says {want['size']}")
        if _sha256(f) != want["sha256"]:
            raise ManifestError(f"{rel} does not match its sha256 in the manifest")
