"""llama.cpp's importance matrix: written beside a GGUF output from the calibrate stage's statistics, in llama.cpp's
own GGUF imatrix format, and taken by llama-quantize --imatrix (marked ``llama_cpp``; needs llama.cpp's tools
built, see bench/consumers/build_llama_cpp_tools.sh, in ``QUANTFAB_LLAMA_CPP_TOOLS``)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from quantfab.pipelines.recipe_loading import load_recipe
from quantfab.tasks import calibrate as calibrate_mod
from quantfab.tasks import download as download_mod
from quantfab.tasks.convert.gguf_types import DEFAULT_TYPE
from quantfab.tasks.convert.stage import convert
from quantfab.tasks.download import materialize
from quantfab.tasks.quantize.assign import reads_full_statistics, reads_statistics
from quantfab.tasks.quantize.stage import quantize
from quantfab.tasks.store import Store

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tinystories-656k-q4_0.yaml"
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
HF_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


class Build:
    def __init__(self, outputs: str, store: Store, overrides: tuple[str, ...] = ()):
        r = load_recipe(RECIPE, ["calibration.samples=6", "calibration.seq_len=48", "quantize.method=rtn",
                                 f"outputs={outputs}", *overrides])
        self.recipe, self.store = r, store
        self.model = download_mod.download(r.model.source, None, r.model.include, False, store)
        folder = materialize(store, self.model.files)
        config, weights = folder.config(), folder.weights()
        statistics = reads_statistics(config, weights.tensors, r.quantize, list(r.outputs))
        diagonal = statistics and not reads_full_statistics(config, weights.tensors, r.quantize, list(r.outputs))
        self.calibration = calibrate_mod.calibrate(self.model, r.calibration.source, r.calibration.samples,
                                                   r.calibration.seq_len, r.calibration.seed, r.calibration.text_field,
                                                   "cpu", store, statistics, diagonal=diagonal)  # as the flow decides
        self.quantized = quantize(self.model, self.calibration, r.quantize, r.outputs, "cpu", store)
        self.converted = convert(self.model, self.quantized, r.outputs, r.name, store, self.calibration)
        self.folder = folder

    def file(self, key: str, name: str) -> Path:
        return materialize(self.store, self.converted.files[key].files).path / name


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Build:
    store = Store(str(tmp_path_factory.mktemp("imatrix-store")))
    return Build("[{gguf: Q4_K_M}, {format: gguf, type: F16, imatrix: true}, "
                 "{format: gguf, type: Q4_K_M, imatrix: false}]", store)


def _squares_by_transformers(build: Build) -> dict[str, np.ndarray]:
    """Each Linear's sum over the calibration tokens of its input's squares, from transformers' own forward."""
    from transformers import AutoModelForCausalLM

    with safe_open(str(build.store.local_path(build.calibration.tokens)), framework="pt") as f:
        ids = f.get_tensor("input_ids")
    model = AutoModelForCausalLM.from_pretrained(build.folder.path, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def add(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        return add
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            module.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        model(input_ids=ids)
    return {name: s.numpy() for name, s in sums.items()}


def test_the_imatrix_is_llama_cpps_format_of_every_linears_input_squares(build: Build) -> None:
    """One ``<tensor>.in_sum2`` (sum of each input column's squares) and ``<tensor>.counts`` (tokens) per decoder
    Linear under its GGUF name, as llama-imatrix writes them; the sums equal a transformers forward's."""
    key = "gguf-Q4_K_M"
    f = build.converted.files[key]
    assert set(f.files) == {f.path, f.path.removesuffix(".gguf") + ".imatrix.gguf"}
    reader = gguf.GGUFReader(build.file(key, f.path.removesuffix(".gguf") + ".imatrix.gguf"))
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.type") == "imatrix"
    assert field("imatrix.chunk_count") == 6 and field("imatrix.chunk_size") == 48
    assert field("imatrix.datasets") == [build.recipe.calibration.source]
    tensors = {t.name: t for t in reader.tensors}
    layers = int(build.folder.config().num_hidden_layers)
    names = [f"blk.{i}.{t}.weight" for i in range(layers) for t in LINEARS]
    assert sorted(tensors) == sorted(n + s for n in names for s in (".in_sum2", ".counts"))
    expected = _squares_by_transformers(build)
    for name in names:
        i, t = int(name.split(".")[1]), name.split(".")[2]
        sums, counts = tensors[name + ".in_sum2"], tensors[name + ".counts"]
        assert sums.tensor_type == counts.tensor_type == gguf.GGMLQuantizationType.F32
        assert [int(n) for n in sums.shape] == [len(expected[f"model.layers.{i}.{HF_LINEARS[t]}"])]  # 1-D, as ggml
        assert counts.data.tolist() == [6 * 48]
        np.testing.assert_allclose(np.asarray(sums.data), expected[f"model.layers.{i}.{HF_LINEARS[t]}"], rtol=2e-4)


def test_the_imatrix_ships_beside_an_f16_file_and_weighs_nothing(build: Build) -> None:
    """An F16 file (no codes: what one quantizes with llama-quantize --imatrix) ships it too; bits per weight
    count the model file alone, and the codes differ from those quantized without one."""
    assert any(p.endswith(".imatrix.gguf") for p in build.converted.files["gguf-F16-imatrix"].files)
    with_it, without = build.converted.files["gguf-Q4_K_M"], build.converted.files["gguf-Q4_K_M-noimatrix"]
    assert not any(p.endswith(".imatrix.gguf") for p in without.files) and len(with_it.files) == 2
    assert with_it.bits_per_weight == round(with_it.files[with_it.path].size * 8 / build.model.parameters, 4)
    assert with_it.files[with_it.path] != without.files[without.path]


def test_a_file_quantized_with_it_says_so_as_llama_quantize_does(build: Build) -> None:
    """llama-quantize --imatrix's keys (quantize.imatrix.file, .dataset, .entries_count, .chunks_count) in the file
    whose codes used it; none in the file quantized without one, nor in the F16 file that only ships it."""
    def fields(key: str) -> dict:
        f = build.converted.files[key]
        reader = gguf.GGUFReader(build.file(key, f.path))
        return {k: reader.fields[k].contents() for k in reader.fields if k.startswith("quantize.imatrix.")}
    f = build.converted.files["gguf-Q4_K_M"]
    layers = int(build.folder.config().num_hidden_layers)
    assert fields("gguf-Q4_K_M") == {"quantize.imatrix.file": f.path.removesuffix(".gguf") + ".imatrix.gguf",
                                     "quantize.imatrix.dataset": build.recipe.calibration.source,
                                     "quantize.imatrix.entries_count": layers * len(LINEARS),
                                     "quantize.imatrix.chunks_count": 6}
    assert fields("gguf-Q4_K_M-noimatrix") == fields("gguf-F16-imatrix") == {}


def test_rtn_calibrates_statistics_only_for_an_output_shipping_an_imatrix(build: Build) -> None:
    folder = build.folder
    r = build.recipe
    plain = load_recipe(RECIPE, ["quantize.method=rtn", "outputs=[{format: gguf, type: Q4_K_M, imatrix: false}]"])
    assert not reads_statistics(folder.config(), folder.weights().tensors, plain.quantize, list(plain.outputs))
    assert reads_statistics(folder.config(), folder.weights().tensors, r.quantize, list(r.outputs))


def _tool(name: str) -> Path:
    folder = os.environ.get("QUANTFAB_LLAMA_CPP_TOOLS")
    path = Path(folder) / name if folder else None
    if path is None or not path.is_file():
        pytest.skip(f"{name} not built: set QUANTFAB_LLAMA_CPP_TOOLS to a folder holding llama.cpp's tools "
                    "(bench/consumers/build_llama_cpp_tools.sh)")
    return path


W256 = "synthetic://llama?layers=8&hidden=256&intermediate=512&heads=4&kv_heads=2&vocab=512"


def llama_quantizes_our_bytes(b: Build, tmp_path: Path):
    """For each output after the first (an F32 file with our imatrix): llama-quantize on that F32 file, with our
    imatrix where the output has one, writes the bytes of our file, tensor for tensor. Yields (output, our path)."""
    quantize_tool = _tool("llama-quantize")
    f32 = b.converted.files["gguf-F32-imatrix"]
    source = b.file("gguf-F32-imatrix", f32.path)
    imatrix = b.file("gguf-F32-imatrix", f32.path.removesuffix(".gguf") + ".imatrix.gguf")
    for o in b.recipe.outputs[1:]:
        theirs = tmp_path / f"{o.key}.gguf"
        extra = ["--imatrix", str(imatrix)] if o.imatrix else []
        done = subprocess.run([str(quantize_tool), *extra, str(source), str(theirs), o.type, "2"],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        ours_path = b.file(o.key, b.converted.files[o.key].path)
        ours = {t.name: t for t in gguf.GGUFReader(ours_path).tensors}
        for t in gguf.GGUFReader(theirs).tensors:
            assert ours[t.name].tensor_type == t.tensor_type, (o.key, t.name)
            assert np.array_equal(np.asarray(ours[t.name].data), np.asarray(t.data)), (o.key, t.name)
        yield o, ours_path


@pytest.mark.llama_cpp
def test_llama_quantize_takes_our_imatrix(build: Build, tmp_path: Path) -> None:
    """llama-quantize --imatrix loads every entry of our file and quantizes our F16 file with it: the bytes
    differ from the same quantization without it, and llama.cpp loads the result."""
    quantize_tool = _tool("llama-quantize")
    f16 = build.converted.files["gguf-F16-imatrix"]
    source = build.file("gguf-F16-imatrix", f16.path)
    imatrix = build.file("gguf-F16-imatrix", f16.path.removesuffix(".gguf") + ".imatrix.gguf")
    runs = {}
    for label, extra in (("with", ["--imatrix", str(imatrix)]), ("without", [])):
        out = tmp_path / f"{label}.gguf"
        done = subprocess.run([str(quantize_tool), *extra, str(source), str(out), "Q4_K_M", "2"],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        runs[label] = (out, done.stdout + done.stderr)
    layers = int(build.folder.config().num_hidden_layers)
    assert f"loaded {layers * len(LINEARS)} importance matrix entries" in runs["with"][1]
    assert "did not find imatrix data" not in "\n".join(
        line for line in runs["with"][1].splitlines() if "blk." in line)
    a, b = gguf.GGUFReader(runs["with"][0]), gguf.GGUFReader(runs["without"][0])
    changed = [t.name for t, u in zip(a.tensors, b.tensors) if t.name.startswith("blk.") and
               not np.array_equal(np.asarray(t.data), np.asarray(u.data))]
    assert changed, "llama-quantize wrote the same bytes with and without our importance matrix"


def test_an_expert_set_has_one_row_per_expert(tmp_path: Path, data_dir: Path) -> None:
    """A stacked expert tensor (blk.N.ffn_*_exps) holds one in_sum2 row and one count per expert, in expert
    order, each over the tokens routed to that expert, as llama-imatrix collects a MUL_MAT_ID."""
    experts = 4
    b = Build("[{format: gguf, type: Q8_0, imatrix: true}]", Store(str(tmp_path / "store")),
              (f"model.source=synthetic://qwen3_moe?layers=2&experts={experts}&experts_per_token=2"
               "&expert_intermediate=64", "calibration.source=synthetic://tokens"))
    f = b.converted.files["gguf-Q8_0-imatrix"]
    reader = gguf.GGUFReader(b.file("gguf-Q8_0-imatrix", f.path.removesuffix(".gguf") + ".imatrix.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    hidden = int(b.folder.config().hidden_size)
    for part, width in (("gate", hidden), ("up", hidden), ("down", 64)):
        sums, counts = tensors[f"blk.0.ffn_{part}_exps.weight.in_sum2"], tensors[f"blk.0.ffn_{part}_exps.weight.counts"]
        assert [int(n) for n in sums.shape] == [width, experts] and [int(n) for n in counts.shape] == [1, experts]
        rows = np.asarray(sums.data)
        assert len({r.tobytes() for r in rows}) == experts  # each expert its own inputs
    routed = np.asarray(tensors["blk.0.ffn_gate_exps.weight.counts"].data)[:, 0]
    assert routed.sum() == 6 * 48 * 2  # every token goes to two experts (none under min_tokens here)


def test_convert_keys_on_the_calibration_only_where_an_output_ships_an_imatrix(build: Build) -> None:
    """An rtn build's codes do not read the calibration, so a new calibration leaves its convert cached; an
    output shipping an importance matrix is made from it, so there it is one of convert's inputs."""
    from quantfab.pipelines.keys import stage_inputs

    up = {"download": build.model, "calibrate": build.calibration, "quantize": build.quantized}
    plain = load_recipe(RECIPE, ["quantize.method=rtn", "outputs=[{format: gguf, type: Q4_K_M, imatrix: false}]"])
    assert stage_inputs("convert", plain, build.store.url, up)["calibration"] is None
    assert stage_inputs("convert", build.recipe, build.store.url, up)["calibration"] == build.calibration


EQUAL_TYPES = ("Q4_K_M", "Q3_K_M", "Q2_K", "Q5_K_M", "Q6_K", "Q4_0", "Q5_0", "Q4_1", "Q5_1",  # every weighted rule
               "IQ4_NL", "IQ4_XS")


@pytest.mark.llama_cpp
def test_rtn_with_our_imatrix_writes_llama_quantizes_bytes(tmp_path: Path) -> None:
    """rtn with an importance matrix is llama-quantize --imatrix, and without one llama-quantize: for each file type,
    on a Llama whose rows fit the K-quants (8 layers, so the first-eighth rules apply: Q4_0's ffn_down goes to Q4_1
    with an imatrix, IQ4_NL's to Q5_K without), our file holds the bytes llama-quantize writes from our F32 file
    (and our importance matrix), tensor for tensor."""
    runs = [f"{{format: gguf, type: {t}, imatrix: {i}}}" for t in EQUAL_TYPES for i in ("true", "false")]
    outputs = ", ".join(["{format: gguf, type: F32, imatrix: true}", *runs])
    b = Build(f"[{outputs}]", Store(str(tmp_path / "store")),
              (f"model.source={W256}", "calibration.source=synthetic://tokens"))
    assert len(list(llama_quantizes_our_bytes(b, tmp_path))) == 2 * len(EQUAL_TYPES)



def test_rtn_alone_gathers_the_diagonal_only_and_it_is_xtxs(build: Build, tmp_path: Path) -> None:
    """With nothing but an importance matrix reading them (rtn, no module report), calibrate stores each input's
    column sums of squares, not XᵀX: widths, not widths squared; they equal XᵀX's diagonal (float32 sums in
    another order), and so do the importance matrices made from either. A module report asks for XᵀX again."""
    folder = build.folder
    config, tensors = folder.config(), folder.weights().tensors
    r = build.recipe
    assert reads_statistics(config, tensors, r.quantize, list(r.outputs))
    assert not reads_full_statistics(config, tensors, r.quantize, list(r.outputs))
    report = load_recipe(RECIPE, ["quantize.method=rtn", "quantize.module_report=true", "outputs=[{gguf: Q4_K_M}]"])
    assert reads_full_statistics(config, tensors, report.quantize, list(report.outputs))
    full = calibrate_mod.calibrate(build.model, r.calibration.source, r.calibration.samples, r.calibration.seq_len,
                                   r.calibration.seed, r.calibration.text_field, "cpu", build.store, True)
    for diagonal_blob, full_blob in zip(build.calibration.stats, full.stats):
        with safe_open(str(build.store.local_path(diagonal_blob)), framework="np") as d, \
                safe_open(str(build.store.local_path(full_blob)), framework="np") as f:
            for key in (k for k in d.keys() if k.endswith(".hessian")):
                squares, xtx = d.get_tensor(key), f.get_tensor(key)
                assert squares.shape == (xtx.shape[0],) and xtx.shape == (xtx.shape[0],) * 2
                np.testing.assert_allclose(squares, np.diag(xtx), rtol=1e-5)
                assert d.get_tensor(key.replace("hessian", "count")) == f.get_tensor(key.replace("hessian", "count"))


def test_plan_counts_the_diagonal_and_review_says_when_xtx_comes_back(build: Build, tmp_path: Path) -> None:
    """plan estimates calibrate's store writes and memory from what it will gather: rtn with an importance matrix,
    each input's width in float32; group, which fits codes to XᵀX, widths squared; review names the change."""
    from quantfab.pipelines.plan import plan
    from quantfab.pipelines.review import _gathering

    rtn = plan(load_recipe(RECIPE, ["quantize.method=rtn", "outputs=[{gguf: Q4_K_M}]"]), str(tmp_path / "store"))
    group = plan(load_recipe(RECIPE, ["quantize.method=group", "outputs=[{gguf: Q4_K_M}]"]), str(tmp_path / "store"))
    assert (rtn.gathers, group.gathers) == ("diagonal", "full")
    widths = [128, 128, 384]  # per layer, one per parent and width (plan's count): self_attn's, mlp's two
    layers = int(build.folder.config().num_hidden_layers)
    assert rtn.writes["calibrate"] == layers * sum(4 * w for w in widths)
    assert group.writes["calibrate"] == layers * sum(4 * w * w for w in widths)
    assert rtn.memory["calibrate"] < group.memory["calibrate"]
    assert _gathering("diagonal", "full") == {"calibrate": "the outputs now read the whole XᵀX of the unquantized "
                                              "model's statistics (quantize.method, quantize.overrides or outputs)"}
    assert _gathering("full", "diagonal")["calibrate"].startswith("the outputs now read XᵀX's diagonal alone")
    assert _gathering("none", "diagonal")["calibrate"].startswith("the outputs now read the unquantized model's")


LATTICE_TYPES = ("IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")


@pytest.mark.llama_cpp
def test_lattice_and_mxfp4_file_types_write_llama_quantizes_bytes_and_llama_cpp_runs_them(tmp_path: Path) -> None:
    """The IQ1/IQ2/IQ3 mixes (with our importance matrix, which all but IQ3_S and IQ3_M require; those two without
    one too) and MXFP4_MOE (on a mixture of experts): our file holds the bytes llama-quantize writes from our F32 file,
    tensor for tensor, and llama-perplexity loads and runs each file."""
    perplexity_tool = _tool("llama-perplexity")
    runs = [(t, "true") for t in LATTICE_TYPES] + [("IQ3_S", "false"), ("IQ3_M", "false")]
    dense = Build("[{format: gguf, type: F32, imatrix: true}, "
                  + ", ".join(f"{{format: gguf, type: {t}, imatrix: {i}}}" for t, i in runs) + "]",
                  Store(str(tmp_path / "store")), (f"model.source={W256}", "calibration.source=synthetic://tokens"))
    moe = Build("[{format: gguf, type: F32, imatrix: true}, {gguf: MXFP4_MOE}]", Store(str(tmp_path / "moe")),
                ("model.source=synthetic://qwen3_moe?layers=2&experts=4&experts_per_token=2&expert_intermediate=64",
                 "calibration.source=synthetic://tokens"))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 97}" for i in range(4000)))
    for b in (dense, moe):
        for o, ours_path in llama_quantizes_our_bytes(b, tmp_path):
            types = {t.tensor_type.name for t in gguf.GGUFReader(ours_path).tensors}
            assert DEFAULT_TYPE[o.type] in types, o.key
            ran = subprocess.run([str(perplexity_tool), "-m", str(ours_path), "-f", str(text), "-c", "128",
                                  "--chunks", "2", "-t", "2", "--no-repack"],  # a native build's AMX repacking
                                 capture_output=True, text=True, timeout=600)  # crashes where the VM lacks AMX state
            first = re.search(r"\[1\]([0-9.]+),", ran.stdout)  # the first chunk's perplexity: a forward ran
            assert ran.returncode == 0 and first and np.isfinite(float(first[1])), ran.stderr[-2000:]
