"""The recipe schema, its loader and the errors a user sees.

Every error test writes a recipe into ``tmp_path``, computes where the offending text is in the YAML it
wrote, and checks that the message names that ``file:line:column``, the dotted field path and what was
expected. CLI tests run the real ``quantfab`` script and check it fails with exit 2, no traceback and
before Prefect starts.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from quantfab.pipelines.cli import main as cli_main
from quantfab.pipelines.recipe import Recipe
from quantfab.pipelines.recipe_loading import RecipeError, load_recipe
from quantfab.tasks.errors import UserError

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
QUANTFAB = Path(sys.executable).parent / "quantfab"


# --------------------------------------------------------------------------------------------- helpers

def minimal_recipe() -> dict[str, Any]:
    """A small valid recipe, synthetic like recipes/demo.yaml, so nothing is downloaded."""
    return {
        "name": "tiny",
        "model": {"source": "synthetic://llama?layers=2&hidden=64&intermediate=128&heads=2&kv_heads=1&vocab=128&seed=0"},
        "calibration": {"source": "synthetic://tokens?seed=1", "samples": 4, "seq_len": 32},
        "quantize": {"method": "group"},
        "outputs": [{"gguf": "Q4_0"}],
        "validate": {"source": "synthetic://tokens?seed=2", "tokens": 256, "window": 32, "gates": {"max_kl": 0.5}},
        "package": {"destination": "out"},
    }


def write_recipe(folder: Path, mutate: Callable[[dict[str, Any]], None] | None = None, *,
                 name: str = "recipe.yaml", data: dict[str, Any] | None = None) -> Path:
    """Write ``data`` (default: the minimal recipe), changed by ``mutate``, as block-style YAML."""
    data = copy.deepcopy(minimal_recipe() if data is None else data)
    if mutate is not None:
        mutate(data)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), encoding="utf-8")
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def where(path: Path, needle: str, at: str | None = None) -> str:
    """``file:line:column`` (1-based) of ``at`` inside the first line of ``path`` that contains ``needle``."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if needle in line:
            column = line.index(needle) + (needle.index(at) if at else 0) + 1
            return f"{path.resolve()}:{number}:{column}"
    raise AssertionError(f"{needle!r} is not in {path}:\n{path.read_text()}")


