"""Guards on the package layout: only `quantfab` is importable, never a bare `kernels`, `tasks` or `pipelines`.

The three sub-packages live at the repo root and are mapped under the `quantfab` namespace by
setuptools' package-dir. If the repo root ever lands on sys.path (a conftest, a .pth, `pip install -e`
in a lenient mode, a top_level entry), a bare `kernels` would shadow Hugging Face's `kernels` package
that transformers imports, and `tasks`/`pipelines` are generic enough to collide with anything.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BARE = ("kernels", "tasks", "pipelines")
VENV = Path(sys.prefix).resolve()  # may itself be inside the checkout (.ci/run makes .venv there)


def inside_repo(path: str | os.PathLike[str] | None) -> bool:
    """Whether ``path`` is in the checkout's own files (an environment inside the checkout excluded)."""
    if not path:
        return False
    resolved = Path(path).resolve()
    return resolved.is_relative_to(REPO) and not resolved.is_relative_to(VENV)


def test_the_repo_root_is_found():
    assert (REPO / "pyproject.toml").is_file()
    for name in BARE:
        assert (REPO / name / "__init__.py").is_file()


PROBE = r"""
import importlib.util, json, sys
import quantfab.pipelines, quantfab.tasks, quantfab.kernels
import quantfab.pipelines.cli, quantfab.pipelines.recipe_loading, quantfab.tasks.quantize, quantfab.tasks.convert
bare = {}
for name in ("kernels", "tasks", "pipelines"):
    spec = importlib.util.find_spec(name)
    bare[name] = None if spec is None else {"origin": spec.origin, "locations": list(spec.submodule_search_locations or [])}
modules = {name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())}
print(json.dumps({
    "sys_path": sys.path,
    "bare": bare,
    "modules": modules,
    "files": {n: sys.modules[n].__file__ for n in ("quantfab.pipelines", "quantfab.tasks", "quantfab.kernels")},
}))
"""


def test_bare_packages_are_not_importable_from_a_clean_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    # the quantfab sub-packages come from this repo's folders
    for name, folder in (("quantfab.pipelines", "pipelines"), ("quantfab.tasks", "tasks"), ("quantfab.kernels", "kernels")):
        assert Path(result["files"][name]).resolve().parent.name == folder

    # no bare name resolves into the repo (an unrelated installed `kernels` is fine)
    for name in BARE:
        spec = result["bare"][name]
        if spec is not None:
            assert not inside_repo(spec["origin"]), (name, spec)
            assert not any(inside_repo(p) for p in spec["locations"]), (name, spec)

    # the repo root is not on sys.path, and every loaded module from the repo is a quantfab one
    assert REPO not in [Path(p or tmp_path).resolve() for p in result["sys_path"]], result["sys_path"]
    # (torch.ops / torch.classes carry relative dummy __file__s: only absolute paths say where a module is)
    from_repo = {name for name, file in result["modules"].items() if file and os.path.isabs(file) and inside_repo(file)}
    assert "quantfab.pipelines.recipe_loading" in from_repo
    assert {name for name in from_repo if not name.startswith("quantfab.")} == set()


ROOT_ON_PATH_PROBE = r"""
import importlib, importlib.util, json, sys
if sys.argv[1] == "transformers-first":  # a bare `kernels` imported before quantfab is: the folder hands it over
    from transformers.integrations import hub_kernels
from prefect.utilities.importtools import import_object
# what a deployment's flow run does: import the module entrypoint with the working directory on sys.path
flow = import_object("quantfab.pipelines.quantize:quantize")
from transformers.integrations import hub_kernels  # imports Hugging Face's `kernels` (transformers 5.2x)
bare, specs = {}, {}
for name in ("kernels", "tasks", "pipelines"):
    spec = importlib.util.find_spec(name)
    specs[name] = None if spec is None else [spec.origin, *(spec.submodule_search_locations or [])]
    try:
        bare[name] = getattr(importlib.import_module(name), "__file__", None) or "namespace"
    except ModuleNotFoundError:
        bare[name] = None
print(json.dumps({"sys_path": sys.path, "flow": flow.name, "bare": bare, "specs": specs}))
"""


