"""Artifact manifests: every stage output folder lists its files with size and sha256.

A consumer verifies the files it downloads against the manifest (and the rest of a run it only
reuses, by size against the store's listing); a missing or altered file is reported by name,
and the run is not used.
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


def read_manifest(folder: Path) -> dict[str, dict]:
    """The files a folder's manifest lists: {path: {"size", "sha256"}}."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{MANIFEST} is missing")
    try:
        return json.loads(path.read_text())["files"]
    except (ValueError, KeyError):
        raise ManifestError(f"{MANIFEST} is not a valid manifest") from None


def verify_manifest(folder: Path, only: list[str] | None = None) -> dict[str, dict]:
    """Every file of the manifest (or those in ``only``) present in ``folder`` with its size and
    sha256 -> the manifest's files; else ManifestError naming the first that is not."""
    folder = Path(folder)
    files = read_manifest(folder)
    for rel in files if only is None else only:
        want, f = files[rel], folder / rel
        if not f.is_file():
            raise ManifestError(f"{rel} is missing")
        check_size(rel, f.stat().st_size, want)
        if _sha256(f) != want["sha256"]:
            raise ManifestError(f"{rel} does not match its sha256 in the manifest")
    return files


def check_listing(files: dict[str, dict], listed: dict[str, int]) -> None:
    """A store's listing ({path: size}) holds every file of the manifest at its size."""
    for rel, want in files.items():
        if rel not in listed:
            raise ManifestError(f"{rel} is missing")
        check_size(rel, listed[rel], want)


def check_size(rel: str, size: int, want: dict) -> None:
    if size != want["size"]:
        raise ManifestError(f"{rel} has {size} bytes, the manifest says {want['size']}")
