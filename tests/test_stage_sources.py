"""Every module a stage runs is hashed into its cache key, so editing one invalidates what it wrote."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from quantfab.pipelines.keys import COMMON, NO_OUTPUT_EFFECT, ROOT, STAGE_SOURCES


def listed(rels: list[str]) -> set[Path]:
    files: set[Path] = set()
    for rel in rels:
        path = ROOT / rel
        files |= set(path.rglob("*.py")) if path.is_dir() else {path}
    return files


def imported_closure(files: set[Path]) -> set[Path]:
    """The quantfab modules these files import, directly or through each other."""
    seen, todo = set(files), list(files)
    while todo:
        for node in ast.walk(ast.parse(todo.pop().read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quantfab."):
                base = ROOT.joinpath(*node.module.split(".")[1:])
                module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
                if module.is_file() and module not in seen:
                    seen.add(module)
                    todo.append(module)
    return seen


@pytest.mark.parametrize("stage", sorted(STAGE_SOURCES))
def test_a_stage_hashes_every_module_it_imports(stage: str) -> None:
    hashed = listed(COMMON + STAGE_SOURCES[stage])
    missing = imported_closure(hashed) - hashed - listed(NO_OUTPUT_EFFECT)
    assert not missing, f"{stage} imports {sorted(m.relative_to(ROOT).as_posix() for m in missing)} without hashing them"
