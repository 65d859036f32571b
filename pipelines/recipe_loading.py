"""Read recipe YAML into a validated ``Recipe``, with errors that point at file, line, column and field.

``extends:`` is resolved first (child keys override the base's, lists replace lists; a base must lie
inside the recipe's project, so a reviewed recipe cannot pull in files from elsewhere), then ``--set``
overrides, then pydantic validation. Every error becomes a ``RecipeError`` carrying the location of
the offending value, in whichever file it came from.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from quantfab.tasks.errors import UserError
from quantfab.tasks.redact import redact
from quantfab.pipelines.recipe import Recipe
from quantfab.tasks.convert import FORMATS

Loc = tuple[str | int, ...]
ROOT_MARKERS = (".git", "prefect.yaml", "pyproject.toml")
ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class Mark:
    file: str
    line: int  # 1-based
    column: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class RecipeError(UserError):
    """A recipe that cannot be read or does not validate; the message names where and what."""


def load_recipe(path: str | Path, overrides: list[str] | None = None, as_written: bool = False,
                root: Path | None = None) -> Recipe:
    """Load, merge, override and validate one recipe file.

    ``as_written`` leaves ${VAR} and relative sources as the file spells them (what a review compares).
    ``root`` is the folder ``extends:`` may not leave; by default the recipe's project (``project_root``).
    """
    root = (root or project_root(Path(path))).resolve()
    data, marks = _load_with_extends(Path(path), chain=(), as_written=as_written, root=root)
    for item in overrides or []:
        _apply_override(data, marks, item)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_validation(exc, marks, Path(path))) from None
    return recipe


def project_root(recipe: Path) -> Path:
    """The nearest folder above the recipe holding .git, prefect.yaml or pyproject.toml; else the recipe's own."""
    recipe = recipe.resolve()
    return next((d for d in recipe.parents if any((d / m).exists() for m in ROOT_MARKERS)), recipe.parent)


def _load_with_extends(path: Path, chain: tuple[Path, ...], as_written: bool, root: Path) -> tuple[dict[str, Any], dict[Loc, Mark]]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise RecipeError(f"{path}: extends forms a cycle: {cycle}")
    data, marks = _read_yaml(path)
    base_ref = data.pop("extends", None)
    if not as_written:
        _resolve_strings(data, path)
    if base_ref is None:
        return data, marks
    mark = marks.get(("extends",), Mark(str(path), 1, 1))
    if not isinstance(base_ref, str) or not base_ref:
        raise RecipeError(f"{mark}: extends: expected a relative path to a base recipe, got {base_ref!r}")
    base_path = (path.parent / base_ref).resolve()  # symlinks followed: a link cannot lead out either
    if not base_path.is_relative_to(root):
        raise RecipeError(f"{mark}: extends: {base_ref!r} leads to {base_path}, outside the project {root}; a recipe "
                          f"may extend only recipes inside its project (the nearest folder above it holding "
                          f"{', '.join(ROOT_MARKERS)})")
    if base_path.suffix not in (".yaml", ".yml"):
        raise RecipeError(f"{mark}: extends: expected a .yaml recipe, got {base_ref!r}")
    if not base_path.is_file():
        raise RecipeError(f"{mark}: extends: no such file {base_ref!r} (looked for {base_path})")
    base, base_marks = _load_with_extends(base_path, (*chain, path), as_written, root)
    return _merge(base, data), {**base_marks, **marks}


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[Loc, Mark]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        loc = f"{path}:{where.line + 1}:{where.column + 1}" if where else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{loc}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1:1: expected a mapping of recipe fields at the top level, got {type(data).__name__}")
    marks: dict[Loc, Mark] = {}
    _collect_marks(node, (), str(path), marks)
    return data, marks