def where_value(path: Path, key: str) -> str:
    """``file:line:column`` of the value in the first block-style ``key: value`` line of ``path``."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.lstrip().startswith(f"{key}: "):
            return f"{path.resolve()}:{number}:{line.index(key) + len(key) + 3}"
    raise AssertionError(f"no {key!r} in {path}:\n{path.read_text()}")


def load_error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "Traceback" not in message
    return message


def problem_line(message: str, field: str) -> str:
    """The one line of a validation message about ``field``."""
    hits = [line for line in message.splitlines() if f": {field}: " in line]
    assert len(hits) == 1, f"expected one problem about {field!r} in:\n{message}"
    return hits[0]


def set_in(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def del_in(data: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[part]
    del data[last]


# ------------------------------------------------------------------------------------ shipped recipes

SHIPPED = sorted(RECIPES.glob("*.yaml"))


def test_the_shipped_recipes_are_found():
    assert {"demo.yaml", "tinystories-656k-q4_0.yaml", "llama70b-awq.yaml"} <= {p.name for p in SHIPPED}


@pytest.mark.parametrize("data_dir", [None, "/srv/quantfab-data"], ids=["QUANTFAB_DATA-unset", "QUANTFAB_DATA-set"])
@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_recipe_loads(path, data_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("QUANTFAB_OUT", raising=False)
    if data_dir is None:
        monkeypatch.delenv("QUANTFAB_DATA", raising=False)
    else:
        monkeypatch.setenv("QUANTFAB_DATA", data_dir)
    monkeypatch.chdir(tmp_path)  # paths must not depend on where quantfab is started
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    for value in (recipe.model.source, recipe.calibration.source, recipe.validate_.source, recipe.package.destination):
        assert "${" not in value
        assert "://" in value or os.path.isabs(value), value


def test_shipped_data_paths_default_next_to_the_repo(monkeypatch):
    monkeypatch.delenv("QUANTFAB_DATA", raising=False)
    recipe = load_recipe(RECIPES / "tinystories-656k-q4_0.yaml")
    data = (RECIPES / "../../shared/data").resolve()
    assert recipe.model.source == str(data / "tinystories-656k")
    assert recipe.calibration.source == str(data / "tinystories-valid-head.txt")
    assert recipe.validate_.source == str(data / "wikitext2-test.raw")

    monkeypatch.delenv("QUANTFAB_OUT", raising=False)
    assert load_recipe(RECIPES / "demo.yaml").package.destination == str(REPO / "out" / "demo")

    monkeypatch.setenv("QUANTFAB_DATA", "/srv/data")
    recipe = load_recipe(RECIPES / "tinystories-656k-q4_0.yaml")
    assert recipe.calibration.source == "/srv/data/tinystories-valid-head.txt"


def test_the_minimal_recipe_is_valid(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path))
    assert recipe.name == "tiny"
    assert recipe.quantize.method == "group"
    assert recipe.calibration.samples == 4
    assert recipe.validate_.gates.max_kl == 0.5
    assert recipe.execution.device == "auto"
    assert recipe.extends is None


def test_recipe_error_is_a_user_error():
    assert issubclass(RecipeError, UserError)  # the CLI turns UserError into exit 2 without a traceback


# --------------------------------------------------------------------------------------- unknown keys

def test_unknown_key_in_a_flow_mapping(tmp_path):
    """The example from the docs: `quantize: {methd: rtn}`."""
    path = write_recipe(tmp_path)
    text = path.read_text().replace("quantize:\n  method: group\n", "quantize: {methd: rtn}\n")
    write_text(path, text)
    message = load_error(path)
    line = problem_line(message, "quantize.methd")
    assert line.strip().startswith(where(path, "quantize: {methd: rtn}", at="methd") + ": quantize.methd: ")
    assert "unknown field" in line
    # `method` is then missing too, and is reported as such.
    assert "required field is missing" in problem_line(message, "quantize.method")
    assert "(2 problems)" in message.splitlines()[0]


@pytest.mark.parametrize("dotted, needle", [
    ("naem", "naem:"),
    ("quantize.methd", "methd:"),
    ("calibration.sample", "sample:"),
    ("validate.gates.max_kll", "max_kll:"),  # `validate` is `validate_` in Python: the message must say `validate`
    ("execution.devise", "devise:"),
])
def test_unknown_key_names_location_and_field(tmp_path, dotted, needle):
    path = write_recipe(tmp_path, lambda d: set_in(d, dotted, 1))
    message = load_error(path)
    line = problem_line(message, dotted)
    assert line.strip() == (f"{where(path, needle)}: {dotted}: unknown field "
                            "(check the spelling; `quantfab schema` lists the fields)")
    assert "(1 problem)" in message.splitlines()[0]


def test_unknown_key_inside_an_output(tmp_path):
    path = write_recipe(tmp_path, lambda d: d.update(outputs=[{"format": "gguf", "type": "Q4_0", "flaot_type": "F32"}]))
    line = problem_line(load_error(path), "outputs.0.flaot_type")
    assert line.strip().startswith(where(path, "flaot_type:") + ": outputs.0.flaot_type: unknown field")


# ------------------------------------------------------------------------------ wrong types and ranges

@pytest.mark.parametrize("dotted, value, expected", [
    ("calibration.samples", -1, ["greater than or equal to 1", "(got -1)"]),
    ("calibration.samples", 0, ["greater than or equal to 1", "(got 0)"]),
    ("calibration.samples", 200_000, ["less than or equal to 100000", "(got 200000)"]),
    ("calibration.samples", "many", ["valid integer", "(got 'many')"]),
    ("calibration.samples", 2.5, ["valid integer", "fractional part", "(got 2.5)"]),
    ("calibration.seq_len", 4, ["greater than or equal to 8", "(got 4)"]),
    ("validate.tokens", 8, ["greater than or equal to 16", "(got 8)"]),
    ("validate.gates.max_kl", -0.5, ["greater than or equal to 0", "(got -0.5)"]),
    ("validate.gates.min_top1", 1.5, ["less than or equal to 1", "(got 1.5)"]),
    ("quantize.method", "fast", ["'rtn'", "'group'", "'awq'", "(got 'fast')"]),
    ("quantize.bits", 9, ["less than or equal to 8", "(got 9)"]),
    ("execution.device", "tpu", ["'auto'", "'cuda'", "'cpu'", "(got 'tpu')"]),
    ("name", "Not A Name", ["match pattern", "(got 'Not A Name')"]),
    ("model.allow_pickle", "perhaps", ["valid boolean", "(got 'perhaps')"]),
])
def test_bad_value_names_location_field_and_expectation(tmp_path, dotted, value, expected):
    path = write_recipe(tmp_path, lambda d: set_in(d, dotted, value))
    message = load_error(path)
    assert "(1 problem)" in message.splitlines()[0]
    line = problem_line(message, dotted)
    # The location is the offending value, i.e. the text after `key: ` on the key's line.
    assert line.strip().startswith(f"{where_value(path, dotted.rsplit('.', 1)[-1])}: {dotted}: ")
    for fragment in expected:
        assert fragment in line


def test_bad_value_in_a_per_module_override(tmp_path):
    path = write_recipe(tmp_path, lambda d: set_in(d, "quantize.overrides", {"*.mlp.down_proj": {"bits": 1}}))
    line = problem_line(load_error(path), "quantize.overrides.*.mlp.down_proj.bits")
    assert line.strip().startswith(where(path, "bits: 1", at="1") + ": ")
    assert "greater than or equal to 2" in line


def test_a_section_that_is_not_a_mapping(tmp_path):
    path = write_recipe(tmp_path, lambda d: d.update(calibration="lots"))
    line = problem_line(load_error(path), "calibration")
    assert line.strip().startswith(where(path, "calibration: lots", at="lots") + ": calibration: ")
    assert "valid dictionary" in line


def test_several_problems_are_all_reported(tmp_path):
    def mutate(d):
        d["calibration"]["samples"] = -1
        d["validate"]["window"] = "wide"
        d["quantize"]["methd"] = "rtn"
    message = load_error(write_recipe(tmp_path, mutate))
    assert "(3 problems)" in message.splitlines()[0]
    for field in ("calibration.samples", "validate.window", "quantize.methd"):
        problem_line(message, field)


# -------------------------------------------------------------------------------------- missing fields

@pytest.mark.parametrize("section", ["package", "model", "calibration", "quantize", "outputs", "validate", "name"])
def test_missing_required_section(tmp_path, section):
    path = write_recipe(tmp_path, lambda d: d.pop(section))
    message = load_error(path)
    assert "(1 problem)" in message.splitlines()[0]
    # Nothing to point at but the recipe itself: its first line.
    assert problem_line(message, section).strip() == f"{path.resolve()}:1:1: {section}: required field is missing"


def test_missing_required_field_in_a_section(tmp_path):
    path = write_recipe(tmp_path, lambda d: del_in(d, "calibration.source"))
    line = problem_line(load_error(path), "calibration.source")
    assert line.endswith("calibration.source: required field is missing")
    # Points at the calibration section: its key or its first field.
    assert line.strip().split(": ", 1)[0] in {where(path, "calibration:"), where(path, "samples: 4")}


# --------------------------------------------------------------------------------------- invalid YAML

def test_invalid_yaml_names_line_and_column(tmp_path):
    path = write_recipe(tmp_path)
    write_text(path, path.read_text().replace("seq_len: 32", "seq_len: 32: 64"))
    message = load_error(path)
    second_colon = where(path, "seq_len: 32: 64", at=": 64")
    assert message == f"{second_colon}: invalid YAML: mapping values are not allowed here"


def test_invalid_yaml_unclosed_flow_sequence(tmp_path):
    path = write_text(tmp_path / "recipe.yaml", "name: tiny\nquantize:\n  ignore: [lm_head\nmodel: {}\n")
    message = load_error(path)
    assert message.startswith(f"{path.resolve()}:4:")
    assert "invalid YAML" in message


def test_tab_indentation_is_invalid_yaml(tmp_path):
    path = write_text(tmp_path / "recipe.yaml", "name: tiny\nquantize:\n\tmethod: rtn\n")
    message = load_error(path)
    assert message.startswith(f"{path.resolve()}:3:1: invalid YAML")


@pytest.mark.parametrize("text, got", [("", "NoneType"), ("- a\n- b\n", "list"), ("just a string\n", "str")])
def test_top_level_must_be_a_mapping(tmp_path, text, got):
    path = write_text(tmp_path / "recipe.yaml", text)
    message = load_error(path)
    assert message == f"{path.resolve()}:1:1: expected a mapping of recipe fields at the top level, got {got}"


def test_missing_recipe_file(tmp_path):
    message = load_error(tmp_path / "nope.yaml")
    assert message == f"{(tmp_path / 'nope.yaml').resolve()}: no such recipe file"


# -------------------------------------------------------------------------------------------- extends

def test_extends_merges_child_over_base(tmp_path):
    def base(d):
        d["quantize"]["ignore"] = ["lm_head", "model.embed_tokens", "model.norm"]
        d["outputs"] = [{"gguf": "Q4_0"}, {"gguf": "Q4_1"}]
        d["description"] = "the base"
    write_recipe(tmp_path, base, name="base.yaml")
    child = write_recipe(tmp_path, name="child.yaml", data={
        "extends": "base.yaml",
        "name": "child",
        "calibration": {"samples": 8},
        "quantize": {"ignore": ["lm_head"]},
        "outputs": [{"gguf": "Q8_0"}],
        "validate": {"gates": {"min_top1": 0.9}},
    })
    recipe = load_recipe(child)
    assert recipe.name == "child"                                   # child overrides a scalar
    assert recipe.description == "the base"                         # untouched keys come from the base
    assert recipe.extends is None
    # nested dicts merge: the child's samples, the base's source and seq_len
    assert recipe.calibration.samples == 8
    assert recipe.calibration.seq_len == 32
    assert recipe.calibration.source == "synthetic://tokens?seed=1"
    assert recipe.validate_.gates.max_kl == 0.5 and recipe.validate_.gates.min_top1 == 0.9
    assert recipe.validate_.tokens == 256
    assert recipe.quantize.method == "group"
    # lists replace lists
    assert recipe.quantize.ignore == ["lm_head"]
    assert [o.key for o in recipe.outputs] == ["gguf-Q8_0"]


def test_extends_chain_and_relative_paths_per_file(tmp_path):
    """Each file's relative `extends`, `source` and `destination` are relative to that file's folder."""
    (tmp_path / "prefect.yaml").touch()  # the project: extends may reach across its folders
    write_recipe(tmp_path / "bases", lambda d: d["calibration"].update(source="data/cal.txt"), name="root.yaml")
    write_recipe(tmp_path / "bases", name="mid.yaml", data={"extends": "root.yaml", "quantize": {"method": "rtn"}})
    leaf = write_recipe(tmp_path / "recipes", name="leaf.yaml",
                        data={"extends": "../bases/mid.yaml", "name": "leaf", "package": {"destination": "dist"}})
    recipe = load_recipe(leaf)
    assert recipe.name == "leaf"
    assert recipe.quantize.method == "rtn"
    assert recipe.calibration.source == str((tmp_path / "bases" / "data" / "cal.txt").resolve())
    assert recipe.package.destination == str((tmp_path / "recipes" / "dist").resolve())


def test_error_in_the_base_is_reported_at_the_base(tmp_path):
    def bad(d):
        d["calibration"]["samples"] = -1
        d["quantize"]["bitz"] = 4
    base = write_recipe(tmp_path / "base", bad, name="base.yaml")
    child = write_recipe(tmp_path, name="child.yaml", data={"extends": "base/base.yaml", "name": "child"})
    message = load_error(child)
    assert "(2 problems)" in message.splitlines()[0]
    samples = problem_line(message, "calibration.samples")
    assert samples.strip().startswith(where(base, "samples: -1", at="-1") + ": calibration.samples: ")
    assert "greater than or equal to 1" in samples
    bitz = problem_line(message, "quantize.bitz")
    assert bitz.strip().startswith(where(base, "bitz:") + ": quantize.bitz: unknown field")


def test_error_in_the_child_is_reported_at_the_child(tmp_path):
    write_recipe(tmp_path, name="base.yaml")
    child = write_recipe(tmp_path, name="child.yaml", data={"extends": "base.yaml", "calibration": {"samples": -2}})
    line = problem_line(load_error(child), "calibration.samples")
    assert line.strip().startswith(where(child, "samples: -2", at="-2") + ": calibration.samples: ")


def test_extends_missing_base_file(tmp_path):
    child = write_recipe(tmp_path, name="child.yaml", data={"extends": "nope.yaml", "name": "child"})
    message = load_error(child)
    assert message.startswith(where(child, "extends: nope.yaml", at="nope.yaml") + ": extends: no such file 'nope.yaml'")
    assert str((tmp_path / "nope.yaml").resolve()) in message


def test_extends_must_be_a_path(tmp_path):
    child = write_recipe(tmp_path, name="child.yaml", data={"extends": 5, "name": "child"})
    message = load_error(child)
    assert message.startswith(where(child, "extends: 5", at="5") + ": extends: expected a relative path")


def test_extends_cycle(tmp_path):
    a = write_recipe(tmp_path, name="a.yaml", data={**minimal_recipe(), "extends": "b.yaml"})
    b = write_recipe(tmp_path, name="b.yaml", data={"extends": "a.yaml", "name": "b"})
    message = load_error(a)
    assert "cycle" in message
    assert str(a.resolve()) in message and str(b.resolve()) in message
    assert "cycle" in load_error(b)


def test_extends_itself_is_a_cycle(tmp_path):
    path = write_recipe(tmp_path, name="self.yaml", data={**minimal_recipe(), "extends": "self.yaml"})
    assert "cycle" in load_error(path)


def test_invalid_yaml_in_the_base(tmp_path):
    base = write_text(tmp_path / "base.yaml", "name: base\nmodel: [\n")
    child = write_recipe(tmp_path, name="child.yaml", data={"extends": "base.yaml"})
    message = load_error(child)
    assert message.startswith(f"{base.resolve()}:")
    assert "invalid YAML" in message


# ----------------------------------------------------------------------------------------------- --set

def test_set_overrides_apply(tmp_path):
    path = write_recipe(tmp_path)
    plain = load_recipe(path)
    assert (plain.quantize.method, plain.validate_.gates.max_kl) == ("group", 0.5)
    recipe = load_recipe(path, ["quantize.method=rtn", "validate.gates.max_kl=0.1"])
    assert recipe.quantize.method == "rtn"
    assert recipe.validate_.gates.max_kl == 0.1
    assert recipe.calibration == plain.calibration  # nothing else changes


def test_set_creates_missing_sections_and_parses_yaml_values(tmp_path):
    path = write_recipe(tmp_path)
    recipe = load_recipe(path, ["execution.device=cpu", "quantize.ignore=[lm_head, model.norm]",
                                "model.allow_pickle=true", "outputs.0={gguf: Q8_0}", "description="])
    assert recipe.execution.device == "cpu"
    assert recipe.quantize.ignore == ["lm_head", "model.norm"]
    assert recipe.model.allow_pickle is True
    assert [o.key for o in recipe.outputs] == ["gguf-Q8_0"]
    assert recipe.description == ""


def test_set_overrides_win_over_extends(tmp_path):
    write_recipe(tmp_path, name="base.yaml")
    child = write_recipe(tmp_path, name="child.yaml", data={"extends": "base.yaml", "calibration": {"samples": 8}})
    assert load_recipe(child, ["calibration.samples=12"]).calibration.samples == 12


def test_bad_set_value_names_the_set(tmp_path):
    message = load_error(write_recipe(tmp_path), ["calibration.samples=-3"])
    line = problem_line(message, "calibration.samples")
    assert "--set calibration.samples" in line
    assert "greater than or equal to 1" in line and "(got -3)" in line
    assert "recipe.yaml:" not in line  # the location is the --set, not the file's old value


def test_unknown_key_in_set_names_the_set(tmp_path):
    line = problem_line(load_error(write_recipe(tmp_path), ["quantize.methd=rtn"]), "quantize.methd")
    assert "--set quantize.methd" in line
    assert "unknown field" in line


@pytest.mark.parametrize("item, expected", [
    ("quantize.method", "--set 'quantize.method': expected dotted.key=value"),
    ("=rtn", "--set '=rtn': expected dotted.key=value"),
    ("name.first=x", "--set name.first: name is not a section"),
    ("outputs.3=Q8_0", "--set outputs.3: '3' is not an index of that list"),
])
def test_malformed_set(tmp_path, item, expected):
    assert load_error(write_recipe(tmp_path), [item]) == expected


# --------------------------------------------------------------------------------------------- outputs

def test_output_shorthand_equals_long_form(tmp_path):
    short = load_recipe(write_recipe(tmp_path / "a", lambda d: d.update(outputs=[{"gguf": "Q4_0"}])))
    long = load_recipe(write_recipe(tmp_path / "b", lambda d: d.update(outputs=[{"format": "gguf", "type": "Q4_0"}])))
    assert short.outputs == long.outputs
    assert short.outputs[0].model_dump() == {"format": "gguf", "type": "Q4_0", "pure": False, "float_type": "F16",
                                             "imatrix": True, "target_bits_per_weight": None}
    assert short.outputs[0].key == "gguf-Q4_0"


def test_gguf_imatrix_is_on_where_it_changes_codes_and_keys_name_the_exceptions(tmp_path):
    """An importance matrix is on by default for every type whose codes it changes (not Q8_0, F16, F32), and an
    output key names only a choice against its type's default."""
    outputs = [{"gguf": "Q4_K_M"}, {"gguf": "Q8_0"}, {"gguf": "F16"}, {"format": "gguf", "type": "Q4_0", "imatrix": False},
               {"format": "gguf", "type": "F32", "imatrix": True}, {"format": "gguf", "type": "Q6_K", "imatrix": None}]
    recipe = load_recipe(write_recipe(tmp_path, lambda d: d.update(outputs=outputs)))
    assert [(o.key, o.imatrix) for o in recipe.outputs] == [
        ("gguf-Q4_K_M", True), ("gguf-Q8_0", False), ("gguf-F16", False), ("gguf-Q4_0-noimatrix", False),
        ("gguf-F32-imatrix", True), ("gguf-Q6_K", True)]


