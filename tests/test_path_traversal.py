"""Names in a recipe cannot reach outside their roots: `extends:` stays inside the recipe's project (the
nearest folder above holding .git, prefect.yaml or pyproject.toml), symlinks included; module and file
globs are names, never paths; recipe names cannot carry a path. (Package paths: tests/test_publish.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from quantfab.pipelines.cli import main
from quantfab.pipelines.recipe_loading import RecipeError, load_recipe, project_root

REPO = Path(__file__).resolve().parent.parent
DEMO = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())


def project(tmp_path: Path) -> Path:
    """tmp/proj (a project: it holds prefect.yaml) with recipes/base.yaml, and tmp/outside.yaml beside it."""
    proj = tmp_path / "proj"
    (proj / "recipes").mkdir(parents=True)
    (proj / "prefect.yaml").write_text("deployments: []\n")
    (proj / "recipes" / "base.yaml").write_text(yaml.safe_dump(DEMO))
    (tmp_path / "outside.yaml").write_text(yaml.safe_dump({**DEMO, "name": "outside"}))
    return proj


def child(proj: Path, extends: str) -> Path:
    path = proj / "recipes" / "child.yaml"
    path.write_text(f"extends: {extends}\nname: child\n")
    return path


def test_the_project_is_the_nearest_folder_with_a_marker(tmp_path: Path) -> None:
    proj = project(tmp_path)
    assert project_root(proj / "recipes" / "base.yaml") == proj.resolve()
    assert project_root(tmp_path / "outside.yaml") == tmp_path.resolve()  # no marker above: its own folder
    assert project_root(REPO / "recipes" / "demo.yaml") == REPO


def test_extends_inside_the_project_is_allowed(tmp_path: Path) -> None:
    proj = project(tmp_path)
    assert load_recipe(child(proj, "base.yaml")).name == "child"
    (proj / "bases").mkdir()
    (proj / "recipes" / "base.yaml").rename(proj / "bases" / "base.yaml")
    assert load_recipe(child(proj, "../bases/base.yaml")).quantize.method == "group"


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_extends_leaving_the_project_is_refused(tmp_path: Path, how: str, capsys: pytest.CaptureFixture) -> None:
    proj = project(tmp_path)
    target = {"relative": "../../outside.yaml", "absolute": str(tmp_path / "outside.yaml"), "symlink": "link.yaml"}[how]
    if how == "symlink":
        os.symlink(tmp_path / "outside.yaml", proj / "recipes" / "link.yaml")
    recipe = child(proj, target)
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    message = str(caught.value)
    assert message.startswith(f"{recipe.resolve()}:1:10: extends: {target!r} leads to {(tmp_path / 'outside.yaml').resolve()}, "
                              f"outside the project {proj.resolve()}"), message
    assert main(["plan", str(recipe)]) == 2  # the CLI: exit 2, the same message, no traceback
    err = capsys.readouterr().err
    assert "outside the project" in err and "Traceback" not in err


def test_extends_must_name_a_yaml_recipe(tmp_path: Path) -> None:
    proj = project(tmp_path)
    with pytest.raises(RecipeError, match=r"extends: expected a \.yaml recipe, got '../prefect.yaml.bak'"):
        (proj / "prefect.yaml.bak").write_text("x: 1\n")
        load_recipe(child(proj, "../prefect.yaml.bak"))


def test_a_base_cannot_reach_out_either(tmp_path: Path) -> None:
    """The limit is the first recipe's project, for every file in the chain."""
    proj = project(tmp_path)
    (proj / "recipes" / "mid.yaml").write_text("extends: ../../outside.yaml\n")
    with pytest.raises(RecipeError, match=r"mid.yaml:1:10: extends: '../../outside.yaml' leads to .*outside the project"):
        load_recipe(child(proj, "mid.yaml"))


@pytest.mark.parametrize("override, field", [
    ('quantize.ignore=["../../etc/passwd"]', "quantize.ignore.0"),
    ("quantize.overrides={'model/../x': {bits: 8}}", "quantize.overrides.model/../x"),
    ('model.include=["../*.safetensors"]', "model.include.0"),
    ('model.include=["/etc/*"]', "model.include.0"),
    ('quantize.ignore=[""]', "quantize.ignore.0"),
])
def test_globs_are_names_not_paths(override: str, field: str) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(REPO / "recipes" / "demo.yaml", [override])
    message = str(caught.value)
    assert f": {field}: " in message and "glob: use letters, digits" in message and "without '/' or '..'" in message, message


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "UPPER"])
def test_a_recipe_name_carries_no_path(name: str) -> None:
    with pytest.raises(RecipeError, match=r"--set name:1:1: name: String should match pattern"):
        load_recipe(REPO / "recipes" / "demo.yaml", [f"name={name}"])
