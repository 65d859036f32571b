"""Recipe fuzzing: mutated recipes either plan, or fail with exit 2 and a message that names the file.

Hypothesis mutates the demo recipe (a field set to a value of the wrong type, a huge number, an empty
or odd string; a field deleted; an unknown key added) and runs `quantfab plan` on it in-process: any
exception that escapes the CLI, a traceback, is a failure. Cycles in `extends:` and escaping names are
checked by hand.
"""

from __future__ import annotations

import copy
from functools import reduce
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from quantfab.pipelines.cli import main

REPO = Path(__file__).resolve().parent.parent
DEMO = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())


def key_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += key_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += key_paths(v, (*prefix, i))
    return out


PATHS = key_paths(DEMO)
DICT_PATHS = [()] + [p for p in PATHS if isinstance(reduce(lambda d, k: d[k], p, DEMO), dict)]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", " ", "../../etc/passwd", "${NOPE}", "${QUANTFAB_DATA:-}", "[", "*", "synthetic://llama?layers=-1",
                     "synthetic://llama?layers=2&hidden=7", "hf://", "s3://", "file:///nonexistent"]),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(min_value=-3, max_value=3), max_size=2),
)
MUTATIONS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(PATHS), VALUES),
    st.tuples(st.just("delete"), st.sampled_from(PATHS), st.none()),
    st.tuples(st.just("add"), st.sampled_from(DICT_PATHS), st.text(min_size=1, max_size=8)),
)


def mutate(recipe: dict, mutations: list[tuple]) -> dict:
    out = copy.deepcopy(recipe)
    for kind, path, value in mutations:
        node = out
        try:
            for key in path[:-1] if path else ():
                node = node[key]
            if kind == "add":
                target = node[path[-1]] if path else node
                if isinstance(target, dict):
                    target[value] = 1
            elif kind == "set":
                node[path[-1]] = value
            else:
                del node[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    return out


@given(st.lists(MUTATIONS, min_size=1, max_size=3))
@example([("set", ("model", "source"), "\x00")])  # found by the fuzz on a fresh clone: a NUL in a path
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_mutated_recipe_plans_or_fails_with_exit_2_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                     mutations: list[tuple]) -> None:
    path = tmp_path / "mutated.yaml"
    path.write_text(yaml.safe_dump(mutate(DEMO, mutations)))
    code = main(["plan", str(path), "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert str(path) in err.replace("\n", "") or "mutated.yaml" in err, err


def test_an_extends_cycle_is_refused_with_the_chain(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    assert main(["plan", str(tmp_path / "a.yaml")]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "extends forms a cycle" in err and "a.yaml" in err and "b.yaml" in err


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "UPPER", "x" * 200, ".hidden"])
def test_a_recipe_name_that_could_escape_or_collide_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              name: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**DEMO, "name": name}))
    assert main(["plan", str(path)]) == 2
    assert "name" in capsys.readouterr().err


def missing_protocol() -> str:
    """A protocol fsspec knows whose package is not installed here (s3:// without s3fs, found by the fuzz)."""
    import importlib.util

    from fsspec.registry import known_implementations

    for protocol, spec in sorted(known_implementations.items()):
        module = spec["class"].rsplit(".", 1)[0].split(".")[0]
        if importlib.util.find_spec(module) is None:
            return protocol
    pytest.skip("every fsspec protocol's package is installed")


@pytest.mark.slow
def test_a_source_whose_filesystem_is_not_installed_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    protocol = missing_protocol()
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**DEMO, "model": {"source": f"{protocol}://bucket/model"}}))
    assert main(["plan", str(path), "--store", str(tmp_path / "store")]) == 0  # plan says what it cannot know
    out = capsys.readouterr().out.replace("\n", "")
    assert f"cannot read the model's headers (model.source: {protocol}://bucket/model: " in out, out
    assert main(["run", str(path), "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    message = err[err.rindex("error: "):]  # the CLI's own line (Prefect's logs above it are off outside tests)
    assert message.startswith(f"error: model.source: {protocol}://bucket/model: ") and "Install" in message, message