def test_long_form_output_options(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, lambda d: d.update(
        outputs=[{"gguf": "Q8_0"}, {"format": "gguf", "type": "Q4_1", "float_type": "F32"}])))
    assert [(o.type, o.float_type) for o in recipe.outputs] == [("Q8_0", "F16"), ("Q4_1", "F32")]


def test_duplicate_outputs_are_refused(tmp_path):
    path = write_recipe(tmp_path, lambda d: d.update(outputs=[{"gguf": "Q4_0"}, {"gguf": "Q8_0"},
                                                              {"format": "gguf", "type": "Q4_0"}]))
    message = load_error(path)
    assert "(1 problem)" in message.splitlines()[0]
    assert "outputs lists gguf-Q4_0 more than once" in message
    assert f"{path.resolve()}:" in message


def test_unknown_gguf_type_is_refused(tmp_path):
    path = write_recipe(tmp_path, lambda d: d.update(outputs=[{"gguf": "Q8_0"}, {"gguf": "Q3_K"}]))
    message = load_error(path)
    assert "(1 problem)" in message.splitlines()[0]
    line = problem_line(message, "outputs.1.type")
    assert line.strip().startswith(where(path, "gguf: Q3_K") + ": outputs.1.type: ")
    assert "'Q4_0'" in line and "(got 'Q3_K')" in line


