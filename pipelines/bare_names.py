"""Why a bare ``kernels``, ``tasks`` or ``pipelines`` never means this checkout's folders.

quantfab's three packages live at the repo root and install as ``quantfab.kernels`` etc. The root itself
still lands on ``sys.path`` in processes we do not start: Prefect imports a deployment's module entrypoint
with the flow run's working directory (the checkout) inserted in front of ``sys.path``
(``prefect.utilities.importtools.load_module``), and ``python -m ...`` from the root does the same. Then
transformers' ``import kernels`` (Hugging Face's package) would load our folder instead. No interpreter
flag or job setting removes Prefect's insertion, so two things keep the names off our folders:

* the first import of any ``quantfab`` package installs a path hook (:func:`hide`) that serves the
  checkout root, wherever it lands on ``sys.path`` and whenever, with a finder that does not see those three
  names, so ``importlib.util.find_spec("kernels")`` (how transformers probes for Hugging Face's package)
  finds Hugging Face's or nothing;
* a bare import that happens before that (something imported transformers first) reaches the folder's
  ``__init__``, which hands it to :func:`hand_over`: it loads what the environment holds under that name
  without the checkout on the path, or raises ModuleNotFoundError, as if the checkout were not there.

This file is run by path (``runpy``) from the three ``__init__`` files (:func:`guard`), because under a
bare name the ``quantfab`` package may not be importable.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES, BYTECODE_SUFFIXES, SOURCE_SUFFIXES, ExtensionFileLoader, FileFinder
from importlib.machinery import PathFinder, SourceFileLoader, SourcelessFileLoader
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
BARE = ("kernels", "tasks", "pipelines")
LOADERS = [(ExtensionFileLoader, EXTENSION_SUFFIXES), (SourceFileLoader, SOURCE_SUFFIXES),
           (SourcelessFileLoader, BYTECODE_SUFFIXES)]


def off_checkout(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() != CHECKOUT
    except OSError:
        return True


def guard(name: str) -> None:
    """Called by each folder's ``__init__`` with the name it is imported under."""
    if name in BARE:
        hand_over(name)
    else:
        hide()


class CheckoutFinder(FileFinder):
    """The checkout root's path-entry finder, blind to the three folders that are quantfab's packages."""

    def find_spec(self, fullname: str, target=None):
        return None if fullname in BARE else super().find_spec(fullname, target)


def serve_checkout(entry: str) -> CheckoutFinder:
    if off_checkout(entry):
        raise ImportError("not the quantfab checkout")  # the next path hook takes the entry
    return CheckoutFinder(entry, *LOADERS)


serve_checkout.quantfab_checkout = str(CHECKOUT)  # type: ignore[attr-defined]


def hide() -> None:
    """Install ``serve_checkout`` first among the path hooks (once per process) and forget cached finders of
    the checkout root, so that a bare name resolves past our folders from now on."""
    if any(getattr(hook, "quantfab_checkout", None) == str(CHECKOUT) for hook in sys.path_hooks):
        return
    sys.path_hooks.insert(0, serve_checkout)
    for entry in [e for e in sys.path_importer_cache if isinstance(e, str) and not off_checkout(e)]:
        del sys.path_importer_cache[entry]


def hand_over(name: str) -> None:
    """Make ``sys.modules[name]`` the module ``name`` resolves to on ``sys.path`` minus the checkout."""
    spec = PathFinder.find_spec(name, [entry for entry in sys.path if off_checkout(entry)])
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r} (this checkout's {name}/ is quantfab.{name})", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
