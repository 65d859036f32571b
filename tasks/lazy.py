"""Modules imported on first use.

torch and transformers take seconds to import. The recipe schema, cache keys, the store lookup, `plan`
and an up-to-date `quantfab run` need neither, so the modules they reach name them through ``lazy``: the
real import happens (once, under Python's import lock) the first time an attribute is read.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class LazyModule(types.ModuleType):
    """Stands for the module named ``__name__``; every attribute read goes to the imported module."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attr)


def lazy(name: str) -> Any:
    return LazyModule(name)
