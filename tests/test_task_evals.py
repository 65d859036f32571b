"""Task evals on the user's own items (validate.tasks): multiple-choice log-likelihood scoring as lm-eval scores it,
greedy continuations against the unquantized model's, and the gates on both (issue #25)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quantfab.pipelines.keys import cache_key, stage_inputs
from quantfab.pipelines.recipe_loading import RecipeError, load_recipe
from quantfab.tasks import evals
from quantfab.tasks import validate as validate_mod
from quantfab.tasks.eval_items import task_digest, task_items
from quantfab.tasks.errors import UserError
from quantfab.tasks.modelio import ModelDir
from quantfab.tasks.store import Store

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tinystories-656k-evals.yaml"
NAMES = REPO / "recipes" / "evals" / "tinystories-names.jsonl"
CONTINUE = REPO / "recipes" / "evals" / "tinystories-continue.jsonl"
CPU = torch.device("cpu")


class Perturbed:
    """The float model with one Linear's weights noised: a source the evals run like any output."""

    def __init__(self, weights, name: str, scale: float):
        self.weights, self.name = weights, name
        w = weights.load([name])[name].numpy()
        self.noisy = w + np.random.default_rng(0).normal(0, float(w.std()) * scale, w.shape).astype(np.float32)

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = self.weights.load(names)
        return out | ({self.name: torch.from_numpy(self.noisy)} if self.name in names else {})

    def __getattr__(self, name: str):  # names tensors as the float model does
        return getattr(self.weights, name)


@pytest.fixture(scope="module")
def tiny(data_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ModelDir(data_dir / "tinystories-656k")
    hf = AutoModelForCausalLM.from_pretrained(folder.path, local_files_only=True).eval()
    return folder.config(), folder.weights(), AutoTokenizer.from_pretrained(folder.path, local_files_only=True), hf


def test_the_shipped_task_files_are_built_from_the_shipped_text(data_dir: Path, tmp_path: Path) -> None:
    """recipes/evals/make_tinystories.py writes the shipped files byte for byte from shared/data."""
    subprocess.run([sys.executable, str(REPO / "recipes" / "evals" / "make_tinystories.py"), "--data", str(data_dir),
                    "--out", str(tmp_path)], check=True, timeout=120)
    for shipped in (NAMES, CONTINUE):
        assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes(), shipped.name
    items = task_items(str(NAMES), "multiple_choice", None)
    assert len(items) == 200 and all(len(it["choices"]) == 4 for it in items)
    assert len(task_items(str(CONTINUE), "continuation", None)) == 64


def test_log_likelihoods_and_accuracies_equal_a_direct_computation(tiny) -> None:
    """Each choice's summed log-probability equals transformers' own forward of BOS + context + choice, and the
    accuracies (argmax, and argmax per character: lm-eval's acc and acc_norm) and their standard errors
    (sample standard deviation / √n) follow from them."""
    config, weights, tokenizer, hf = tiny
    items = task_items(str(NAMES), "multiple_choice", 12)
    sequences, starts = evals._choice_sequences(items, tokenizer, 1, " ")
    ours = evals.log_likelihoods(config, {"fp32": weights}, sequences, starts, 256, CPU)["fp32"]
    direct = []
    for it in items:
        for choice in it["choices"]:
            head = tokenizer(it["context"], add_special_tokens=False)["input_ids"]
            whole = tokenizer(it["context"] + " " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[1, *whole]])
            with torch.no_grad():
                lp = torch.log_softmax(hf(ids).logits[0].double(), -1)
            direct.append(sum(lp[p - 1, ids[0, p]].item() for p in range(1 + len(head), ids.shape[1])))
    assert ours == pytest.approx(np.array(direct), rel=1e-5)
    base, _ = evals.multiple_choice_figures(items, {"fp32": ours}, " ", "accuracy_norm")
    per_item = np.split(np.array(direct), np.cumsum([len(it["choices"]) for it in items])[:-1])
    chars = [np.array([len(" " + c) for c in it["choices"]]) for it in items]
    acc = np.array([ll.argmax() == it["gold"] for ll, it in zip(per_item, items)], dtype=float)
    acc_norm = np.array([(ll / n).argmax() == it["gold"] for ll, n, it in zip(per_item, chars, items)], dtype=float)
    assert base["accuracy"] == acc.mean() and base["accuracy_norm"] == acc_norm.mean()
    assert base["accuracy_se"] == pytest.approx(math.sqrt(acc.mean() * (1 - acc.mean()) / (len(acc) - 1)))


def test_the_accuracy_drop_is_paired_over_the_items() -> None:
    """Per item, float correct minus output correct: its mean and its sample standard error."""
    items = [{"context": "c", "choices": ["a", "b"], "gold": 0}] * 4
    sums = {"fp32": np.array([0, -1, 0, -1, 0, -1, 0, -1.0]),  # right on all four
            "q": np.array([-1, 0, 0, -1, 0, -1, -1, 0.0])}  # wrong on items 1 and 4
    base, out = evals.multiple_choice_figures(items, sums, " ", "accuracy")
    assert base["accuracy"] == 1.0 and out["q"]["accuracy"] == 0.5
    d = np.array([1, 0, 0, 1.0])
    assert out["q"]["accuracy_drop"] == 0.5 and out["q"]["accuracy_drop_se"] == pytest.approx(d.std(ddof=1) / 2)