@pytest.mark.parametrize("order", ["quantfab-first", "transformers-first"])
def test_bare_packages_are_not_the_checkouts_even_with_its_root_on_sys_path(order: str) -> None:
    """`python -c`/`-m` from the repo root and Prefect's entrypoint loader put the root on sys.path; the
    bare names must still resolve (find_spec and import alike) to what is installed under them, or to nothing."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    proc = subprocess.run([sys.executable, "-c", ROOT_ON_PATH_PROBE, order], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert REPO in [Path(p or REPO).resolve() for p in result["sys_path"]]  # the situation under test
    assert result["flow"] == "quantize"
    for name, file in result["bare"].items():
        assert not inside_repo(file if file != "namespace" else None), (name, file)
        assert not any(inside_repo(p) for p in result["specs"][name] or []), (name, result["specs"][name])
    if importlib.util.find_spec("kernels") is not None:  # Hugging Face's, installed beside transformers
        assert result["bare"]["kernels"] is not None


def test_the_repo_root_is_not_on_sys_path_under_pytest():
    entries = [Path(p or os.getcwd()).resolve() for p in sys.path]  # "" means the current folder
    assert REPO not in entries, sys.path
    for name in BARE:
        spec = importlib.util.find_spec(name)
        if spec is not None:
            assert not inside_repo(spec.origin), (name, spec)
            assert not any(inside_repo(p) for p in spec.submodule_search_locations or []), (name, spec)
        module = sys.modules.get(name)
        if module is not None:
            assert not inside_repo(getattr(module, "__file__", None)), (name, module)
    # whatever the test session has imported from the checkout (tests aside) is under `quantfab.`
    import quantfab.pipelines.recipe_loading  # noqa: F401  (at least one module to see)
    from_repo = {name for name, m in list(sys.modules.items())
                 if isinstance(getattr(m, "__file__", None), str) and os.path.isabs(m.__file__)
                 and inside_repo(m.__file__) and not Path(m.__file__).resolve().is_relative_to(REPO / "tests")}
    assert "quantfab.pipelines.recipe_loading" in from_repo
    assert {name for name in from_repo if not name.startswith("quantfab.")} == set()


def _editable_finders(dist: importlib.metadata.Distribution) -> list[Path]:
    site = Path(str(dist.locate_file("")))
    return sorted(site.glob("__editable__*quantfab*finder.py"))


def _assigned_literal(path: Path, name: str) -> object:
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value is not None:
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path} assigns no {name}")


def installed_distribution() -> importlib.metadata.Distribution:
    """The installed quantfab, not the repo's own quantfab.egg-info (seen if the repo root is on sys.path)."""
    path = [p for p in sys.path if Path(p or os.getcwd()).resolve() != REPO]
    found = list(importlib.metadata.distributions(name="quantfab", path=path))
    assert found, "quantfab is not installed (pip install -e .)"
    return found[0]


def test_the_distribution_installs_only_quantfab():
    dist = installed_distribution()
    assert not inside_repo(str(dist.locate_file("")))

    top_level = dist.read_text("top_level.txt")
    if top_level is not None:
        assert top_level.split() == ["quantfab"]

    # installed files: a regular install holds quantfab/...; an editable one only its hooks
    tops = set()
    for file in dist.files or []:
        parts = Path(str(file)).parts
        if not parts or parts[0] == ".." or parts[0].endswith((".dist-info", ".egg-info")) or parts[0] == "__pycache__":
            continue
        if parts[0].startswith("__editable__") or parts[0].endswith(".pth"):
            continue
        tops.add(parts[0].removesuffix(".py"))
    assert tops <= {"quantfab"}, tops

    site = Path(str(dist.locate_file("")))
    finders = _editable_finders(dist)
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable"):
        # setuptools maps package-dir layouts with a finder; a plain path .pth would expose the repo root
        assert finders, f"editable install without an __editable__ finder in {site}"
    for finder in finders:
        mapping = _assigned_literal(finder, "MAPPING")
        assert isinstance(mapping, dict) and mapping, finder
        assert all(name.startswith("quantfab.") for name in mapping), mapping
        assert set(mapping) >= {"quantfab.pipelines", "quantfab.tasks", "quantfab.kernels"}
        for name, folder in mapping.items():
            assert Path(folder).resolve() != REPO, (name, folder)
        namespaces = _assigned_literal(finder, "NAMESPACES")
        assert all(name == "quantfab" or name.startswith("quantfab.") for name in namespaces), namespaces

    # no .pth of this distribution puts a folder (the repo root above all) on sys.path
    for pth in [site / str(f) for f in dist.files or [] if str(f).endswith(".pth")]:
        for line in pth.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith(("#", "import ", "import\t")):
                continue
            assert not inside_repo(line) and Path(line).resolve() != REPO, (pth, line)