def _collect_marks(node: yaml.Node, loc: Loc, file: str, marks: dict[Loc, Mark]) -> None:
    marks[loc] = Mark(file, node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*loc, key.value)
            _collect_marks(value, child, file, marks)
            marks[(*child, "__key__")] = Mark(file, key.start_mark.line + 1, key.start_mark.column + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _collect_marks(item, (*loc, i), file, marks)


def _resolve_strings(data: Any, path: Path) -> None:
    """Expand ${VAR} / ${VAR:-default} (the default also when VAR is empty, as in the shell) in every string, and make relative local sources absolute."""
    base_dir = path.parent

    def walk(value: Any, key: str | None) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        if isinstance(value, str):
            value = ENV_PATTERN.sub(lambda m: os.environ.get(m.group(1)) or m.group(2) or "", value)
            if "\x00" in value:  # no path, URL or name can hold one (the OS refuses it with a bare ValueError)
                raise RecipeError(f"{path}: {key}: the value {value!r} contains a NUL character")
            if key in ("source", "destination") and "://" not in value and not os.path.isabs(value):
                value = str((base_dir / value).resolve())
        return value
    resolved = walk(data, None)
    data.clear()
    data.update(resolved)


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(data: dict[str, Any], marks: dict[Loc, Mark], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {item!r}: expected dotted.key=value")
    if redact(raw) != raw:
        raise RecipeError(f"--set {key}: the value carries credentials, which Prefect would store with the run's "
                          "parameters; put them in an environment variable and write ${VAR} in the recipe instead")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    target: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = target[int(part)] if isinstance(target, list) and part.isdigit() else target.get(part) if isinstance(target, dict) else None
        if nxt is None and isinstance(target, dict):
            nxt = target[part] = {}
        if not isinstance(nxt, (dict, list)):
            raise RecipeError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        target = nxt
    last = parts[-1]
    if isinstance(target, list):
        if not last.isdigit() or int(last) >= len(target):
            raise RecipeError(f"--set {key}: {last!r} is not an index of that list")
        target[int(last)] = value
    else:
        target[last] = value
    loc = tuple(int(p) if p.isdigit() else p for p in parts)
    marks[loc] = Mark(f"--set {key}", 1, 1)


def _format_validation(exc: ValidationError, marks: dict[Loc, Mark], path: Path) -> str:
    lines = [f"{path}: the recipe is not valid ({exc.error_count()} problem{'s' if exc.error_count() > 1 else ''}):"]
    for err in exc.errors(include_url=False):
        loc = tuple("validate" if p == "validate_" else p for p in err["loc"])
        # Union members and discriminator tags add loc parts that are not YAML keys: drop them.
        loc = tuple(p for p in loc if isinstance(p, int) or not str(p).startswith(("function-", "tagged-")))
        if len(loc) > 2 and loc[0] == "outputs" and loc[2] in FORMATS:  # the format tag of a discriminated output
            loc = loc[:2] + loc[3:]
        is_key = bool(loc) and loc[-1] == "[key]"  # a dict key (an override's glob) was refused
        loc = loc[:-1] if is_key else loc
        field = ".".join(str(p) for p in loc) or "(top level)"
        mark = marks.get((*loc, "__key__")) if is_key else None
        mark = mark or _nearest_mark(loc, marks, err["type"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `quantfab schema` lists the fields)"
        elif err["type"] == "union_tag_invalid":
            loc, field = (*loc, "format"), f"{field}.format"
            msg = f"unknown format {err['ctx']['tag']!r} (formats: {', '.join(FORMATS)})"
        elif err["type"] == "union_tag_not_found":
            msg = f"say which format, e.g. {{gguf: Q4_0}} or format: {next(iter(FORMATS))} (formats: {', '.join(FORMATS)})"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "value_error":  # our validators' messages already quote the value
            msg = msg.removeprefix("Value error, ")
        elif "input" in err and err["type"] not in ("missing",):
            msg = f"{msg} (got {err['input']!r})" if not isinstance(err["input"], (dict, list)) else msg
        lines.append(f"  {mark or path}: {field}: {msg}")
    return "\n".join(lines)


def _nearest_mark(loc: Loc, marks: dict[Loc, Mark], err_type: str) -> Mark | None:
    if err_type == "extra_forbidden" and (*loc, "__key__") in marks:
        return marks[(*loc, "__key__")]
    for n in range(len(loc), -1, -1):
        if loc[:n] in marks:
            return marks[loc[:n]]
    return None


def check_recipes(recipe_paths: list[str], overrides: list[str] | None) -> list[Recipe]:
    """Every recipe loads, and no two publish to one destination (checked before any starts)."""
    destinations: dict[str, str] = {}
    recipes = []
    for path in recipe_paths:
        recipe = load_recipe(path, overrides)
        if recipe.package.destination in destinations:
            raise UserError(f"{path} and {destinations[recipe.package.destination]} would both publish to "
                            f"{redact(recipe.package.destination)}: give each recipe its own package.destination")
        destinations[recipe.package.destination] = str(path)
        recipes.append(recipe)
    return recipes
