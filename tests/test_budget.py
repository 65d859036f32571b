"""A size budget instead of a type: an output's ``target_bits_per_weight`` makes the allocate stage pick each Linear's
type among the format's (tasks/quantize/allocate.py), quantize and convert build exactly that table, and the file
stays within the budget. mlx-lm loading a budgeted MLX folder is marked ``mlx``."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors import safe_open

from quantfab.pipelines.plan import plan, render
from quantfab.pipelines.quantize import quantize as quantize_flow
from quantfab.pipelines.recipe_loading import RecipeError, load_recipe
from quantfab.tasks import calibrate as calibrate_mod
from quantfab.tasks import download as download_mod
from quantfab.tasks import forward as forward_mod
from quantfab.tasks import validate as validate_mod
from quantfab.tasks.convert import FORMATS
from quantfab.tasks.convert.gguf import GGUFTensors
from quantfab.tasks.convert.stage import convert
from quantfab.tasks.download import materialize
from quantfab.tasks.errors import UserError
from quantfab.tasks.quantize.allocate import Option, allocate, choose, lower_hull
from quantfab.tasks.quantize.stage import quantize
from quantfab.tasks.store import Store

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tinystories-656k-q4_0.yaml"
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
SMALL = ["calibration.samples=16", "calibration.seq_len=64", "quantize.method=rtn"]


def test_the_hull_keeps_the_lower_convex_options_smallest_first() -> None:
    """e costs more than b for more error, f as much error as d for more bytes; c lies above the segment b-d."""
    options = [Option("a", 10, 10.0), Option("b", 20, 4.0), Option("c", 30, 3.5), Option("d", 40, 1.0),
               Option("e", 25, 6.0), Option("f", 50, 1.0)]
    assert [o.grid for o in lower_hull(options)] == ["a", "b", "d"]


def test_choose_takes_the_best_error_per_byte_while_the_budget_holds() -> None:
    """u1 a->b and u2 x->y each buy 0.6 error per byte, u1 b->d 0.15: at 35 bytes both first steps fit, at 34 only
    u1's (ties go by name) and u2 stays at x, and u1's second step fits neither."""
    units = {"u1": [Option("a", 10, 10.0), Option("b", 20, 4.0), Option("d", 40, 1.0)],
             "u2": [Option("x", 5, 8.0), Option("y", 15, 2.0)]}
    assert {u: o.grid for u, o in choose(units, 35).items()} == {"u1": "b", "u2": "y"}
    assert {u: o.grid for u, o in choose(units, 34).items()} == {"u1": "b", "u2": "x"}
    assert {u: o.grid for u, o in choose(units, 55).items()} == {"u1": "d", "u2": "y"}
    assert {u: o.grid for u, o in choose(units, 15).items()} == {"u1": "a", "u2": "x"}


def test_choose_stays_within_the_budget_and_leaves_no_step_that_fits() -> None:
    """On random units: the bytes chosen never pass the budget, and no unit's next hull step fits what is left."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        units = {f"u{i}": [Option(f"g{j}", int(rng.integers(1, 100)), float(rng.random() * 10)) for j in range(5)]
                 for i in range(6)}
        budget = int(rng.integers(50, 400))
        picked = choose(units, budget)
        spent = sum(o.nbytes for o in picked.values())
        least = sum(min(o.nbytes for o in opts) for opts in units.values())
        if least > budget:
            continue
        assert spent <= budget
        for u, o in picked.items():
            hull = lower_hull(units[u])
            i = hull.index(o)
            assert i + 1 == len(hull) or spent + hull[i + 1].nbytes - o.nbytes > budget


class Built:
    """TinyStories-656K through download, calibrate, allocate, quantize and convert for ``outputs``."""

    def __init__(self, store: Store, outputs: str, overrides: tuple[str, ...] = ()):
        r = load_recipe(RECIPE, [*SMALL, f"outputs={outputs}", *overrides])
        self.recipe, self.store = r, store
        self.model = download_mod.download(r.model.source, None, r.model.include, False, store)
        c = r.calibration
        self.calibration = calibrate_mod.calibrate(self.model, c.source, c.samples, c.seq_len, c.seed, c.text_field,
                                                   "cpu", store, True, diagonal=True)
        self.allocation = allocate(self.model, self.calibration, r.quantize, r.outputs, "cpu", store)
        self.quantized = quantize(self.model, self.calibration, r.quantize, r.outputs, "cpu", store, self.allocation)
        self.converted = convert(self.model, self.quantized, r.outputs, r.name, store, self.calibration)
        self.folder = materialize(store, self.model.files)

    def written(self, key: str) -> Path:
        f = self.converted.files[key]
        return materialize(self.store, f.files).path / f.path


