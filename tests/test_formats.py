"""Serving formats proved by their consumers: each written checkpoint is loaded by the runtime's own reader.

The builds run the stage functions (the same code the flow's tasks call) on the real TinyStories-656K
model, calibrated on 16 x 128 TinyStories tokens; logits are compared on 8 windows of 128 TinyStories tokens.
Packing and verification run on the g++ build of kernels/ (QUANTFAB_KERNELS=cpu), so the consumers read
what the .cu sources packed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from quantfab.pipelines.recipe_loading import load_recipe
from quantfab.tasks import calibrate as calibrate_mod
from quantfab.tasks import download as download_mod
from quantfab.tasks import forward as forward_mod
from quantfab.tasks import validate as validate_mod
from quantfab.tasks.convert import FORMATS
from quantfab.tasks.convert.compressed_tensors import CompressedTensorsOptions
from quantfab.tasks.convert.stage import convert
from quantfab.tasks.download import materialize
from quantfab.tasks.errors import UserError
from quantfab.tasks.quantize.grids import grid_named
from quantfab.tasks.quantize.layer_file import LayerFile
from quantfab.tasks.quantize.stage import quantize
from quantfab.tasks.store import Store
from quantfab.tasks.texts import windows

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tinystories-656k-q4_0.yaml"
CT_INT4_G32_ASYM = "{format: compressed-tensors, type: int4, group_size: 32, symmetric: false}"
W8A8_OUTPUT = "{format: compressed-tensors, type: int8, activations: int8}"
FP8_BLOCK_OUTPUT = "{format: compressed-tensors, type: fp8, group_size: 128x128}"
BUILDS = {  # name -> recipe overrides
    "gptq-mixed": ["quantize.method=gptq", "quantize.overrides={'*.mlp.down_proj': {bits: 8}}",
                   f"outputs=[{{compressed-tensors: int4}}, {CT_INT4_G32_ASYM}, {{compressed-tensors: int8}}]"],
    "awq": ["quantize.method=awq", "outputs=[{compressed-tensors: int4}, {awq: int4}, {gptq: int4}, "
            "{format: awq, type: int4, group_size: 64, symmetric: true}]"],
    "nf4": ["quantize.method=nf4", "outputs=[{bnb-nf4: nf4}]"],
    "nf4-dq": ["quantize.method=nf4", "quantize.nf4.double_quant=true", "outputs=[{bnb-nf4: nf4}]"],
    "gptq-asym": ["quantize.method=gptq", "outputs=[{format: gptq, type: int4, group_size: 32, symmetric: false}, "
                  "{format: gptq, type: int8, group_size: 64}]"],
    "fp8": ["quantize.method=rtn", "outputs=[{compressed-tensors: fp8}]"],
    "gptq-fp8": ["quantize.method=gptq", "outputs=[{compressed-tensors: fp8}]"],
    "w8a8": ["quantize.method=rtn", f"outputs=[{W8A8_OUTPUT}]"],
    "sq-gptq-w8a8": ["quantize.method=gptq", "quantize.smoothquant={alpha: 0.8}", f"outputs=[{W8A8_OUTPUT}]"],
    "fp8-static": ["quantize.method=rtn", "outputs=[{format: compressed-tensors, type: fp8, activation_scales: static}]"],
    "gptq-w8a8-static": ["quantize.method=gptq", f"outputs=[{W8A8_OUTPUT[:-1]}, activation_scales: static}}]"],
    "fp8-block": ["quantize.method=rtn", f"outputs=[{FP8_BLOCK_OUTPUT}]"],
    "gptq-fp8-block": ["quantize.method=gptq", f"outputs=[{FP8_BLOCK_OUTPUT}]"],
    "nvfp4": ["quantize.method=gptq", "outputs=[{compressed-tensors: nvfp4}, "
              "{format: compressed-tensors, type: nvfp4, activations: float}]"],
    "mxfp4": ["quantize.method=rtn", "outputs=[{format: compressed-tensors, type: mxfp4, activations: mxfp4}, "
              "{compressed-tensors: mxfp4}, {format: compressed-tensors, type: nvfp4, activations: float}]"],
    "kv": ["quantize.method=gptq", "outputs=[{format: compressed-tensors, type: fp8, kv_cache: fp8}, "
           "{format: compressed-tensors, type: int4, kv_cache: fp8}]"],
}
FP8 = "compressed-tensors-fp8-channel"
W8A8 = "compressed-tensors-int8-channel-aint8"
LOGIT_ATOL = 2e-4  # fp32 logits of transformers' forward against validate's layer-at-a-time forward


class Build:
    def __init__(self, overrides: list[str], store: Store):
        r = load_recipe(RECIPE, ["calibration.samples=16", "calibration.seq_len=128", *overrides])
        self.recipe, self.store = r, store
        self.model = download_mod.download(r.model.source, None, r.model.include, False, store)
        cal = calibrate_mod.calibrate(self.model, r.calibration.source, r.calibration.samples, r.calibration.seq_len,
                                      r.calibration.seed, r.calibration.text_field, "cpu", store)
        self.quantized = quantize(self.model, cal, r.quantize, r.outputs, "cpu", store)
        self.converted = convert(self.model, self.quantized, r.outputs, r.name, store)
        self.folder = materialize(store, self.model.files)

    def written(self, key: str) -> Path:
        f = self.converted.files[key]
        return materialize(self.store, f.files).path / f.path

    def reconstruction(self, key: str) -> dict[str, np.ndarray]:
        """What the quantizer decided, decoded by the grid: the reference every format must reproduce."""
        out = {}
        for blob in self.quantized.outputs[key].layers:
            lf = LayerFile(self.store.local_path(blob))
            for r in lf.reports():
                if r.grid:
                    out[f"{r.name}.weight"] = grid_named(r.grid).decode(lf.encoded(r.name))
        return out

    def floats(self, key: str) -> dict[str, np.ndarray]:
        """The float tensors the quantizer replaced (AWQ's and SmoothQuant's scaled norms), by full name."""
        return {name: lf.float(name) for blob in self.quantized.outputs[key].layers
                for lf in [LayerFile(self.store.local_path(blob))] for name in lf.float_names()}


@pytest.fixture(scope="module")
def kernels_built_for_the_cpu() -> Iterator[None]:
    old = os.environ.get("QUANTFAB_KERNELS")
    os.environ["QUANTFAB_KERNELS"] = "cpu"
    yield
    if old is None:
        del os.environ["QUANTFAB_KERNELS"]
    else:
        os.environ["QUANTFAB_KERNELS"] = old


@pytest.fixture(scope="module")
def builds(data_dir: Path, tmp_path_factory: pytest.TempPathFactory, kernels_built_for_the_cpu: None) -> dict[str, Build]:
    store = Store(str(tmp_path_factory.mktemp("formats-store")))
    return {name: Build(overrides, store) for name, overrides in BUILDS.items()}


@pytest.fixture(scope="module")
def eval_ids(data_dir: Path, builds: dict[str, Build]) -> np.ndarray:
    tokenizer = next(iter(builds.values())).folder.tokenizer()
    text = (data_dir / "tinystories-valid-head.txt").read_text(encoding="utf-8")[:20_000]
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    return windows(ids, 128, 8, 1, "tinystories-valid-head.txt", "test")


def transformers_from_pretrained(path: Path) -> torch.nn.Module:
    """What `AutoModelForCausalLM.from_pretrained` serves: transformers' compressed-tensors quantizer."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert sum(k.endswith("weight_packed") for k in hf.state_dict()) == 14, "the Linears were not loaded compressed"
    return hf