def test_greedy_continuations_equal_transformers_greedy_decoding(tiny) -> None:
    """The unquantized model's continuations, prompts of different lengths in one padded pass per token, equal
    transformers' argmax decoding of each prompt alone."""
    config, weights, tokenizer, hf = tiny
    prompts = [[1, *tokenizer(it["prompt"], add_special_tokens=False)["input_ids"]]
               for it in task_items(str(CONTINUE), "continuation", 6)]
    ours = evals.greedy_continuations(config, weights, prompts, 12, 10_000, CPU)
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(12):
                ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert got == ids[0, len(prompt):].tolist()


def test_the_first_difference_is_where_two_greedy_decodings_part(tiny) -> None:
    """One teacher-forced pass of an output over the float continuation finds where the output's own greedy
    decoding departs from it: the same positions as decoding both and comparing token by token."""
    config, weights, tokenizer, _ = tiny
    damaged = Perturbed(weights, "model.layers.1.mlp.down_proj.weight", 0.1)
    prompts = [[1, *tokenizer(it["prompt"], add_special_tokens=False)["input_ids"]]
               for it in task_items(str(CONTINUE), "continuation", 16)]
    float_greedy = evals.greedy_continuations(config, weights, prompts, 10, 10_000, CPU)
    own_greedy = evals.greedy_continuations(config, damaged, prompts, 10, 10_000, CPU)
    first = np.array([next((t for t, (a, b) in enumerate(zip(f, o)) if a != b), 10)
                      for f, o in zip(float_greedy, own_greedy)], dtype=float)
    assert 0 < (first == 10).sum() < len(first)  # some part, some do not: the comparison is not vacuous
    got = evals.continuation_figures(config, {"fp32": weights, "q": damaged}, prompts, float_greedy, 64, CPU)["q"]
    assert got["first_difference"] == first.mean() and got["exact_match"] == (first == 10).mean()
    assert got["first_difference_se"] == pytest.approx(first.std(ddof=1) / math.sqrt(len(first)))


def test_a_two_bit_output_fails_the_accuracy_gate_and_an_eight_bit_one_passes(data_dir: Path, tmp_path: Path,
                                                                            stages) -> None:
    """TinyStories-656K as MLX int8 and int2 (rtn) scored on the shipped name task: the 8-bit build keeps the float
    model's accuracy within the gate, the 2-bit one falls to near chance and fails it, judged by its interval."""
    r = load_recipe(RECIPE, ["quantize.method=rtn", "outputs=[{mlx: int8}, {mlx: int2}]",
                             "calibration.samples=8", "validate.tokens=1024"])
    store = Store(str(tmp_path / "store"))
    built = stages(r, store)
    digests = {t.label: task_digest(t.source) for t in r.validate_.tasks}
    quality = validate_mod.validate(built.model, built.converted, built.quantized, list(r.outputs), r.validate_,
                                    digests, None, "cpu", store)
    report = json.loads(store.read_bytes(quality.report))
    names = report["outputs"]["mlx-int2-g64"]["tasks"]["tinystories-names"]
    assert report["tasks"]["tinystories-names"]["baseline"]["accuracy_norm"] > 0.7
    assert names["accuracy_drop"] > 0.2
    gates = {key: m["gates"] for key, m in report["outputs"].items()}
    assert gates["mlx-int8-g64"]["max_accuracy_drop:tinystories-names"]["passed"]
    assert not gates["mlx-int2-g64"]["max_accuracy_drop:tinystories-names"]["passed"]
    assert gates["mlx-int8-g64"]["min_exact_match:tinystories-continue"]["passed"]
    assert not quality.passed and any(f.startswith("mlx-int2-g64 max_accuracy_drop:tinystories-names")
                                      for f in quality.failures)
    assert "| unquantized |" in quality.table and "| mlx-int2-g64 |" in quality.table
    assert report["tasks"]["tinystories-continue"]["sha256"] == task_digest(str(CONTINUE))


def test_an_edited_task_file_changes_the_validate_key_and_a_late_edit_is_refused(data_dir: Path, tmp_path: Path) -> None:
    """validate keys on each task file's bytes, so editing the file reruns it; a file edited after the keys were
    computed is refused instead of scored under the old key."""
    items = tmp_path / "mine.jsonl"
    items.write_text('{"prompt": "Once upon a time"}\n')
    r = load_recipe(RECIPE, [f"validate.tasks=[{{source: {items}, kind: continuation}}]", "validate.gates={}"])
    up = {k: None for k in ("download", "calibrate", "allocate", "quantize", "convert")}
    up["download"] = _model()
    before = stage_inputs("validate", r, str(tmp_path / "store"), up)
    assert before["task_digests"] == {"mine": task_digest(str(items))}
    items.write_text('{"prompt": "Once upon a time, there was"}\n')
    after = stage_inputs("validate", r, str(tmp_path / "store"), up)
    assert cache_key("validate", after) != cache_key("validate", before)
    with pytest.raises(UserError, match="changed after this build's cache keys were computed"):
        task_items(str(items), "continuation", None, before["task_digests"]["mine"])