def tensor_bits(path: Path, parameters: int) -> float:
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors) * 8 / parameters


@pytest.fixture(scope="module")
def uniform(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(Store(str(tmp_path_factory.mktemp("budget-store"))), "[{gguf: Q5_0}]")


def planned_bits(outputs: str, key: str, store: Store) -> float:
    """An output's bits per weight as plan sizes it (this model's float embedding weighs heavily in HF formats)."""
    return plan(load_recipe(RECIPE, [*SMALL, f"outputs={outputs}"]), store.url).sizes[key][1]


@pytest.fixture(scope="module")
def budgeted(uniform: Built) -> Built:
    """GGUF at uniform Q5_0's own tensor bits per weight; compressed-tensors and mlx halfway between their uniform
    int4 and int8 sizes."""
    target = tensor_bits(uniform.written("gguf-Q5_0"), uniform.model.parameters)
    ct = (planned_bits("[{compressed-tensors: int4}]", "compressed-tensors-int4-g128", uniform.store)
          + planned_bits("[{compressed-tensors: int8}]", "compressed-tensors-int8-channel", uniform.store)) / 2
    mlx = (planned_bits("[{mlx: int4}]", "mlx-int4-g64", uniform.store)
           + planned_bits("[{mlx: int8}]", "mlx-int8-g64", uniform.store)) / 2
    return Built(uniform.store, f"[{{format: gguf, type: Q4_0, target_bits_per_weight: {target!r}}}, "
                 f"{{format: compressed-tensors, type: int4, target_bits_per_weight: {ct:.2f}}}, "
                 f"{{format: mlx, type: int4, target_bits_per_weight: {mlx:.2f}}}]")


def test_a_gguf_budget_mixes_types_within_it_and_the_file_holds_that_table(uniform: Built, budgeted: Built) -> None:
    """The table mixes several of GGUF's block-32 types (rows of 128 fit no K-quant; Q4_0 and IQ4_NL are the least), its bytes are within the budget,
    the file's tensor bytes are exactly what allocate predicted, and each Linear in the file has its table's type."""
    key = next(k for k in budgeted.allocation.outputs if k.startswith("gguf"))
    table = budgeted.allocation.outputs[key]
    params = budgeted.model.parameters
    assert len(table.types) == 14 and len(set(table.types.values())) > 1, table.types
    assert table.bits_per_weight <= table.target_bits_per_weight
    path = budgeted.written(key)
    assert tensor_bits(path, params) == pytest.approx(table.bits_per_weight, abs=1e-12)
    in_file = dict(GGUFTensors(path, budgeted.folder.config()).types())
    for module, grid in table.types.items():
        _, _, layer, block, matrix = module.split(".")
        assert in_file[f"blk.{layer}.{GGUF_NAMES[f'{block}.{matrix}']}.weight"] == grid, module
    assert {m.name: m.grid for m in budgeted.quantized.outputs[key].modules} == table.types


def test_the_searched_mix_beats_the_fixed_type_at_the_same_size(uniform: Built, budgeted: Built) -> None:
    """At uniform Q5_0's own size, the searched GGUF mix is measured closer to the float model (KL on held-out
    WikiText windows, not the calibration text)."""
    key = next(k for k in budgeted.allocation.outputs if k.startswith("gguf"))
    config = budgeted.folder.config()
    ids = validate_mod.eval_windows(budgeted.model, budgeted.recipe.validate_.model_copy(update={"tokens": 4096}),
                                    budgeted.store)
    metrics = validate_mod.compare(config, {"fp32": budgeted.folder.weights(),
                                            "fixed": GGUFTensors(uniform.written("gguf-Q5_0"), config),
                                            "searched": GGUFTensors(budgeted.written(key), config)}, ids, "cpu")
    kl = {k: v["kl_divergence"] for k, v in metrics["outputs"].items()}
    assert kl["searched"] < kl["fixed"], kl


def test_int_and_mlx_budgets_write_mixed_schemes_their_readers_take(budgeted: Built) -> None:
    """compressed-tensors holds one config group per scheme chosen (int4 at a group size, or int8), mlx one
    quantization entry per Linear whose bits differ from the default; each stays within its budget and convert's
    read-back verification of every tensor passed."""
    ct = next(k for k in budgeted.allocation.outputs if k.startswith("compressed-tensors"))
    mlx = next(k for k in budgeted.allocation.outputs if k.startswith("mlx"))
    for key in (ct, mlx):
        table = budgeted.allocation.outputs[key]
        assert table.bits_per_weight <= table.target_bits_per_weight and len(set(table.types.values())) > 1, key
        assert not budgeted.converted.files[key].verification.mismatches
    groups = json.loads((budgeted.written(ct) / "config.json").read_text())["quantization_config"]["config_groups"]
    schemes = {(g["weights"]["num_bits"], g["weights"]["group_size"]) for g in groups.values()}
    chosen = Counter(budgeted.allocation.outputs[ct].types.values())
    assert len(schemes) == len(chosen) > 1
    config = json.loads((budgeted.written(mlx) / "config.json").read_text())
    chosen = {m: re.fullmatch(r"MLX(\d)_G(\d+)_F32", g).groups() for m, g in budgeted.allocation.outputs[mlx].types.items()}
    bits = {m: int(b) for m, (b, _) in chosen.items()}
    assert {m: (q["bits"], q["group_size"]) for m, q in config["quantization"].items() if isinstance(q, dict)} == \
           {m: (int(b), int(g)) for m, (b, g) in chosen.items() if (b, g) != ("4", "64")}
    tensors = budgeted.folder.weights().tensors
    with safe_open(str(budgeted.written(mlx) / "model.safetensors"), framework="np") as f:
        for m, b in bits.items():
            rows, cols = tensors[f"{m}.weight"].shape
            assert f.get_slice(f"{m}.weight").get_shape() == [rows, cols * b // 32], m


def test_a_budget_below_what_the_format_reaches_is_refused_naming_the_floor(uniform: Built) -> None:
    r = load_recipe(RECIPE, [*SMALL, "outputs=[{format: gguf, type: Q4_0, target_bits_per_weight: 1.5}]"])
    with pytest.raises(UserError, match=r"gguf-Q4_0-1.5bpw.*target_bits_per_weight 1.5 is below the smallest this "
                                        r"format reaches on this model, \d+\.\d{3}"):
        allocate(uniform.model, uniform.calibration, r.quantize, r.outputs, "cpu", uniform.store)


@pytest.mark.parametrize("setting, message", [
    ("quantize.bits=4", "quantize.bits would fix it"),
    ("quantize.method=nf4", "method nf4 would fix it"),
])
def test_a_budget_refuses_settings_that_fix_the_type(tmp_path: Path, setting: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPE, [setting, "outputs=[{format: gguf, type: Q4_K_M, target_bits_per_weight: 4.5}]"])


def test_a_budget_is_for_formats_that_hold_several_types(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="target_bits_per_weight picks among int4 and int8"):
        load_recipe(RECIPE, ["outputs=[{format: compressed-tensors, type: fp8, target_bits_per_weight: 6}]"])
    with pytest.raises(RecipeError, match=r"outputs.0.target_bits_per_weight: unknown field"):
        load_recipe(RECIPE, ["outputs=[{format: gptq, type: int4, target_bits_per_weight: 4.5}]"])


def test_the_flow_allocates_and_plan_shows_the_table_before_and_after(data_dir: Path, tmp_path: Path,
                                                                      prefect_env) -> None:
    """plan says allocate will choose the types (sized at the budget); the flow runs allocate between calibrate and
    quantize; then plan shows the chosen mix from the cached table, and a gate change leaves allocate cached."""
    store = tmp_path / "store"
    overrides = [*SMALL, "outputs=[{format: gguf, type: Q4_0, target_bits_per_weight: 7.2}]",
                 f"package.destination={tmp_path / 'out'}"]
    recipe = load_recipe(RECIPE, overrides)
    before = render(plan(recipe, str(store)))
    assert "size budget: types chosen by the allocate stage, after calibrate, for 7.2 bits/weight" in before
    result = quantize_flow(str(RECIPE), overrides, str(store))
    assert result["stages"]["allocate"] == "ran"
    after = render(plan(recipe, str(store)))
    assert "allocate   hit" in after and "size budget: " in after and "Linears: " in after, after
    again = quantize_flow(str(RECIPE), [*overrides, "validate.gates.max_kl=0.2"], str(store))
    assert again["stages"]["allocate"] == again["stages"]["quantize"] == "cached"


@pytest.mark.mlx
def test_mlx_lm_loads_a_budgeted_mix(budgeted: Built, tmp_path: Path) -> None:
    """mlx-lm loads the folder with each Linear's own bits and generates; its logits equal validate's within 1e-4."""
    python = os.environ.get("QUANTFAB_MLX_PYTHON")
    if not python or not Path(python).is_file():
        pytest.skip("mlx-lm not in reach: set QUANTFAB_MLX_PYTHON (bench/consumers/mlx_logits.py says how)")
    key = next(k for k in budgeted.allocation.outputs if k.startswith("mlx"))
    ids = validate_mod.eval_windows(budgeted.model, budgeted.recipe.validate_.model_copy(update={"tokens": 1024}),
                                    budgeted.store)
    np.save(tmp_path / "ids.npy", ids)
    done = subprocess.run([python, str(REPO / "bench" / "consumers" / "mlx_logits.py"), str(budgeted.written(key)),
                           str(tmp_path / "ids.npy"), str(tmp_path / "out.npy")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    bits = {m.removeprefix("model.layers.0."): int(g.split("_")[0].removeprefix("MLX"))
            for m, g in budgeted.allocation.outputs[key].types.items() if m.startswith("model.layers.0.")}
    assert report["layer0_bits"] == bits, report
    reader = FORMATS["mlx"].reader(budgeted.written(key), None)
    ours = forward_mod.logits(budgeted.folder.config(), reader, budgeted.folder.weights(), ids).numpy()
    assert np.abs(np.load(tmp_path / "out.npy") - ours).max() < 1e-4


@pytest.mark.llama_cpp
def test_llama_quantize_builds_the_same_bytes_from_the_shipped_type_table_and_runs_them(tmp_path: Path) -> None:
    """A budgeted GGUF ships its types as llama-quantize --tensor-type-file reads them: llama-quantize, given that
    table, our importance matrix and our F32 file, writes our file's bytes tensor for tensor (K and IQ types mixed on
    256-wide rows), and llama-perplexity runs it."""
    folder = os.environ.get("QUANTFAB_LLAMA_CPP_TOOLS")
    if not folder or not (Path(folder) / "llama-quantize").is_file():
        pytest.skip("llama.cpp's tools not built: set QUANTFAB_LLAMA_CPP_TOOLS (bench/consumers/build_llama_cpp_tools.sh)")
    tools = Path(folder)
    b = Built(Store(str(tmp_path / "store")), "[{format: gguf, type: F32, imatrix: true}, "
              "{format: gguf, type: Q4_K_M, target_bits_per_weight: 4.0}]",
              ("model.source=synthetic://llama?layers=4&hidden=256&intermediate=512&heads=4&kv_heads=2&vocab=512",
               "calibration.source=synthetic://tokens"))
    key = "gguf-Q4_K_M-4bpw"
    ours = b.written(key)
    table = ours.with_name(ours.name.removesuffix(".gguf") + ".tensor-types.txt")
    assert table.is_file() and len(set(b.allocation.outputs[key].types.values())) > 1
    f32 = b.written("gguf-F32-imatrix")
    theirs = tmp_path / "theirs.gguf"
    done = subprocess.run([str(tools / "llama-quantize"), "--imatrix", str(f32.with_name(f32.stem + ".imatrix.gguf")),
                           "--tensor-type-file", str(table), str(f32), str(theirs), "Q4_K_M", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    mine = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    for t in gguf.GGUFReader(theirs).tensors:
        assert mine[t.name].tensor_type == t.tensor_type, t.name
        assert np.array_equal(np.asarray(mine[t.name].data), np.asarray(t.data)), t.name
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 97}" for i in range(4000)))
    ran = subprocess.run([str(tools / "llama-perplexity"), "-m", str(ours), "-f", str(text), "-c", "128", "--chunks",
                          "2", "-t", "2", "--no-repack"], capture_output=True, text=True, timeout=600)
    first = re.search(r"\[1\]([0-9.]+),", ran.stdout)
    assert ran.returncode == 0 and first and np.isfinite(float(first[1])), ran.stderr[-2000:]
