"""Why a bare ``kernels``, ``tasks`` or ``pipelines`` never means this checkout's folders.

quantfab's three packages live at the repo root and install as ``quantfab.kernels`` etc. The root itself
still lands on ``sys.path`` in processes we do not start: Prefect imports a deployment's module entrypoint
with the flow run's working directory (the checkout) inserted in front of ``sys.path``
(``prefect.utilities.importtools.load_module``), and ``python -m ...`` from the root does the same. Then
transformers' ``import kernels`` (Hugging Face's package) would load our folder instead. No interpreter
flag or job setting removes Prefect's insertion, so each folder's ``__init__`` checks the name it was
imported under and, when it is the bare one, hands the import to :func:`hand_over`, which loads what the
environment holds under that name without the checkout on the path (or raises ModuleNotFoundError, as if
the checkout were not there).

This file is run by path (``runpy``) from those ``__init__`` files, because in that situation the
``quantfab`` package may not be the one on the path.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib.machinery import PathFinder
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def off_checkout(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() != CHECKOUT
    except OSError:
        return True


def hand_over(name: str) -> None:
    """Make ``sys.modules[name]`` the module ``name`` resolves to on ``sys.path`` minus the checkout."""
    spec = PathFinder.find_spec(name, [entry for entry in sys.path if off_checkout(entry)])
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r} (this checkout's {name}/ is quantfab.{name})", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
