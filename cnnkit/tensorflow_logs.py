"""Keep TensorFlow's start-up chatter out of cnnkit's output.

Importing TensorFlow prints lines that mean nothing to a user of cnnkit, on every command: absl's
"All log messages before absl::InitializeLog()", the CUDA stub's "Could not find cuda drivers" and,
on a machine without a GPU, an error-level "failed call to cuInit". Some of them are written by
C++ code before TensorFlow's own log level applies, straight to the process's standard error.

:func:`quiet_tensorflow` (called by the ``cnnkit`` command unless ``--verbose``) raises TensorFlow's
C++ log level to errors-only-and-above-fatal (``TF_CPP_MIN_LOG_LEVEL=3``), turns its Python loggers
down to errors, and silences file descriptor 2 while the ``tensorflow`` package itself is being
imported, whenever that happens (an import hook: commands that never need TensorFlow never import
it). A Python exception raised by the import still reaches the user, after standard error is back.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any


@contextlib.contextmanager
def silenced_stderr() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the duration (C and C++ writes included)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader: Any):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with silenced_stderr():
            self.loader.exec_module(module)
        for name in ("tensorflow", "absl", "h5py._conv"):
            logging.getLogger(name).setLevel(logging.ERROR)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` like the other finders do, and imports it with standard error silenced."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None,
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


def quiet_tensorflow() -> None:
    """Hide TensorFlow's log lines below errors and its import-time chatter (see the module docstring)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return  # already imported: nothing left to hide
    if not any(isinstance(finder, _QuietTensorFlowFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())