def test_unknown_output_format_is_refused(tmp_path):
    path = write_recipe(tmp_path, lambda d: d.update(outputs=[{"onnx": "int8"}]))
    message = load_error(path)
    line = problem_line(message, "outputs.0.format")
    assert line.strip().startswith(where(path, "onnx: int8") + ": outputs.0.format: unknown format 'onnx' (formats: gguf, ")
    assert all(": outputs.0." in l for l in message.splitlines()[1:])


@pytest.mark.parametrize("output, expected", [
    ({"format": "compressed-tensors", "type": "int4", "activations": "int8"}, "int8 (W8A8) needs type int8"),
    ({"format": "compressed-tensors", "type": "int8", "activations": "fp8"}, "activations fp8 beside int8 weights"),
    ({"format": "compressed-tensors", "type": "fp8", "activations": "int8"}, "activations int8 beside fp8 weights"),
    ({"format": "compressed-tensors", "type": "int8", "activations": "int8", "group_size": 32},
     "needs type int8, symmetric codes and group_size channel"),
    ({"format": "compressed-tensors", "type": "int8", "activation_scales": "static"},
     "activation_scales static needs int8 or fp8 activations"),
    ({"format": "compressed-tensors", "type": "int4", "group_size": "128x128"}, "group_size 128x128 is FP8_BLOCK"),
    ({"format": "compressed-tensors", "type": "nvfp4", "group_size": 32}, "nvfp4 has symmetric codes and a scale per 16"),
    ({"format": "compressed-tensors", "type": "mxfp4", "activations": "nvfp4"}, "activations nvfp4 beside mxfp4"),
    ({"format": "compressed-tensors", "type": "nvfp4", "activation_scales": "static"},
     "nvfp4's global input scale is always calibrated"),
    ({"format": "compressed-tensors", "type": "fp8", "group_size": "128x128", "activation_scales": "static"},
     "type fp8 with dynamic fp8 activations"),
    ({"format": "compressed-tensors", "type": "fp8", "group_size": "128x128", "activations": "float"},
     "type fp8 with dynamic fp8 activations"),
])
def test_activations_the_engine_does_not_run_beside_the_weights_are_refused(tmp_path, output, expected):
    line = problem_line(load_error(write_recipe(tmp_path, lambda d: d.update(outputs=[output]))), "outputs.0")
    assert expected in line


