"""Stage fingerprints: a hash of what a stage's output depends on.

fingerprint = hash(stage name, the stage's config slice, upstream fingerprints,
                   data fingerprint, hash of the source the stage runs)

The source is computed, not listed: the stage's module and its model family's module, and
every module of the package they import, transitively, in any layer (imports inside functions
included; read from the source with ``ast``, nothing is imported). The family registry finds
families by name at run time, so a stage never depends on another family's code: editing
``models/nvae.py`` changes the NVAE's fingerprints, not the VQ-VAE-2's. Stages import nothing
of ``hvae.pipeline`` (a test holds the layers), so the product around them is not hashed: what
it feeds a stage is already in the fingerprint as the config slice and the data fingerprint.

What a file imports is kept on disk (``imports.json`` in the user's cache folder, keyed by the
module and the sha256 of the file's bytes, so an edit is parsed again): a reused run's plan no
longer parses the same files with ``ast`` every time (0.1 s of it on 2 cores).
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the package hvae: holds models/, stages/, pipeline/
PACKAGE = "hvae"
FOLLOWED = (PACKAGE,)  # the code that can shape a stage's output: all of it that the stage imports


def _module_file(module: str, root: Path) -> Path | None:
    """The file of ``hvae.<path>`` under ``root`` (the folder the package hvae stands in)."""
    top, _, rest = module.partition(".")
    if top != PACKAGE:
        return None
    base = root.joinpath(*rest.split(".")) if rest else root
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


CACHE_ENTRIES = 4096  # the import cache keeps this many (file version, module) entries, the newest


def cache_file() -> Path:
    """Where what each file imports is kept between runs: ``$XDG_CACHE_HOME/hvae/imports.json``
    (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hvae" / "imports.json"


class _ImportCache:
    """{"<module>:<sha256 of its file>:all": every name it imports}, read from
    ``cache_file()`` once per process and written back (whole, by a rename) when it grew. A
    cache that cannot be read or written is no error: the files are parsed."""

    def __init__(self):
        self.path, self.entries, self.grew = None, {}, False

    def imports(self, text: bytes, path: Path, module: str) -> list[str]:
        if self.path != cache_file():
            self.path, self.entries, self.grew = cache_file(), self._read(cache_file()), False
        # every name the file imports, whatever is followed ("all": entries of older versions
        # kept only the followed packages' modules)
        key = f"{module}:{hashlib.sha256(text).hexdigest()}:all"
        if key not in self.entries:
            self.entries[key] = sorted(named_imports(text, path, module))
            self.grew = True
        return [m for m in self.entries[key] if _followed(m)]

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            entries = json.loads(path.read_text())
            return entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):
            return {}

    def save(self) -> None:
        if not self.grew or self.path is None:
            return
        self.entries = dict(list(self.entries.items())[-CACHE_ENTRIES:])
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)
            self.grew = False
        except OSError:
            tmp.unlink(missing_ok=True)


_CACHE = _ImportCache()


def _imports(path: Path, module: str, root: Path) -> set[str]:
    """Project modules that the file imports (absolute and relative, top level and in functions)."""
    return {m for m in _CACHE.imports(path.read_bytes(), path, module) if _module_file(m, root) is not None}


def _followed(name: str) -> bool:
    return any(name == f or name.startswith(f"{f}.") for f in FOLLOWED)


def named_imports(text: bytes, path: Path, module: str) -> set[str]:
    """Every name the source ``text`` of ``module`` imports, made absolute (``from a import b``
    gives ``a`` and ``a.b``, since ``b`` may be a module); top level and inside functions alike."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(text, str(path))):
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
    return found


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
    _CACHE.save()
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
