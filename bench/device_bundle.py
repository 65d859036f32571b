"""Build `.device/`: what a bare GPU machine needs, beside its own torch, CuPy and transformers, to run quantfab's
GPU tests and benches without internet or an install.

The `device` tool copies the working tree plus the ignored paths a run names in `carry`; the GPU machine has
Python with torch, CuPy and transformers and nothing else of ours. `.device/` holds:

* `site/quantfab/{pipelines,tasks,kernels}`: the package as an install lays it out (a namespace package,
  so no bare `tasks`/`kernels` lands on sys.path);
* `site/<module>`: the pure dependencies the method and kernel paths import that the machine lacks,
  copied from this venv; pydantic's compiled core is fetched as the wheel for the machine's Python (3.12 on
  the H200 image, seen 2026-12-04), since the one in this 3.11 venv does not load there;
* `data/`: the shared TinyStories model and texts (`../shared` does not travel).

    python bench/device_bundle.py            # then, with the device tool (carry [".device"]):
    PYTHONPATH=.device/site QUANTFAB_DATA=.device/data python -P -m pytest -p no:cacheprovider -m gpu \
        tests/test_methods.py tests/test_kernels.py
    PYTHONPATH=.device/site QUANTFAB_DATA=.device/data python bench/peer/run_ours.py --device cuda --out $OUT/kl.json
    PYTHONPATH=.device/site BENCH_CACHE=/tmp/bench python bench/peer/run_ours.py --synthetic --device cuda

(``-P``: without it ``python -m`` puts the repo root on sys.path before quantfab is imported, and the
image's transformers, which has no Hugging Face ``kernels`` beside it, would probe our folder as one.)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipelines", "tasks", "kernels")
# imported by quantfab's recipe, grid and kernel modules, or by pytest; not part of a torch + transformers image
DEPENDENCIES = ("pydantic", "annotated_types", "typing_inspection", "gguf", "compressed_tensors", "loguru", "pytest",
                "_pytest", "pluggy", "iniconfig", "py")
DATA_FILES = ("tinystories-656k", "tinystories-valid-head.txt", "wikitext2-test.raw", "README.md")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


def copy_module(name: str, site: Path) -> None:
    module = importlib.import_module(name)
    source = Path(module.__file__)
    if source.name == "__init__.py":
        shutil.copytree(source.parent, site / source.parent.name, ignore=IGNORE)
    else:
        shutil.copy2(source, site / source.name)


def unpack_pydantic_core(site: Path, python: str) -> None:
    """pydantic_core is compiled: fetch the manylinux wheel of our version built for the device's Python."""
    version = importlib.metadata.version("pydantic_core")
    with tempfile.TemporaryDirectory() as wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", python, "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                        "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", wheels,
                        f"pydantic_core=={version}"], check=True)
        (wheel,) = Path(wheels).glob("pydantic_core-*.whl")
        zipfile.ZipFile(wheel).extractall(site)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / ".device")
    ap.add_argument("--python", default="3.12", help="the device's Python version (X.Y), for compiled wheels")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("QUANTFAB_DATA", REPO.parent / "shared" / "data")))
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    site = args.out / "site"
    for package in PACKAGES:
        shutil.copytree(REPO / package, site / "quantfab" / package, ignore=IGNORE)
    for name in DEPENDENCIES:
        copy_module(name, site)
    unpack_pydantic_core(site, args.python)
    for name in DATA_FILES:
        source = args.data / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, args.out / "data" / name)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {size / 2**20:.1f} MiB (the device tool carries 64 MiB with the working tree)")


if __name__ == "__main__":
    main()