def compressed_tensors_decompress(path: Path) -> torch.nn.Module:
    """compressed-tensors' own model path: compress a model of this config, load our tensors strictly, decompress.

    The compressor creates every parameter with the name, shape and dtype it writes itself, so a load that
    finds no key missing or unexpected (but the tied head) proves the checkpoint's layout; decompression then runs the package's unpacking and dequantization.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    qc = QuantizationConfig.model_validate({k: v for k, v in config.quantization_config.items()
                                            if k in QuantizationConfig.model_fields})
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    compressor = ModelCompressor(quantization_config=qc)
    apply_quantization_config(model, qc)
    compressor.compress_model(model)
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if config.tie_word_embeddings else []), (missing, unexpected)
    model.tie_weights()  # the head is the embedding, stored once
    compressor.decompress_model(model)
    return model


# transformers 5.23 with compressed-tensors 0.20 cannot load any asymmetric pack-quantized checkpoint: it
# builds the model with compressed-tensors' meta-device compression, which leaves weight_zero_point unpacked
# (rows, groups) while the real compressor (and every checkpoint) packs it along the rows, so loading stops
# on a size mismatch. The asymmetric outputs are proved by compressed-tensors' own decompression instead.
CONSUMERS = {"transformers": transformers_from_pretrained, "compressed-tensors": compressed_tensors_decompress}



def consumer_cases() -> list:
    cases = []
    for build, overrides in BUILDS.items():
        for o in load_recipe(RECIPE, overrides).outputs:
            # (outputs that quantize activations or the KV cache: the tests of those, below)
            if o.format == "compressed-tensors" and o.input_activations == "float" and not o.kv_cache:
                cases += [(build, o.key, c) for c in CONSUMERS if c != "transformers" or o.symmetric]
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("build,key,consumer", consumer_cases())
def test_compressed_tensors_consumer_reproduces_our_logits(builds: dict[str, Build], eval_ids: np.ndarray, build: str,
                                                            key: str, consumer: str, fp4_runs_in_float32) -> None:
    b = builds[build]
    path = b.written(key)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}.get(
        key.split("-")[2], "pack-quantized")
    model = fp4_runs_in_float32(CONSUMERS[consumer](path), key)
    with torch.no_grad():
        theirs = model(torch.from_numpy(eval_ids)).logits  # transformers decompresses on this first forward
    state = model.state_dict()
    # codes are stored, never re-rounded: the consumer's weights are our grid's decode, bit for bit
    for name, value in b.reconstruction(key).items():
        assert torch.equal(state[name], torch.from_numpy(value)), name
    reader = FORMATS["compressed-tensors"].reader(path, b.folder.config())
    ours = forward_mod.logits(b.folder.config(), reader, b.folder.weights(), eval_ids)
    diff = (theirs - ours).abs().max().item()
    print(f"{build} {key} via {consumer}: max |logit difference| {diff:.3g} over {eval_ids.size} tokens")
    assert diff <= LOGIT_ATOL


FP8_SERVED = (FP8, "float-quantized", "float", "FP8 E4M3, a dynamic scale per token", torch.float8_e4m3fn)
W8A8_SERVED = (W8A8, "int-quantized", "int", "INT8, a dynamic symmetric scale per token", torch.int8)
SERVED = {  # build -> output, its format, the weights' type, the simulated input scheme, the stored weight dtype
    "fp8": FP8_SERVED, "gptq-fp8": FP8_SERVED, "w8a8": W8A8_SERVED, "sq-gptq-w8a8": W8A8_SERVED,
    "fp8-static": (f"{FP8}-static", "float-quantized", "float", "FP8 E4M3, one calibrated scale per Linear",
                   torch.float8_e4m3fn),
    "gptq-w8a8-static": (f"{W8A8}-static", "int-quantized", "int", "INT8, one calibrated symmetric scale per Linear",
                         torch.int8)}
FP8_BLOCK_SERVED = ("compressed-tensors-fp8-b128x128", "float-quantized", "float",
                    "FP8 E4M3, a dynamic scale per token and group of 128 features", torch.float8_e4m3fn)
SERVED |= {"fp8-block": FP8_BLOCK_SERVED, "gptq-fp8-block": FP8_BLOCK_SERVED,
           "nvfp4": ("compressed-tensors-nvfp4-g16", "nvfp4-pack-quantized", "float", "NVFP4 (E2M1), a dynamic E4M3 "
                     "scale per token and group of 16 over one calibrated global scale per Linear", torch.uint8),
           "mxfp4": ("compressed-tensors-mxfp4-g32-amxfp4", "mxfp4-pack-quantized", "float", "MXFP4 (E2M1), a dynamic "
                     "power-of-two scale per token and group of 32", torch.uint8)}
ARGS = {  # output -> its config group's weights and input_activations, beyond 8 bits, symmetric, static weights
    FP8_BLOCK_SERVED[0]: ({"strategy": "block", "block_structure": [128, 128]},
                          {"strategy": "group", "group_size": 128, "dynamic": True}),
    f"{FP8}-static": ({"strategy": "channel"}, {"strategy": "tensor", "dynamic": False}),
    f"{W8A8}-static": ({"strategy": "channel"}, {"strategy": "tensor", "dynamic": False}),
    SERVED["nvfp4"][0]: ({"num_bits": 4, "strategy": "tensor_group", "group_size": 16},
                         {"num_bits": 4, "strategy": "tensor_group", "group_size": 16, "dynamic": "local"}),
    SERVED["mxfp4"][0]: ({"num_bits": 4, "strategy": "group", "group_size": 32},
                         {"num_bits": 4, "strategy": "group", "group_size": 32, "dynamic": True})}
STORED_INPUT_SCALE = {f"{FP8}-static": "input_scale", f"{W8A8}-static": "input_scale",
                      SERVED["nvfp4"][0]: "input_global_scale"}  # output -> the calibrated scale each Linear stores


@pytest.mark.slow
@pytest.mark.parametrize("build", list(SERVED))
def test_activation_schemes_are_served_by_transformers_and_compressed_tensors_as_validate_measures_them(
        builds: dict[str, Build], eval_ids: np.ndarray, build: str, fp4_runs_in_float32) -> None:
    """FP8_DYNAMIC (E4M3 weights per channel) and W8A8 (int8 weights per channel), activations quantized per token
    at run time (or by a static scale); FP8_BLOCK (E4M3 weights per 128 x 128 block, activations per token and
    group of 128); NVFP4 and MXFP4 (E2M1 weights and activations, per group of 16 over a calibrated global scale,
    per group of 32 with power-of-two scales). Both consumers hold our codes (and SmoothQuant's scaled norms) bit for bit and run the activation
    quantization themselves; validate, simulating it, computes their logits exactly, and the simulation matters
    (weights alone give other logits)."""
    b = builds[build]
    key, fmt, kind, inputs, stored = SERVED[build]
    path = b.written(key)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == fmt and list(qc["config_groups"]) == ["group_0"]
    group = qc["config_groups"]["group_0"]
    weights, inputs_args = ARGS.get(key, ({"strategy": "channel"}, {"strategy": "token", "dynamic": True}))
    for args, expected in ((group["weights"], {"dynamic": False, **weights}), (group["input_activations"], inputs_args)):
        expected = {"num_bits": 8, "type": kind, "symmetric": True, **expected}
        assert {k: args[k] for k in expected} == expected
    reader = FORMATS["compressed-tensors"].reader(path, b.folder.config())
    assert len(reader.inputs) == 14 and len({q.scheme for q in reader.inputs.values()}) == 1
    for r in b.quantized.outputs[key].modules:  # a calibrated scale is stored as quantize chose it
        scale = reader.raw(f"{r.name}.{STORED_INPUT_SCALE[key]}") if key in STORED_INPUT_SCALE else None
        assert scale is None or (scale.dtype, scale.tolist()) == (torch.float32, [r.input_scale]) and r.input_scale > 0
        assert reader.inputs[r.name].scale == r.input_scale
    assert validate_mod.served_as(reader) == [f"inputs of the quantized Linears as {inputs} (14 Linears), as "
                                              "compressed-tensors computes them"]
    served = forward_mod.logits(b.folder.config(), reader, b.folder.weights(), eval_ids)
    reader.inputs = {}
    weights_only = forward_mod.logits(b.folder.config(), reader, b.folder.weights(), eval_ids)
    assert (served - weights_only).abs().max().item() > 0.1
    floats = b.floats(key)
    assert sorted(floats) == (sorted(f"model.layers.{i}.{norm}.weight" for i in range(2) for norm in
                                     ("input_layernorm", "post_attention_layernorm")) if build.startswith("sq-") else [])
    for load in (compressed_tensors_decompress, lambda path: from_pretrained_holding(path, stored)):
        model = fp4_runs_in_float32(load(path), key)
        with torch.no_grad():
            theirs = model(torch.from_numpy(eval_ids)).logits
        state = model.state_dict()
        for name, value in {**b.reconstruction(key), **floats}.items():
            assert torch.equal(state[name], torch.from_numpy(value)), name
        assert torch.equal(theirs, served), load.__name__


@pytest.mark.slow
def test_nvfp4_gives_the_linears_vllm_fuses_one_global_scale_also_with_rtn(builds: dict[str, Build]) -> None:
    """rtn reads no inputs, but NVFP4 has calibrate find which Linears read one input: q/k/v share a weight global
    scale, gate/up another, and o_proj and down_proj keep their own."""
    b = builds["mxfp4"]
    reader = FORMATS["compressed-tensors"].reader(b.written("compressed-tensors-nvfp4-g16-afloat"), b.folder.config())
    for i in range(2):
        scale = {m: reader.scalar(f"model.layers.{i}.{m}.weight_global_scale") for m in
                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj")}
        assert scale["self_attn.q_proj"] == scale["self_attn.k_proj"] == scale["self_attn.v_proj"]
        assert scale["mlp.gate_proj"] == scale["mlp.up_proj"]
        assert len(set(scale.values())) == 4, scale


@pytest.mark.slow
@pytest.mark.parametrize("key", [f"{FP8}-kvfp8", "compressed-tensors-int4-g128-kvfp8"])
def test_an_fp8_kv_cache_is_stored_as_vllm_loads_it_and_validate_rounds_it_as_compressed_tensors_does(
        builds: dict[str, Build], eval_ids: np.ndarray, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """kv_cache fp8 beside FP8_DYNAMIC and beside W4A16 weights: the config's kv_cache_scheme is the one vLLM's
    compressed-tensors loader accepts (per-tensor, static, symmetric FP8) and each attention stores one k_scale and
    one v_scale in the model's float type, under the names vLLM remaps to its attention. validate's logits equal
    those of the same forward whose keys and values go through compressed-tensors' own ``forward_quantize`` with
    the stored scales, as its QuantizedKVCache calls it; the cache's rounding matters.

    (transformers 5.25 with compressed-tensors 0.20 loads these checkpoints without quantizing the cache: the
    attention's cache argument is now ``cache``, which compressed-tensors' is_cached_attention_module does not
    look for, so the scales load as unexpected keys; vLLM reads them with its own loader.)"""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    from quantfab.tasks.activations import through_kv_cache

    b = builds["kv"]
    path = b.written(key)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    scheme = {k: qc["kv_cache_scheme"][k] for k in ("num_bits", "type", "strategy", "dynamic", "symmetric")}
    assert scheme == {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    reader = FORMATS["compressed-tensors"].reader(path, b.folder.config())
    assert sorted(reader.kv_scales) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for attention, (k_scale, v_scale) in reader.kv_scales.items():
        assert reader.raw(f"{attention}.k_scale").dtype == torch.float32 and 0 < k_scale and 0 < v_scale
    assert validate_mod.served_as(reader)[-1] == "keys and values cached as FP8 E4M3, one calibrated scale each per " \
        "layer (2 layers)"
    served = forward_mod.logits(b.folder.config(), reader, b.folder.weights(), eval_ids)

    args = QuantizationArgs(**scheme)

    def compressed_tensors_rounding(layer: torch.nn.Module, attention: str, k_scale: float, v_scale: float) -> None:
        holder = torch.nn.Module()  # what forward_quantize reads of the attention: its status and k/v scales
        holder.quantization_status = QuantizationStatus.COMPRESSED
        for name, scale in (("k", k_scale), ("v", v_scale)):
            holder.register_parameter(f"{name}_scale", torch.nn.Parameter(torch.tensor([scale]), requires_grad=False))
        through_kv_cache(layer, attention, lambda k, v: (forward_quantize(holder, k, "k", args),
                                                         forward_quantize(holder, v, "v", args)))

    monkeypatch.setattr(forward_mod, "simulate_kv_cache", compressed_tensors_rounding)
    theirs = forward_mod.logits(b.folder.config(), reader, b.folder.weights(), eval_ids)
    monkeypatch.undo()
    assert torch.equal(theirs, served)
    reader.kv_scales = {}
    assert (served - forward_mod.logits(b.folder.config(), reader, b.folder.weights(), eval_ids)).abs().max() > 1e-3


@pytest.mark.slow
def test_a_kv_cache_checkpoint_without_a_v_scale_is_refused_naming_it(builds: dict[str, Build], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    shutil.copytree(b := builds["kv"].written(f"{FP8}-kvfp8"), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.self_attn.v_scale"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert FORMATS["compressed-tensors"].reader(b, builds["kv"].folder.config()).kv_scales  # the original reads
    with pytest.raises(UserError, match=r"model\.layers\.1\.self_attn\.v_scale is missing"):
        FORMATS["compressed-tensors"].reader(folder, builds["kv"].folder.config())


def test_a_kv_cache_is_refused_for_latent_attention_whose_cache_holds_no_keys() -> None:
    from transformers import DeepseekV3Config

    options = CompressedTensorsOptions(type="fp8", kv_cache="fp8")
    with pytest.raises(UserError, match="uses multi-head latent attention, whose cache holds a compressed latent"):
        FORMATS["compressed-tensors"].plan(options, DeepseekV3Config(), {}, {})


def from_pretrained_holding(path: Path, stored: torch.dtype) -> torch.nn.Module:
    """What `AutoModelForCausalLM.from_pretrained` serves, its 14 Linears' weights kept in ``stored``."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert sum(v.dtype == stored for k, v in hf.state_dict().items() if k.endswith(("weight", "weight_packed"))) == 14, \
        f"not loaded as {stored}"
    return hf


@pytest.mark.slow
def test_compressed_tensors_config_groups_follow_overrides(builds: dict[str, Build]) -> None:
    b = builds["gptq-mixed"]
    config = json.loads((b.written("compressed-tensors-int4-g32-asym") / "config.json").read_text())["quantization_config"]
    schemes = {tuple(sorted(g["targets"])): g["weights"] for g in config["config_groups"].values()}
    down = tuple(sorted(f"model.layers.{i}.mlp.down_proj" for i in range(2)))
    assert schemes[down] == {**schemes[down], "num_bits": 8, "group_size": 32, "strategy": "group", "symmetric": False}
    rest = next(w for t, w in schemes.items() if t != down)
    assert (rest["num_bits"], rest["group_size"], rest["symmetric"]) == (4, 32, False)
    assert config["ignore"] == ["lm_head"]
    channel = json.loads((b.written("compressed-tensors-int8-channel") / "config.json").read_text())["quantization_config"]
    assert {(g["weights"]["strategy"], g["weights"]["group_size"]) for g in channel["config_groups"].values()} == \
        {("channel", None)}


@pytest.mark.slow
def test_bits_per_weight_counts_the_weight_files(builds: dict[str, Build]) -> None:
    b = builds["awq"]
    f = b.converted.files["compressed-tensors-int4-g128"]
    weights = [p for p in f.files if p.endswith(".safetensors")]
    assert weights == [f"{f.path}/model.safetensors"]
    assert f.bits_per_weight == round(f.files[weights[0]].size * 8 / b.model.parameters, 4)
    assert {p.rsplit("/", 1)[1] for p in f.files} >= {"config.json", "model.safetensors", "tokenizer.json"}


# Independent decoders, written from the published layouts (AutoGPTQ's QuantLinear and AutoAWQ's
# WQLinear_GEMM pack/unpack code), one element at a time, sharing nothing with quantfab's writers.
def nibble(word: int, k: int, bits: int) -> int:
    return (word >> (bits * k)) & ((1 << bits) - 1)


def gptq_v1_reference(tensors: dict[str, np.ndarray], bits: int, out_f: int, in_f: int) -> np.ndarray:
    per = 32 // bits
    qweight, qzeros = tensors["qweight"].view(np.uint32), tensors["qzeros"].view(np.uint32)
    scales, g_idx = tensors["scales"].astype(np.float32), tensors["g_idx"]
    w = np.empty((out_f, in_f), np.float32)
    for i in range(in_f):
        g = int(g_idx[i])
        for o in range(out_f):
            q = nibble(int(qweight[i // per, o]), i % per, bits)
            zero = nibble(int(qzeros[g, o // per]), o % per, bits) + 1  # v1 stores zero - 1
            w[o, i] = scales[g, o] * np.float32(q - zero)
    return w


AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # column 8j + c sits in nibble AWQ_REVERSE_ORDER[c] of word j


def awq_gemm_reference(tensors: dict[str, np.ndarray], group: int, out_f: int, in_f: int) -> np.ndarray:
    qweight, qzeros = tensors["qweight"].view(np.uint32), tensors["qzeros"].view(np.uint32)
    scales = tensors["scales"].astype(np.float32)
    w = np.empty((out_f, in_f), np.float32)
    for i in range(in_f):
        g = i // group
        for o in range(out_f):
            q = nibble(int(qweight[i, o // 8]), AWQ_REVERSE_ORDER[o % 8], 4)
            zero = nibble(int(qzeros[g, o // 8]), AWQ_REVERSE_ORDER[o % 8], 4)
            w[o, i] = scales[g, o] * np.float32(q - zero)
    return w


def packed_cases() -> list:
    cases = []
    for build, overrides in BUILDS.items():
        cases += [(build, o.key) for o in load_recipe(RECIPE, overrides).outputs if o.format in ("gptq", "awq")]
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("build,key", packed_cases())
def test_gptq_and_awq_checkpoints_decode_to_our_codes_by_the_published_layout(builds: dict[str, Build], eval_ids,
                                                                              build: str, key: str) -> None:
    from safetensors.numpy import load_file

    b = builds[build]
    path = b.written(key)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    option = next(o for o in b.recipe.outputs if o.key == key)
    stored = load_file(str(path / "model.safetensors"))
    if option.format == "gptq":
        assert qc == {**qc, "quant_method": "gptq", "checkpoint_format": "gptq", "bits": int(option.type[3:]),
                      "group_size": option.group_size, "desc_act": False, "sym": option.symmetric}
    else:
        assert qc == {**qc, "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": option.group_size,
                      "zero_point": True, "modules_to_not_convert": ["lm_head"]}
    expected = b.reconstruction(key)
    assert len(expected) == 14
    # one Linear of each shape, decoded element by element (the loops are slow in Python)
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        module = name.removesuffix(".weight")
        parts = {k.rsplit(".", 1)[1]: v for k, v in stored.items() if k.startswith(module + ".")}
        out_f, in_f = expected[name].shape
        if option.format == "gptq":
            assert parts["g_idx"].tolist() == [i // option.group_size for i in range(in_f)]
            got = gptq_v1_reference(parts, int(option.type[3:]), out_f, in_f)
        else:
            got = awq_gemm_reference(parts, option.group_size, out_f, in_f)
        assert np.array_equal(got, expected[name]), name
    # the format's own reader (what validate measures) agrees with the codes on every Linear
    reader = FORMATS[option.format].reader(path, b.folder.config())
    for name, value in expected.items():
        assert torch.equal(reader.load([name])[name], torch.from_numpy(value)), name


@pytest.mark.slow
@pytest.mark.parametrize("build", ["nf4", "nf4-dq"])
def test_bnb_nf4_loads_in_transformers_with_bitsandbytes_and_reproduces_our_logits(builds: dict[str, Build],
                                                                                   eval_ids: np.ndarray, build: str) -> None:
    functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    from transformers import AutoModelForCausalLM

    b = builds[build]
    path = b.written("bnb-nf4")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.quant_state.nested == (build == "nf4-dq")
    # bitsandbytes' own dequantization of every Linear is our grid's decode, bit for bit
    modules = dict(model.named_modules())
    for name, value in b.reconstruction("bnb-nf4").items():
        param = modules[name.removesuffix(".weight")].weight
        assert torch.equal(functional.dequantize_4bit(param.data, param.quant_state), torch.from_numpy(value)), name
    reader = FORMATS["bnb-nf4"].reader(path, b.folder.config())
    ours = forward_mod.logits(b.folder.config(), reader, b.folder.weights(), eval_ids)
    # In eval mode on a CPU with AVX512-BF16, bitsandbytes repacks the weights and runs its fused kernel in
    # bfloat16 whatever bnb_4bit_compute_dtype says; train mode (no dropout in Llama) takes its float32
    # dequantize-then-matmul path, which is what the comparison needs.
    with torch.no_grad():  # train mode first: the first eval-mode forward repacks the weights for good
        theirs = model.train()(torch.from_numpy(eval_ids)).logits
        served = model.eval()(torch.from_numpy(eval_ids)).logits
    diff = (theirs - ours).abs().max().item()
    print(f"{build} bnb-nf4 via transformers+bitsandbytes: max |logit difference| {diff:.3g} over {eval_ids.size} "
          f"tokens on bitsandbytes' float32 path, {(served - ours).abs().max().item():.3g} as served in eval mode")
    assert diff <= LOGIT_ATOL


@pytest.mark.slow
def test_every_packed_linear_is_verified_against_its_codes(builds: dict[str, Build]) -> None:
    """convert reads each packed Linear back from the written files and decodes it with kernels/."""
    for b in builds.values():
        for key, f in b.converted.files.items():
            expected = b.reconstruction(key)
            v = f.verification
            assert (v.mismatches, v.max_abs_error, v.backend) == ([], 0.0, "cpu")
            assert (v.tensors, v.elements) == (len(expected), sum(a.size for a in expected.values()))


CORRUPTED = [("gptq-asym", "gptq-int4-g32-asym", "qweight"), ("awq", "awq-int4-g128", "qweight"),
             ("gptq-mixed", "compressed-tensors-int4-g32-asym", "weight_packed"),
             ("gptq-mixed", "compressed-tensors-int4-g32-asym", "weight_zero_point"), ("nf4-dq", "bnb-nf4", "weight")]


@pytest.mark.slow
@pytest.mark.parametrize("build,key,stored", CORRUPTED)
def test_verify_finds_the_element_a_flipped_bit_broke_where_the_consumer_decoder_does(
        builds: dict[str, Build], tmp_path: Path, build: str, key: str, stored: str) -> None:
    from safetensors.numpy import load_file, save_file

    b = builds[build]
    folder = tmp_path / "corrupted"
    shutil.copytree(b.written(key), folder)
    module = "model.layers.1.self_attn.v_proj"
    tensors = load_file(folder / "model.safetensors")
    flat = tensors[f"{module}.{stored}"].reshape(-1).view(np.uint8)
    flat[5] ^= 0x01
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    output = next(o for o in b.recipe.outputs if o.key == key)
    fmt = FORMATS[output.format]
    config = b.folder.config()
    reader = fmt.reader(folder, config)
    planned = next(t for t in fmt.plan(output, config, b.folder.weights().tensors,
                                       {m.name: m.grid for m in b.quantized.outputs[key].modules})
                   if t.hf_name == f"{module}.weight")
    expected = b.reconstruction(key)[f"{module}.weight"]
    verdict = fmt.verify(reader, planned, expected)
    decoded = reader.load([f"{module}.weight"])[f"{module}.weight"].numpy()  # the format's own reader
    broken = np.flatnonzero(decoded.reshape(-1) != expected.reshape(-1))
    assert 0 < verdict.mismatches == broken.size and verdict.first == broken[0]


@pytest.mark.slow
def test_package_refuses_an_output_whose_verification_found_a_mismatch(builds: dict[str, Build], tmp_path: Path) -> None:
    from quantfab.tasks.errors import VerificationFailed
    from quantfab.tasks.manifests import Mismatch, QualityManifest
    from quantfab.tasks.package import package

    b = builds["awq"]
    key = "awq-int4-g128"
    f = b.converted.files[key]
    broken = f.model_copy(update={"verification": f.verification.model_copy(update={"mismatches": [
        Mismatch(tensor="model.layers.0.mlp.up_proj.weight", count=3, first_index=4242, max_abs_error=0.5)]})})
    converted = b.converted.model_copy(update={"files": {**b.converted.files, key: broken}})
    quality = QualityManifest(report=b.store.put_bytes(b"{}"), passed=True, table="", failures=[])
    destination = tmp_path / "published"
    with pytest.raises(VerificationFailed, match=r"model.layers.0.mlp.up_proj.weight: 3 element\(s\) differ, "
                                                 r"first at flat index 4242"):
        package("tiny", b.model, converted, quality, "", "digest", str(destination), "0", b.store)
    assert not destination.exists() or not any(destination.iterdir())