@pytest.mark.parametrize("output, override, expected", [
    ({"format": "compressed-tensors", "type": "int8", "activations": "int8"}, {"bits": 4},
     "W8A8 (activations int8) runs symmetric int8 codes with a scale per row; this Linear asks 4 bits"),
    ({"format": "compressed-tensors", "type": "fp8", "group_size": "128x128"}, {"group_size": 64},
     "compressed-tensors fp8 scales each row (group_size channel) or 128x128 blocks, not groups of 64"),
    ({"format": "compressed-tensors", "type": "nvfp4"}, {"bits": 8},
     "compressed-tensors nvfp4 holds symmetric 4-bit float codes with a scale per 16"),
])
def test_an_override_the_output_type_cannot_hold_is_refused(tmp_path, output, override, expected):
    path = write_recipe(tmp_path, lambda d: (d.update(outputs=[output]),
                                             set_in(d, "quantize.overrides", {"*.mlp.down_proj": override})))
    assert expected in load_error(path)


def test_static_activation_scales_with_awq_are_refused(tmp_path):
    path = write_recipe(tmp_path, lambda d: (set_in(d, "quantize.method", "awq"), d.update(outputs=[
        {"format": "compressed-tensors", "type": "fp8", "activation_scales": "static"}])))
    assert "compressed-tensors-fp8-channel-static has static activation or KV-cache scales, measured on the inputs " \
        "the built layers get, and quantize.method awq rescales those inputs" in load_error(path)