def _model():
    from quantfab.tasks.manifests import ModelManifest

    return ModelManifest(source="x", revision="r", files={}, model_type="llama", num_layers=2, parameters=1)


@pytest.mark.parametrize("line, message", [
    ("not json", "t.jsonl:2: not valid JSON"),
    ('{"context": "c", "choices": ["a"], "gold": 0}', "t.jsonl:2: field 'choices' must list at least two"),
    ('{"context": "c", "choices": ["a", "b"], "gold": 2}', "t.jsonl:2: field 'gold' must be an index into 'choices'"),
    ('{"context": 3, "choices": ["a", "b"], "gold": 0}', "t.jsonl:2: field 'context' must be a string"),
    ('["a", "b"]', "t.jsonl:2: expected an object"),
])
def test_a_bad_item_is_named_by_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"context": "c", "choices": ["a", "b"], "gold": 1}\n' + line + "\n")
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        task_items(str(path), "multiple_choice", None)


def test_task_files_that_are_missing_empty_or_pickled_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such task file"):
        task_items(str(tmp_path / "none.jsonl"), "continuation", None)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no items"):
        task_items(str(tmp_path / "empty.jsonl"), "continuation", None)
    (tmp_path / "p.jsonl").write_bytes(b"\x80\x04\x95" + b"\0" * 16)
    with pytest.raises(UserError, match="is a pickle"):
        task_items(str(tmp_path / "p.jsonl"), "continuation", None)


@pytest.mark.parametrize("override, message", [
    ("validate.tasks=[]", "gate max_accuracy_drop needs a task of kind multiple_choice"),
    ("validate.tasks=[{source: a.jsonl, kind: multiple_choice, new_tokens: 8}]", "new_tokens does not apply to kind multiple_choice"),
    ("validate.tasks=[{source: a.jsonl, kind: continuation, score: accuracy}]", "score does not apply to kind continuation"),
    ("validate.tasks=[{source: x/a.jsonl, kind: multiple_choice}, {source: y/a.jsonl, kind: continuation}]",
     "validate.tasks names a more than once"),
    ("model.source=synthetic://llama?layers=2", "a synthetic:// model has none"),
])
def test_recipe_mistakes_about_tasks_are_named(override: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPE, [override])


def test_the_shipped_recipe_runs_its_tasks_with_their_gates() -> None:
    r = load_recipe(RECIPE)
    assert [(t.label, t.kind) for t in r.validate_.tasks] == [("tinystories-names", "multiple_choice"),
                                                              ("tinystories-continue", "continuation")]
    assert {"max_accuracy_drop", "min_exact_match"} <= set(r.validate_.gates.limits())
    assert r.validate_.tasks[0].source == str(NAMES)  # relative to the recipe file


def test_compare_shows_each_task_figure_beside_kl() -> None:
    """`quantfab compare` lists the task evals' accuracies and exact-match rates, old and new, with the error of
    the difference; the regression verdict stays KL's."""
    from quantfab.tasks.regression import compare_reports, comparison_table

    def report(acc: float) -> dict:
        tasks = {"names": {"accuracy": acc, "accuracy_se": 0.02, "accuracy_norm": acc, "accuracy_norm_se": 0.02,
                           "accuracy_drop": 0.0, "accuracy_drop_se": 0.0}}
        return {"outputs": {"gguf-Q4_0": {"kl_divergence": 0.05, "kl_divergence_se": 0.001, "tasks": tasks}}}

    deltas, regressions = compare_reports(report(0.80), report(0.70), 0.10)
    acc = next(d for d in deltas if d.metric == "names:accuracy")
    assert acc.delta == pytest.approx(-0.10) and acc.se == pytest.approx(math.hypot(0.02, 0.02))
    assert not regressions
    assert "| gguf-Q4_0 | names:accuracy_norm | 80.0 % | 70.0 % | -10 ± 2.8 |" in comparison_table(
        report(0.80), report(0.70), deltas, regressions)


def test_an_item_longer_than_the_model_context_is_refused_by_line(tiny, tmp_path: Path) -> None:
    from quantfab.pipelines.recipe import EvalTaskSpec

    config, weights, tokenizer, _ = tiny
    path = tmp_path / "long.jsonl"
    path.write_text('{"prompt": "Once upon a time"}\n\n{"prompt": "' + "and then " * 300 + '"}\n')
    task = EvalTaskSpec(source=str(path), kind="continuation", new_tokens=8)
    with pytest.raises(UserError, match=r"long.jsonl:3: the item is \d+ tokens with BOS and the continuation, "
                                        r"longer than the model's max_position_embeddings \(512\)"):
        evals.run_tasks(config, tokenizer, {"fp32": weights}, [task], {"long": task_digest(str(path))}, 1, 4096, CPU)
