"""A local filesystem for Tune's experiment folder in which a file is either its old whole self
or its new whole self, never empty.

Tune writes a sweep's state (``experiment_state-*.json``, ``basic-variant-state-*.json``, each
trial's ``params.pkl``) in a staging folder and copies that folder to ``cluster.storage_path``
every snapshot (``pyarrow.fs.copy_files``: every file truncated, then written). A driver killed in
the middle of a copy left those files empty, and the next ``hvae sweep`` could not restore the
sweep (``EOFError`` from Tune). Through this filesystem each copied file is written beside its
destination and renamed over it when whole; a kill leaves the previous snapshot's file and a
hidden ``.*.partial`` file that Tune's globs do not match.
"""
from __future__ import annotations

import io
import os
import uuid

import pyarrow
import pyarrow.fs as pafs


class _Published(io.FileIO):
    """A file written under a temporary name and renamed to its real one when closed."""

    def __init__(self, path: str):
        head, name = os.path.split(path)
        self._final = path
        super().__init__(os.path.join(head, f".{name}.{uuid.uuid4().hex[:8]}.partial"), "wb")

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        os.replace(self.name, self._final)


class WholeFiles(pafs.FileSystemHandler):
    """pyarrow's local filesystem, but whose output streams replace their file when closed."""

    def __init__(self):
        self._local = pafs.LocalFileSystem()

    def __reduce__(self):  # (Tune sends the filesystem to its trial actors)
        return WholeFiles, ()

    def __eq__(self, other):
        return isinstance(other, WholeFiles)

    def __ne__(self, other):
        return not self == other

    def get_type_name(self):
        return "local-whole-files"

    def normalize_path(self, path):
        return self._local.normalize_path(path)

    def get_file_info(self, paths):
        return self._local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self._local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self._local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self._local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of the root folder")

    def delete_file(self, path):
        self._local.delete_file(path)

    def move(self, src, dest):
        self._local.move(src, dest)

    def copy_file(self, src, dest):
        with self._local.open_input_stream(src) as source, self.open_output_stream(dest, None) as sink:
            sink.upload(source)

    def open_input_stream(self, path):
        return self._local.open_input_stream(path)

    def open_input_file(self, path):
        return self._local.open_input_file(path)

    def open_append_stream(self, path, metadata):
        return self._local.open_append_stream(path)

    def open_output_stream(self, path, metadata):
        return pyarrow.PythonFile(_Published(path), mode="w")


def storage(storage_path: str) -> tuple[pafs.FileSystem | None, str]:
    """-> (filesystem, path) for Tune's ``storage_filesystem`` and ``storage_path``: a local
    ``cluster.storage_path`` (a folder or ``file://``) goes through :class:`WholeFiles`; a
    bucket is left to pyarrow (an object appears only once its upload completes)."""
    if storage_path.startswith("file://"):
        storage_path = storage_path[len("file://"):]
    elif "://" in storage_path:
        return None, storage_path
    return pafs.PyFileSystem(WholeFiles()), os.path.abspath(storage_path)