def test_smoothquant_with_awq_is_refused(tmp_path):
    path = write_recipe(tmp_path, lambda d: (set_in(d, "quantize.method", "awq"),
                                             set_in(d, "quantize.smoothquant", {"alpha": 0.8})))
    line = problem_line(load_error(path), "quantize")
    assert "smoothquant and method awq both scale the inputs norms produce" in line


def test_outputs_must_not_be_empty(tmp_path):
    line = problem_line(load_error(write_recipe(tmp_path, lambda d: d.update(outputs=[]))), "outputs")
    assert "at least 1 item" in line


# ---------------------------------------------------------------------------------- paths and ${VARS}

def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "recipes"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def mutate(d):
        d["model"]["source"] = "models/tiny"
        d["calibration"]["source"] = "../data/cal.txt"
        d["validate"]["source"] = "/abs/eval.jsonl"
        d["package"]["destination"] = "s3://bucket/tiny"
        d["description"] = "models/tiny"  # not a path field: left alone
        # not a path field either, and stays as written (globs are names: tests/test_path_traversal.py)
        d["quantize"]["ignore"] = ["models.*"]
    path = write_recipe(folder, mutate)
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(path)
    assert recipe.model.source == str(folder.resolve() / "models" / "tiny")
    assert recipe.calibration.source == str((tmp_path / "project" / "data" / "cal.txt").resolve())
    assert recipe.validate_.source == "/abs/eval.jsonl"
    assert recipe.package.destination == "s3://bucket/tiny"
    assert recipe.description == "models/tiny"
    assert recipe.quantize.ignore == ["models.*"]
    # and a relative path to the recipe itself works the same
    assert load_recipe(os.path.relpath(path, elsewhere)) == recipe


