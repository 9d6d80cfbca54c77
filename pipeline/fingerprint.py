"""Stage fingerprints: a hash of what a stage's output depends on.

fingerprint = hash(stage name, the stage's config slice, upstream fingerprints,
                   data fingerprint, hash of the source the stage runs)

The source is computed, not listed: the stage's module and its model family's module, and
every module of ``models/`` and ``stages/`` they import, transitively (imports inside
functions included; read from the source with ``ast``, nothing is imported). The family
registry finds families by name at run time, so a stage never depends on another family's
code: editing ``models/nvae.py`` changes the NVAE's fingerprints, not the VQ-VAE-2's.
``pipeline/`` is the product around the stages and is not followed: what it feeds a stage is
already in the fingerprint as the config slice and the data fingerprint.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # holds models/, stages/, pipeline/
FOLLOWED = ("models", "stages")  # the packages whose code shapes a stage's output


def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path, module: str, root: Path) -> set[str]:
    """Project modules that the file imports (absolute and relative, top level and in functions)."""
    st = path.stat()
    return _parsed_imports(path, module, root, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1024)
def _parsed_imports(path: Path, module: str, root: Path, mtime_ns: int, size: int) -> frozenset[str]:
    """``_imports``, parsed once per version of the file (every stage's hash walks the same files)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import y
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # from pkg import submodule
    return frozenset(m for m in found if m.split(".")[0] in FOLLOWED and _module_file(m, root) is not None)


def source_files(modules: list[str], root: Path = ROOT) -> list[str]:
    """Every project file the given modules run, relative to ``root``, sorted."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = _module_file(module, root)
        if path is None:
            raise FileNotFoundError(f"module {module} is not in {root}")
        seen[module] = path
        parent = module.rpartition(".")[0]
        todo += [parent] if parent and parent not in seen else []  # a package's __init__ runs first
        todo += sorted(_imports(path, module, root) - set(seen))
    return sorted(p.relative_to(root).as_posix() for p in seen.values())


def code_hash(modules: list[str], root: Path = ROOT) -> str:
    h = hashlib.sha256()
    for rel in source_files(modules, root):
        h.update(rel.encode())
        h.update((root / rel).read_bytes())
    return h.hexdigest()[:16]


def stage_fingerprint(stage: str, config_slice: dict, upstream: list[str], data_fp: str, code: str) -> str:
    blob = json.dumps(
        {"stage": stage, "config": config_slice, "upstream": upstream, "data": data_fp, "code": code},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
