"""`quantfab plan --base REF`: the recipe review a pull request gets, on a real git history."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from quantfab.pipelines.cli import main

REPO = Path(__file__).resolve().parent.parent
CHILD = """\
extends: demo.yaml
name: demo-q8
outputs: [{gguf: Q8_0}]
"""


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"})


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A checkout whose main holds demo.yaml and a child of it; the working tree then edits the parent."""
    (tmp_path / "recipes").mkdir()
    demo = (REPO / "recipes" / "demo.yaml").read_text().replace(  # rtn without importance matrices reads no statistics
        "  - gguf: Q4_0\n  - gguf: Q4_1\n",
        "  - {format: gguf, type: Q4_0, imatrix: false}\n  - {format: gguf, type: Q4_1, imatrix: false}\n")
    assert "imatrix: false" in demo
    (tmp_path / "recipes" / "demo.yaml").write_text(demo)
    (tmp_path / "recipes" / "demo-q8.yaml").write_text(CHILD)
    (tmp_path / "recipes" / "gone.yaml").write_text(demo.replace("name: demo", "name: gone"))
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "base")
    (tmp_path / "recipes" / "demo.yaml").write_text(demo.replace("method: group", "method: rtn")
                                                    .replace("max_kl: 0.5", "max_kl: 0.25"))
    (tmp_path / "recipes" / "gone.yaml").unlink()
    (tmp_path / "recipes" / "new.yaml").write_text(demo.replace("name: demo", "name: new"))
    return tmp_path


def plan_json(project: Path, capsys: pytest.CaptureFixture, *extra: str) -> dict:
    assert main(["plan", "--base", "main", "--project", str(project), "--store", str(project / "store"),
                 "--format", "json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_base_reports_fields_stages_memory_sizes_and_gates(project: Path, capsys: pytest.CaptureFixture) -> None:
    report = plan_json(project, capsys)
    by_path = {r["path"]: r for r in report["recipes"]}
    assert sorted(by_path) == ["recipes/demo-q8.yaml", "recipes/demo.yaml", "recipes/gone.yaml", "recipes/new.yaml"]
    demo = by_path["recipes/demo.yaml"]
    assert demo["status"] == "changed"
    assert demo["fields"] == {"quantize.method": {"before": "group", "after": "rtn"},
                              "validate.gates.max_kl": {"before": 0.5, "after": 0.25}}
    assert demo["reruns"] == {"calibrate": "the outputs no longer read the unquantized model's statistics (quantize.method, "
                                           "quantize.overrides or outputs)", "quantize": "quantize.method changed", "convert": "an upstream stage reruns",
                              "validate": "validate.gates.max_kl changed", "package": "an upstream stage reruns"}
    assert [s["stage"] for s in demo["stages"]] == ["download", "calibrate", "allocate", "quantize", "convert", "validate",
                                                    "package"]
    memory = {s["stage"]: s["peak_memory_bytes"] for s in demo["stages"]}
    assert memory["calibrate"] == 0 and memory["quantize"] > 0 and memory["validate"] > 0  # rtn gathers no statistics
    assert demo["peak_rss_bytes"] > max(memory.values())
    assert sorted(demo["outputs"]) == ["gguf-Q4_0-noimatrix", "gguf-Q4_1-noimatrix", "gguf-Q8_0"]
    assert 8 < demo["outputs"]["gguf-Q8_0"]["bits_per_weight"] < 11
    assert demo["gates"] == {"max_kl": 0.25, "min_top1": 0.5}
    child = by_path["recipes/demo-q8.yaml"]  # unchanged file, changed parent: extends is resolved
    assert child["fields"]["quantize.method"] == {"before": "group", "after": "rtn"}
    assert by_path["recipes/gone.yaml"]["status"] == "removed" and by_path["recipes/gone.yaml"]["stages"] == []
    assert by_path["recipes/new.yaml"]["status"] == "added"


def test_plan_base_limits_to_named_recipes_and_renders_a_pull_request_comment(project: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    assert [r["path"] for r in plan_json(project, capsys, "demo.yaml")["recipes"]] == ["recipes/demo.yaml"]
    assert main(["plan", "--base", "main", "--project", str(project), "--store", str(project / "store"),
                 "--format", "markdown", "demo.yaml"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("### quantfab plan against `main`")
    assert "| `quantize.method` | `group` | `rtn` |" in md
    assert "| quantize | quantize.method changed | miss |" in md
    assert "| download | unchanged | miss |" in md


def test_plan_base_says_calibrate_reruns_when_a_method_change_changes_what_it_gathers(
        project: Path, capsys: pytest.CaptureFixture) -> None:
    """group and rtn read the unquantized model's statistics, gptq measures its own inputs: no calibration
    field changes, but calibrate's work does."""
    demo = project / "recipes" / "demo.yaml"
    demo.write_text(demo.read_text().replace("method: rtn", "method: gptq"))
    reruns = plan_json(project, capsys, "demo.yaml")["recipes"][0]["reruns"]
    assert list(reruns) == ["calibrate", "quantize", "convert", "validate", "package"]
    assert reruns["calibrate"].startswith("the outputs no longer read the unquantized model's statistics")


def test_plan_base_with_nothing_changed_says_so(project: Path, capsys: pytest.CaptureFixture) -> None:
    git(project, "add", "-A")
    git(project, "commit", "-qm", "edit")
    assert main(["plan", "--base", "HEAD", "--project", str(project)]) == 0
    assert capsys.readouterr().out.strip() == "no recipe changed since HEAD"


def test_plan_base_names_a_bad_ref(project: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "--base", "no-such-ref", "--project", str(project)]) == 2
    assert "no-such-ref" in capsys.readouterr().err