def test_env_var_default_when_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("QF_TEST_OUT", raising=False)
    path = write_recipe(tmp_path / "r", lambda d: d["package"].update(destination="${QF_TEST_OUT:-../out}/tiny"))
    assert load_recipe(path).package.destination == str((tmp_path / "out" / "tiny").resolve())


def test_env_var_value_when_set(tmp_path, monkeypatch):
    path = write_recipe(tmp_path / "r", lambda d: d["package"].update(destination="${QF_TEST_OUT:-../out}/tiny"))
    monkeypatch.setenv("QF_TEST_OUT", "/srv/builds")
    assert load_recipe(path).package.destination == "/srv/builds/tiny"
    monkeypatch.setenv("QF_TEST_OUT", "builds")  # a relative value is relative to the recipe too
    assert load_recipe(path).package.destination == str((tmp_path / "r" / "builds" / "tiny").resolve())


def test_env_var_set_but_empty_takes_the_default(tmp_path, monkeypatch):
    """`${VAR:-default}` is the shell's: the default is used when VAR is unset *or empty*.

    (Otherwise `QUANTFAB_OUT= quantfab run recipes/demo.yaml` would publish to `/demo`.)
    """
    path = write_recipe(tmp_path / "r", lambda d: d["package"].update(destination="${QF_TEST_OUT:-../out}/tiny"))
    monkeypatch.setenv("QF_TEST_OUT", "")
    assert load_recipe(path).package.destination == str((tmp_path / "out" / "tiny").resolve())


def test_env_vars_expand_in_any_string(tmp_path, monkeypatch):
    monkeypatch.setenv("QF_TEST_NAME", "from-env")
    monkeypatch.delenv("QF_TEST_UNSET", raising=False)

    def mutate(d):
        d["name"] = "${QF_TEST_NAME:-tiny}"
        d["description"] = "built by ${QF_TEST_UNSET:-nobody} for ${QF_TEST_NAME}"
        d["calibration"]["source"] = "synthetic://tokens?seed=${QF_TEST_SEED:-7}"
    recipe = load_recipe(write_recipe(tmp_path, mutate))
    assert recipe.name == "from-env"
    assert recipe.description == "built by nobody for from-env"
    assert recipe.calibration.source == "synthetic://tokens?seed=7"


# ----------------------------------------------------------------------------------------------- schema

def test_schema_command_prints_json_schema(capsys):
    assert cli_main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"model", "calibration", "quantize", "outputs", "validate", "package"} <= set(schema["properties"])
    assert "validate_" not in schema["properties"]  # the YAML key, not the Python attribute
    assert {"name", "model", "calibration", "quantize", "outputs", "validate", "package"} <= set(schema["required"])
    assert schema["additionalProperties"] is False
    assert schema["properties"]["outputs"]["minItems"] == 1


# -------------------------------------------------------------------------------------------------- CLI
#
# Each `quantfab` process takes seconds to import its dependencies, so all of them are started at once
# (one module-scoped fixture) and each test checks its own result.

LONG = ("a_build_folder_with_a_rather_long_name_as_ci_runners_make_them", "and_another_nested_folder_for_recipes")


@dataclass
class CliRun:
    folder: Path
    recipe: Path
    proc: subprocess.CompletedProcess[str]


