"""Say what was built: every tensor that is not what the recipe asked is reported with its reason, no
Linear turns float silently, and a size gate stops an oversized build.

Synthetic Llamas with real shapes: hidden 576 (SmolLM-135M's: 576 is a multiple of neither 256 nor 128)
and hidden 1536 with an intermediate size of 1344 (its down_proj rows fit neither).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from quantfab.pipelines.plan import plan, render
from quantfab.pipelines.recipe_loading import load_recipe
from quantfab.tasks import validate as validate_mod
from quantfab.tasks.convert.gguf import GGUFTensors
from quantfab.tasks.download import materialize
from quantfab.tasks.errors import UserError
from quantfab.tasks.package import model_card
from quantfab.tasks.store import Store

REPO = Path(__file__).resolve().parent.parent
W576 = "synthetic://llama?layers=2&hidden=576&intermediate=1536&heads=9&kv_heads=3&vocab=512&seed=0"
W1536 = "synthetic://llama?layers=2&hidden=1536&intermediate=1344&heads=12&kv_heads=2&vocab=512&seed=0"
SMALL = ["calibration.samples=4", "calibration.seq_len=32", "validate.tokens=256", "validate.window=64",
         "calibration.source=synthetic://tokens", "validate.source=synthetic://tokens", "quantize.method=rtn"]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def recipe(source: str, outputs: str, *more: str):
    return load_recipe(REPO / "recipes" / "demo.yaml", [f"model.source={source}", f"outputs={outputs}", *SMALL, *more])


def test_a_576_wide_q4_k_m_plan_lists_each_fallback_as_llama_cpp_decides_it(tmp_path: Path) -> None:
    p = plan(recipe(W576, "[{gguf: Q4_K_M}]"), str(tmp_path / "store"))
    found = dict(line.split(": ", 1) for line in p.fallbacks["gguf-Q4_K_M"])
    to_q5_0 = "row 576 not a multiple of 256 (Q4_K) -> Q5_0"
    to_q8_0 = "row 576 not a multiple of 256 (Q6_K) -> Q8_0"
    expected = {f"model.layers.{i}.{lin}": to_q5_0 for i in range(2) for lin in LINEARS if lin != "mlp.down_proj"}
    expected["model.layers.1.self_attn.v_proj"] = to_q8_0  # use_more_bits raises the last layer's attn_v to Q6_K
    expected |= {"model.embed_tokens": to_q5_0, "lm_head": to_q8_0}
    assert found == expected  # down_proj rows are 1536 = 6 x 256: no fallback
    size, bits = p.sizes["gguf-Q4_K_M"]
    assert bits > p.nominal["gguf-Q4_K_M"]
    text = render(p)
    assert f"14 tensors differ from the recipe: 12 × {to_q5_0}; 2 × {to_q8_0}" in text
    assert f"(nominal {p.nominal['gguf-Q4_K_M']:.3f})" in text


def test_a_group_that_does_not_divide_is_refused_at_plan_naming_the_linears_and_the_groups_that_fit(tmp_path: Path) -> None:
    int4 = "[{format: compressed-tensors, type: int4, group_size: 128}]"
    with pytest.raises(UserError) as refused:
        plan(recipe(W576, int4), str(tmp_path / "store"))
    message = str(refused.value)
    assert message.startswith("outputs[compressed-tensors-int4-g128]: 12 Linears would be kept in float "
                              "(row 576 not a multiple of 128 (INT4_G128_SYM) -> float)")
    assert "model.layers.0.self_attn.q_proj" in message and "down_proj" not in message
    assert "group sizes that divide every quantized row: 64, 32, 16" in message
    with pytest.raises(UserError, match=r"2 Linears would be kept in float .*row 1344: 2 \(model.layers.0.mlp.down_proj, "
                                        r"model.layers.1.mlp.down_proj\).*divide every quantized row: 64, 32, 16"):
        plan(recipe(W1536, int4), str(tmp_path / "store"))


def test_keep_float_is_reported_and_warned_about(tmp_path: Path) -> None:
    p = plan(recipe(W576, "[{format: compressed-tensors, type: int4, group_size: 128}]", "quantize.indivisible=keep_float"),
             str(tmp_path / "store"))
    key = "compressed-tensors-int4-g128"
    assert len(p.fallbacks[key]) == 12 and all(f.endswith("-> float") for f in p.fallbacks[key])
    notes = p.notes(key)
    assert notes[0] == "12 tensors differ from the recipe: 12 × row 576 not a multiple of 128 (INT4_G128_SYM) -> float"
    assert notes[1].startswith("WARNING: ") and "over the nominal" in notes[1]


def test_q4_k_m_of_a_1536_wide_model_falls_back_only_where_rows_do_not_fit(tmp_path: Path) -> None:
    p = plan(recipe(W1536, "[{gguf: Q4_K_M}]"), str(tmp_path / "store"))
    assert p.fallbacks["gguf-Q4_K_M"] == [
        "model.layers.0.mlp.down_proj: row 1344 not a multiple of 256 (Q4_K) -> Q5_0",
        "model.layers.1.mlp.down_proj: row 1344 not a multiple of 256 (Q6_K) -> Q8_0"]  # the last layer: use_more_bits
    assert p.notes("gguf-Q4_K_M")[-1].startswith("2 tensors differ")


@pytest.fixture(scope="module")
def built_576(tmp_path_factory: pytest.TempPathFactory, stages):
    """The 576-wide model built to Q4_K_M and to int4 with the largest group that divides every row."""
    store = Store(str(tmp_path_factory.mktemp("fallback-store")))
    r = recipe(W576, "[{gguf: Q4_K_M}, {format: compressed-tensors, type: int4, group_size: 128}]",
               "quantize.indivisible=largest_group", "validate.gates.max_bits_per_weight=6.0")
    return r, store, stages(r, store)


def test_the_built_q4_k_m_file_holds_the_reported_types(built_576) -> None:
    r, store, built = built_576
    f = built.converted.files["gguf-Q4_K_M"]
    assert f.fallbacks == plan(r, store.url).fallbacks["gguf-Q4_K_M"]
    path = materialize(store, f.files).path / f.path
    types = dict(GGUFTensors(path, materialize(store, built.model.files).config()).types())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for line in f.fallbacks:
        name, why = line.split(": ", 1)
        assert types[names.get_name(name) + ".weight"] == why.rsplit("-> ", 1)[1], line
    assert f.tensor_types["Q5_0"] == 12 and f.tensor_types["Q8_0"] == 2
    assert f.nominal_bits_per_weight < f.bits_per_weight


def test_largest_group_builds_int4_with_group_64(built_576) -> None:
    _, store, built = built_576
    f = built.converted.files["compressed-tensors-int4-g128"]
    assert len(f.fallbacks) == 14  # every quantized Linear, 1536-row down_proj included: one group for the output
    assert all(line.endswith("group 128 -> 64: rows of 576 are not multiples of 128 (quantize.indivisible: "
                              "largest_group)") for line in f.fallbacks)
    config = json.loads(store.read_bytes(f.files[f"{f.path}/config.json"]))
    groups = {g["weights"]["group_size"] for g in config["quantization_config"]["config_groups"].values()}
    assert groups == {64}


def test_the_report_gate_and_model_card_say_it(built_576) -> None:
    r, store, built = built_576
    metrics = validate_mod.measure(built.model, built.converted, r.outputs, r.validate_, "cpu", store)
    quality = validate_mod.judge(metrics, r.validate_.gates, built.converted, built.quantized, store)
    report = json.loads(store.read_bytes(quality.report))
    q4 = report["outputs"]["gguf-Q4_K_M"]
    assert len(q4["fallbacks"]) == 14 and q4["nominal_bits_per_weight"] < q4["bits_per_weight"]
    int4 = report["outputs"]["compressed-tensors-int4-g128"]
    assert int4["gates"]["max_bits_per_weight"]["passed"] is (int4["bits_per_weight"] <= 6.0)
    assert not quality.passed and any(f.startswith("compressed-tensors-int4-g128 max_bits_per_weight") for f in quality.failures)
    assert "gguf-Q4_K_M: 14 tensors differ from the recipe (each listed in quality.json): 12 × row 576" in quality.table
    card = model_card(built.model, built.converted, quality, "name: w576\n")
    assert "12 × row 576 not a multiple of 256 (Q4_K) -> Q5_0<br>2 × row 576 not a multiple of 256 (Q6_K) -> Q8_0" in card


def test_a_gguf_row_that_fits_no_32_block_is_refused_unless_kept_in_float(tmp_path: Path) -> None:
    """intermediate 688 (16 x 43): llama.cpp would keep down_proj in F16; quantfab asks first."""
    odd = "synthetic://llama?layers=2&hidden=256&intermediate=688&heads=4&kv_heads=2&vocab=512"
    with pytest.raises(UserError, match=r"outputs\[gguf-Q8_0\]: 2 Linears would be kept in float \(row 688 not a "
                                        r"multiple of 32 \(Q8_0\) -> F16\).*no group size this format accepts"):
        plan(recipe(odd, "[{gguf: Q8_0}]"), str(tmp_path / "store"))
    p = plan(recipe(odd, "[{gguf: Q8_0}]", "quantize.indivisible=keep_float"), str(tmp_path / "store"))
    assert p.fallbacks["gguf-Q8_0"] == [f"model.layers.{i}.mlp.down_proj: row 688 not a multiple of 32 (Q8_0) -> F16"
                                        for i in range(2)]


def test_gptq_on_a_lattice_mix_codes_the_lattice_tensors_with_llama_cpps_search_and_says_so(tmp_path: Path) -> None:
    """IQ2_M on a 256-wide model: gptq codes one column at a time, so the IQ2_S / IQ3_S tensors (a codebook point per
    group of 8 weights) go to their own search (rtn), listed with the reason; Q4_K's attn_v stays gptq's. Without
    an importance matrix IQ2_M is refused at plan time, as llama-quantize refuses it."""
    w256 = "synthetic://llama?layers=2&hidden=256&intermediate=512&heads=4&kv_heads=1&vocab=512&seed=0"
    p = plan(recipe(w256, "[{gguf: IQ2_M}]", "quantize.method=gptq"), str(tmp_path / "store"))
    found = dict(line.split(": ", 1) for line in p.fallbacks["gguf-IQ2_M"])
    assert found == {f"model.layers.{i}.{lin}": f"gptq cannot code {t} -> rtn" for i in range(2) for lin, t in (
        ("self_attn.q_proj", "IQ2_S"), ("self_attn.k_proj", "IQ2_S"), ("self_attn.o_proj", "IQ3_S"),
        ("mlp.gate_proj", "IQ2_S"), ("mlp.up_proj", "IQ2_S"), ("mlp.down_proj", "IQ2_S"))}
    with pytest.raises(UserError, match="IQ2_M: blk.0.ffn_down.weight gets IQ2_S, which llama.cpp quantizes only with "
                                        "an importance matrix"):
        plan(recipe(w256, "[{format: gguf, type: IQ2_M, imatrix: false}]"), str(tmp_path / "store2"))