def _cli_cases(root: Path) -> dict[str, tuple[Path, Path, list[str]]]:
    """name -> (working folder, recipe, quantfab arguments). Few: each process costs seconds of imports."""
    def two_problems(d: dict[str, Any]) -> None:
        set_in(d, "quantize.methd", "rtn")
        set_in(d, "calibration.samples", -1)
    run_folder = root / "run"
    run_recipe = write_recipe(run_folder.joinpath(*LONG), two_problems)  # a long path, given absolute
    plan_folder = root / "plan"
    plan_recipe = write_recipe(plan_folder, lambda d: set_in(d, "quantize.methd", "rtn"))
    nf4_folder = root / "nf4"
    nf4_recipe = write_recipe(nf4_folder, lambda d: d["quantize"].update(method="nf4"))
    return {
        "run": (run_folder, run_recipe, ["run", str(run_recipe)]),
        "plan": (plan_folder, plan_recipe, ["plan", "recipe.yaml", "--set", "calibration.samples=many"]),
        "nf4": (nf4_folder, nf4_recipe, ["run", "recipe.yaml"]),
    }


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, CliRun]:
    cases = _cli_cases(tmp_path_factory.mktemp("cli"))
    procs = {}
    try:
        for name, (folder, _, args) in cases.items():
            env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # as in CI: no terminal
            env["PREFECT_HOME"] = str(folder / "prefect-home")
            env["QUANTFAB_STORE"] = str(folder / "store")
            procs[name] = subprocess.Popen([str(QUANTFAB), *args], cwd=folder, env=env, text=True,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        runs = {}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=600)  # a safety net: several CLIs start at once on 2 cores
            folder, recipe, _ = cases[name]
            runs[name] = CliRun(folder, recipe, subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        return runs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def words(text: str) -> str:
    """``text`` with runs of whitespace (line breaks included) as one space."""
    return " ".join(text.split())


def assert_failed_cleanly(run: CliRun) -> None:
    """Exit 2, a message and no traceback, and neither Prefect nor the store was ever started."""
    assert run.proc.returncode == 2, run.proc.stderr
    assert "Traceback" not in run.proc.stderr + run.proc.stdout
    assert run.proc.stderr.startswith("error: ")
    assert run.proc.stdout == ""
    assert not list((run.folder / "prefect-home").rglob("*.db"))  # an empty list when the folder is absent
    assert not (run.folder / "store").exists()


def test_quantfab_script_is_installed():
    assert QUANTFAB.is_file()


def test_cli_run_bad_recipe_exits_2_without_traceback(cli_runs):
    run = cli_runs["run"]
    assert_failed_cleanly(run)
    assert f"{where(run.recipe, 'methd:')}:" in run.proc.stderr
    assert f"{where(run.recipe, 'samples: -1', at='-1')}:" in run.proc.stderr
    assert "quantize.methd: unknown field" in words(run.proc.stderr)
    assert "calibration.samples: Input should be greater than or equal to 1 (got -1)" in words(run.proc.stderr)


def test_cli_error_lines_are_not_wrapped(cli_runs):
    """Each problem stays one line with one copyable `file:line:column`, however long the path.

    stderr is not a terminal here (as in CI or `2> log`): nothing may be wrapped at 80 columns.
    """
    run = cli_runs["run"]
    assert len(str(run.recipe)) > 120
    assert_failed_cleanly(run)
    lines = run.proc.stderr.splitlines()
    assert lines[0] == f"error: {run.recipe}: the recipe is not valid (2 problems):"
    assert (f"  {where(run.recipe, 'samples: -1', at='-1')}: calibration.samples: "
            "Input should be greater than or equal to 1 (got -1)") in lines, run.proc.stderr
    assert (f"  {where(run.recipe, 'methd:')}: quantize.methd: "
            "unknown field (check the spelling; `quantfab schema` lists the fields)") in lines, run.proc.stderr


def test_cli_plan_bad_recipe_and_bad_set_exit_2(cli_runs):
    run = cli_runs["plan"]
    assert_failed_cleanly(run)
    assert f"{where(run.recipe, 'methd:')}:" in run.proc.stderr
    assert "quantize.methd: unknown field" in words(run.proc.stderr)
    assert "--set calibration.samples" in run.proc.stderr
    assert "calibration.samples: Input should be a valid integer" in words(run.proc.stderr)
    assert "(got 'many')" in words(run.proc.stderr)


def test_cli_run_refuses_a_grid_the_format_cannot_store(cli_runs):
    run = cli_runs["nf4"]
    assert_failed_cleanly(run)
    assert "outputs[0]: gguf-Q4_0 cannot store quantize.method nf4: gguf has no NF4 grid" in words(run.proc.stderr)


def test_a_gate_on_an_unmeasured_metric_is_refused(tmp_path):
    path = write_recipe(tmp_path, lambda d: d["validate"].update(metrics=["perplexity"], gates={"max_kl": 0.1}))
    message = load_error(path)
    assert "validate.gates" in message and "needs metric kl_divergence" in message


def test_metrics_without_gates_may_be_narrowed(tmp_path):
    path = write_recipe(tmp_path, lambda d: d["validate"].update(metrics=["perplexity"], gates={"max_ppl_increase": 0.1}))
    assert load_recipe(path).validate_.metrics == ["perplexity"]
