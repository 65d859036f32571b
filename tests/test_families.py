"""Any decoder-only family transformers ships: the layer-by-layer engine computes what the model computes,
and every method quantizes it through the same code a recipe runs.

The models are tiny and random (2 layers, hidden 64), built from each family's own transformers config and
written by ``save_pretrained``, with the synthetic byte-fallback tokenizer; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors import safe_open

from quantfab.pipelines.recipe import QuantizeSpec
from quantfab.tasks.decoder import Decoder
from quantfab.tasks.model_structure import layout, model_units
from quantfab.tasks.errors import UserError
from quantfab.tasks.modelio import CPU, ModelDir, relative
from quantfab.tasks.quantize.layer_file import LayerFile
from quantfab.tasks.store import Store
from quantfab.tasks.synthetic import write_tokenizer
from quantfab.tasks.trial import Trial

VOCAB = 512  # the tokenizer's; the embedding has 32 rows more, as Qwen's do (and transformers' Qwen tokenizers
# add a token of their own to ours)
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, vocab_size=VOCAB + 32, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
# what a family needs beyond COMMON to exercise its own layout (windows shorter than the 32-token test windows)
FAMILIES = {
    "llama": {}, "mistral": {"sliding_window": 8}, "qwen2": {}, "qwen3": {}, "granite": {"residual_multiplier": 0.5},
    "olmo2": {}, "phi3": {}, "gemma": {},
    # query_pre_attn_scalar = head_dim, as in Gemma 2 2B/9B (llama.cpp scales attention by the head size)
    "gemma2": {"sliding_window": 8, "query_pre_attn_scalar": 16}, "gemma3_text": {"sliding_window": 8, "query_pre_attn_scalar": 16},
    # mixtures of experts: 4 experts, 2 per token; DeepSeek-V3 with multi-head latent attention, a shared expert
    # and its first layer dense
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "norm_topk_prob": True},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 32, "v_head_dim": 16, "n_group": 2, "topk_group": 1, "num_key_value_heads": 4,
                    "head_dim": 8},  # its rotary part
}
MOE = ("deepseek_v3", "mixtral", "qwen3_moe")


def tiny_model(folder: Path, model_type: str, seed: int = 0, **extra) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES.get(model_type, {}), **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # N(0, 1/fan_in), larger than the default init, so quantization error shows in the logits
        for p in model.parameters():
            if p.ndim >= 2:  # Linears, and experts' stacked matrices
                p.normal_(0, p.shape[-1] ** -0.5)
    model.save_pretrained(folder)
    write_tokenizer(folder, VOCAB)
    return folder


def windows(rows: int, seq: int, seed: int) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(3, VOCAB, (rows, seq))
    ids[:, 0] = 1
    return ids


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_the_engine_computes_the_models_own_logits(tmp_path: Path, model_type: str) -> None:
    """Layer by layer, with the arguments the model passes each layer (sliding windows, per-type rotary
    embeddings, soft-capping...), the logits are transformers' own for the whole model."""
    from transformers import AutoModelForCausalLM

    folder = ModelDir(tiny_model(tmp_path, model_type))
    config, weights = folder.config(), folder.weights()
    ids = torch.from_numpy(windows(10, 32, 1))
    decoder = Decoder(config, CPU)
    decoder.load_outer(weights.load(weights.checkpoint_names(decoder.entry_names())))
    hidden = decoder.embed(ids)
    for i in range(decoder.num_layers):
        layer = decoder.layer(i, relative(weights.load(weights.layer_names(i)), weights.prefix(i)))
        hidden = decoder.run_layer(i, layer, hidden)
    decoder.load_outer(weights.load(weights.checkpoint_names(decoder.outer_names)))
    model = AutoModelForCausalLM.from_pretrained(folder.path, attn_implementation=config._attn_implementation).eval()
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(decoder.logits(hidden), expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def trials(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trial]:
    root = tmp_path_factory.mktemp("families")
    return {t: Trial(tiny_model(root / t, t), Store(str(root / f"{t}-store")), windows(16, 64, 2), windows(8, 64, 3))
            for t in sorted(FAMILIES)}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_method_quantizes_every_linear_of_the_family(trials: dict[str, Trial], model_type: str) -> None:
    """rtn, gptq and awq on INT4 g32: every Linear the layout lists, and every expert's matrices (by their
    checkpoint names), gets codes, and the calibrated methods lose less than round-to-nearest (KL against
    the float model, on held-out windows)."""
    trial = trials[model_type]
    shape = layout(trial.config)
    experts = {n.removesuffix(".weight") for n in trial.weights.tensors if ".experts." in n and ".shared_experts." not in n}
    assert bool(experts) == (model_type in MOE)
    kl = {}
    for method in ("rtn", "gptq", "awq"):
        files = trial.layer_files(QuantizeSpec(method=method), "INT4_G32_ASYM")
        coded = {r.name for f in files for r in f.reports() if r.grid}
        assert coded == {f"{shape.prefix(i)}{lin}" for i, lins in enumerate(shape.linears) for lin in lins} | experts
        kl[method] = trial.metrics(QuantizeSpec(method=method), "INT4_G32_ASYM")["kl_divergence"]
    print(model_type, {k: round(v, 5) for k, v in kl.items()})
    assert 0 < kl["gptq"] < kl["rtn"] and 0 < kl["awq"] < kl["rtn"], kl


def test_awq_folds_scales_where_the_family_table_pairs_linears_and_says_where_it_cannot(trials: dict[str, Trial]) -> None:
    """Phi-3's down_proj scale folds into the up half of the fused gate_up_proj, and each expert's down into its
    own up; an expert's gate and up (their input a gather no module makes) get the clip search only, and so
    does o_proj under grouped-query attention: the report says which."""
    clip_only = {}
    for model_type in ("phi3", "mixtral"):
        files = trials[model_type].layer_files(QuantizeSpec(method="awq"), "INT4_G32_ASYM")
        clip_only[model_type] = {r.name.split(".", 3)[3] for f in files for r in f.reports()
                                 if "clip search only" in r.note and r.name.startswith("model.layers.0.")}
    assert clip_only["phi3"] == {"self_attn.o_proj"}
    experts = {f"block_sparse_moe.experts.{e}.{w}" for e in range(4) for w in ("w1", "w3")}
    assert clip_only["mixtral"] == {"self_attn.o_proj"} | experts


@pytest.mark.parametrize(("config", "message"), [
    ({"model_type": "t5", "is_encoder_decoder": True}, "encoder-decoder"),
    ({"model_type": "bert"}, "encoder or encoder-decoder"),
    ({"model_type": "clip"}, "not a causal LM"),
    ({"model_type": "param2moe"}, "converts its checkpoints with WeightConverter.*Split.*cannot map back"),
])
def test_models_the_engine_cannot_run_are_refused_naming_the_type(tmp_path: Path, config: dict, message: str) -> None:
    import json

    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message) as err:
        ModelDir(tmp_path).config()
    assert str(tmp_path / "config.json") in str(err.value) and config["model_type"] in str(err.value)


def routed_reference(folder: Path, ids: np.ndarray, layer: int) -> dict[int, tuple[int, torch.Tensor, torch.Tensor]]:
    """Per expert of ``layer``, from transformers' own forward of the whole model: how many tokens its router
    sent it, and x^T x of its gate/up input (those tokens) and of its down input (act(gate) * up of them)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    experts = model.model.layers[layer].mlp.experts
    seen = []
    handle = experts.register_forward_pre_hook(lambda _m, args: seen.append((args[0], args[1])))
    with torch.no_grad():
        model(torch.from_numpy(ids))
    handle.remove()
    (x, index), = seen
    out = {}
    with torch.no_grad():
        for e in range(experts.num_experts):
            routed = x[(index == e).any(-1)]
            gate, up = (routed @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
            down_in = experts.act_fn(gate) * up
            out[e] = (routed.shape[0], routed.T @ routed, down_in.T @ down_in)
    return out


def test_each_expert_is_calibrated_on_the_tokens_its_router_sends_it(tmp_path: Path) -> None:
    """Mixtral (its experts on disk as block_sparse_moe.experts.E.w1/w3/w2, fused in memory as mlp.experts):
    the statistics of every expert's inputs, under the checkpoint's names, are those of the tokens
    transformers' router sends it; the counts add up to tokens x experts per token."""
    from quantfab.tasks.calibrate import calibrate_on, structure_from_metadata
    from quantfab.tasks.download import download
    from quantfab.tasks.manifests import ExpertFallback

    folder = tiny_model(tmp_path / "m", "mixtral")
    store = Store(str(tmp_path / "store"))
    ids = windows(16, 32, 4)
    model = download(str(folder), None, ["*.safetensors", "*.json"], False, store)
    calibration = calibrate_on(model, ids, "cpu", store, True, ExpertFallback(min_tokens=0))
    for layer in (0, 1):
        reference = routed_reference(folder, ids, layer)
        with safe_open(str(store.local_path(calibration.stats[layer])), framework="pt") as f:
            structure = structure_from_metadata(f.metadata())
            assert not structure.fallbacks
            for e, (count, gate_up, down) in reference.items():
                key = f"block_sparse_moe.experts.{e}"
                assert structure.groups[f"{key}.w1"] == (f"{key}.w1", f"{key}.w3")
                assert structure.groups[f"{key}.w2"] == (f"{key}.w2",)
                assert int(f.get_tensor(f"{key}.w1.count")) == int(f.get_tensor(f"{key}.w2.count")) == count
                for name, expected in ((f"{key}.w1", gate_up), (f"{key}.w2", down)):
                    torch.testing.assert_close(f.get_tensor(f"{name}.hessian"), expected, rtol=1e-4,
                                               atol=1e-5 * float(expected.abs().max()))
        assert sum(c for c, _, _ in reference.values()) == ids.size * 2


@pytest.mark.parametrize(("method", "fallback"), [("gptq", "all_tokens"), ("gptq", "rtn"), ("awq", "all_tokens")])
def test_experts_routed_too_few_tokens_take_the_recipes_fallback_and_the_report_lists_them(
        tmp_path: Path, stages, method: str, fallback: str) -> None:
    """With calibration.experts.min_tokens above what any expert receives, every expert takes the fallback:
    all_tokens calibrates it on every token of the calibration set (so all experts of a layer see the same
    gate/up input), rtn rounds it to nearest; each expert matrix's report and the build's fallbacks say so."""
    from quantfab.tasks.calibrate import structure_from_metadata
    from quantfab.tasks.manifests import EXPERT_FALLBACK

    folder = tiny_model(tmp_path / "m", "qwen3_moe")
    b = FamilyBuild(folder, method, Store(str(tmp_path / "store")), stages,
                    ("calibration.experts.min_tokens=100000", f"calibration.experts.fallback={fallback}"))
    (key,) = [o.key for o in b.outputs]
    modules = b.quantized.outputs[key].modules
    experts = [m for m in modules if ".mlp.experts." in m.name]
    assert len(experts) == 2 * 4 * 3
    for m in modules:
        expert = m in experts
        assert (EXPERT_FALLBACK in m.note) == expert, m
        assert m.method == ("rtn" if expert and fallback == "rtn" else method), m
    assert sorted(f.split(":")[0] for f in b.converted.files[key].fallbacks) == sorted(m.name for m in experts)
    if method == "awq":  # the calibrate stage's statistics: all 1024 tokens, the same for every expert
        with safe_open(str(b.store.local_path(b.quantized_calibration.stats[1])), framework="pt") as f:
            structure = structure_from_metadata(f.metadata())
            gates = [f"mlp.experts.{e}.gate_proj" for e in range(4)]
            assert set(gates) <= set(structure.fallbacks)
            assert {int(f.get_tensor(f"{g}.count")) for g in gates} == {16 * 64}
            first = f.get_tensor(f"{gates[0]}.hessian")
            assert all(torch.equal(f.get_tensor(f"{g}.hessian"), first) for g in gates)
    assert 0 < b.metrics["outputs"][key]["kl_divergence"] < 0.5


REPO = Path(__file__).resolve().parent.parent
BUILDS = {  # method -> the outputs it is built into (gguf only for families with a GGUF writer)
    "rtn": "[{gguf: Q8_0}, {gguf: F32}]",
    "gptq": "[{format: compressed-tensors, type: int4, group_size: 32, symmetric: true}]",  # transformers cannot
    # load asymmetric pack-quantized checkpoints (see test_formats.py)
    "awq": "[{format: compressed-tensors, type: int4, group_size: 32, symmetric: true}]",
}
LOGIT_ATOL = 2e-4  # fp32 logits of transformers' forward against validate's layer-at-a-time forward
LLAMA_CPP_MAX_KL = 1e-3  # nats per token: llama.cpp runs Q8_0 matmuls on activations rounded to 8 bits
# with experts, those roundings also reorder near-tied router scores, so a few tokens take another expert (most
# positions agree as closely as a dense model's; the F32 files agree everywhere, to LLAMA_CPP_F32_MAX_KL)
LLAMA_CPP_MAX_KL_MOE = 5e-3
LLAMA_CPP_F32_MAX_KL = 1e-5  # F32 files: llama.cpp computes what transformers computes (measured ~2e-7)


class FamilyBuild:
    """download -> calibrate -> quantize -> convert -> validate of one tiny model, through the stage functions."""

    def __init__(self, folder: Path, method: str, store: Store, stages, extra: tuple[str, ...] = ()):
        from quantfab.pipelines.recipe_loading import load_recipe
        from quantfab.tasks import validate as validate_mod
        from quantfab.tasks.download import materialize

        r = load_recipe(REPO / "recipes" / "tinystories-656k-q4_0.yaml", [
            f"model.source={folder}", "calibration.source=synthetic://tokens?seed=5", "calibration.samples=16",
            "calibration.seq_len=64", "validate.source=synthetic://tokens?seed=6", "validate.tokens=1024",
            "validate.window=64", f"quantize.method={method}", f"outputs={BUILDS[method]}", *extra])
        self.store, self.outputs = store, r.outputs
        built = stages(r, store)
        self.model, self.converted, self.quantized = built.model, built.converted, built.quantized
        self.quantized_calibration = built.calibration
        self.metrics = validate_mod.measure(self.model, self.converted, r.outputs, r.validate_, "cpu", store)
        self.ids = validate_mod.eval_windows(self.model, r.validate_, store)
        self.folder = materialize(store, self.model.files)

    def written(self, key: str) -> Path:
        from quantfab.tasks.download import materialize

        f = self.converted.files[key]
        return materialize(self.store, f.files).path / f.path


def family_builds(root: Path, model_type: str, stages) -> dict[str, FamilyBuild]:
    from quantfab.tasks.families import family

    folder = tiny_model(root / model_type, model_type)
    store = Store(str(root / f"{model_type}-store"))
    return {m: FamilyBuild(folder, m, store, stages) for m in BUILDS if m != "rtn" or family(model_type).gguf}


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory, stages) -> dict[str, dict[str, FamilyBuild]]:
    root = tmp_path_factory.mktemp("family-builds")
    return {t: family_builds(root, t, stages) for t in sorted(FAMILIES)}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_family_builds_and_transformers_loads_what_it_ships(builds: dict, model_type: str) -> None:
    """gptq and awq into compressed-tensors int4, loaded by transformers with the logits validate measured;
    rtn into GGUF Q8_0 under the family's own llama.cpp architecture and tensor names."""
    import gguf
    from transformers import AutoModelForCausalLM

    from quantfab.tasks import forward as forward_mod
    from quantfab.tasks.convert import FORMATS
    from quantfab.tasks.families import family

    built = builds[model_type]
    for method in ("gptq", "awq"):
        b = built[method]
        (key,) = [o.key for o in b.outputs]
        path = b.written(key)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        config = b.folder.config()
        with safe_open(str(next(path.glob("*.safetensors"))), framework="pt") as f:  # one packed tensor per matrix,
            packed = {k.removesuffix(".weight_packed") for k in f.keys() if k.endswith(".weight_packed")}  # on-disk names
        shape = layout(config)
        units = model_units(config, {n: t.shape for n, t in b.folder.weights().tensors.items()})
        assert packed == {f"{shape.prefix(i)}{u}" for i, us in enumerate(units) for u in us}
        with torch.no_grad():
            theirs = hf(torch.from_numpy(b.ids)).logits
        reader = FORMATS["compressed-tensors"].reader(path, b.folder.config())
        ours = forward_mod.logits(b.folder.config(), reader, b.folder.weights(), b.ids)
        assert (theirs - ours).abs().max().item() <= LOGIT_ATOL, (method, (theirs - ours).abs().max().item())
        assert 0 < b.metrics["outputs"][key]["kl_divergence"] < 0.5
    if family(model_type).gguf is None:
        return
    b = built["rtn"]
    reader = gguf.GGUFReader(str(b.written("gguf-Q8_0")))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family(model_type).gguf.arch]]
    types = {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2 and t.name != "token_embd.weight"}
    assert {t for name, t in types.items() if "ffn_gate_inp" not in name} == {"Q8_0"}
    assert {t for name, t in types.items() if "ffn_gate_inp" in name} <= {"F32"}  # routers, as llama.cpp's converter
    if model_type in MOE:  # every layer's experts stacked, one tensor per matrix: experts x rows x columns
        stacked = [t for t in reader.tensors if t.name.endswith("_exps.weight")]
        moe_layers = {n.split(".")[2] for n in b.folder.weights().tensors if ".experts.0." in n}
        assert len(stacked) == 3 * len(moe_layers) and all(int(t.shape[-1]) == 4 for t in stacked)
    # 8-bit: what ships is the model, nearly (with experts, a few tokens' routes flip: top-2 of 4 random routers)
    assert b.metrics["outputs"]["gguf-Q8_0"]["kl_divergence"] < (5e-3 if model_type in MOE else 1e-3)


SERVED = "{format: compressed-tensors, type: int8, activations: int8, kv_cache: fp8}"


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_family_ships_w8a8_with_smoothquant_and_an_fp8_kv_cache(tmp_path: Path, stages, model_type: str) -> None:
    """SmoothQuant + GPTQ into W8A8 with an FP8 KV cache: the scales fold into each family's norms (Gemma's 1 + w
    included), every layer's attention gets its k/v scales (latent attention is refused: its cache holds no keys),
    and transformers, quantizing the inputs as the checkpoint says, computes validate's logits with the cache's
    rounding left out (transformers 5.25 does not apply it: test_formats.py)."""
    from transformers import AutoModelForCausalLM

    from quantfab.tasks import forward as forward_mod
    from quantfab.tasks.convert import FORMATS

    folder = tiny_model(tmp_path / model_type, model_type)
    served = SERVED.replace(", kv_cache: fp8", "") if model_type == "deepseek_v3" else SERVED
    b = FamilyBuild(folder, "gptq", Store(str(tmp_path / "store")), stages,
                    ("quantize.smoothquant={alpha: 0.5}", f"outputs=[{served}]"))
    (key,) = [o.key for o in b.outputs]
    smoothed = {n for blob in b.quantized.outputs[key].layers
                for n in LayerFile(b.store.local_path(blob)).float_names() if n.endswith("norm.weight")}
    # each layer's norm-fed groups of quantized Linears: attention's and the MLP's. With experts the MLP's norm feeds
    # the float router and a gather (DeepSeek's feeds its shared expert, and its attention has a q_a norm too);
    # OLMo 2 normalises outputs, so its Linears read the residual stream
    per_layer = {"olmo2": 0, "mixtral": 1, "qwen3_moe": 1, "deepseek_v3": 3}.get(model_type, 2)
    assert len(smoothed) == per_layer * 2, smoothed
    path = b.written(key)
    reader = FORMATS["compressed-tensors"].reader(path, b.folder.config())
    assert len(reader.kv_scales) == (0 if model_type == "deepseek_v3" else 2)
    assert 0 < b.metrics["outputs"][key]["kl_divergence"] < 0.5
    if model_type in MOE:  # transformers 5.25 stops loading int-quantized experts: fusing their weights into
        return  # gate_up_proj, its conversion finds none (pack-quantized ones load: the test above)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(b.ids)).logits
    reader.kv_scales = {}
    ours = forward_mod.logits(b.folder.config(), reader, b.folder.weights(), b.ids)
    assert (theirs - ours).abs().max().item() <= LOGIT_ATOL, (theirs - ours).abs().max().item()


FP8_BLOCK = "{format: compressed-tensors, type: fp8, group_size: 128x128}"
WIDE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8)  # rows of 128 or 256: whole blocks


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_family_ships_fp8_blocks_with_inputs_quantized_per_group(tmp_path: Path, stages, model_type: str) -> None:
    """GPTQ into FP8_BLOCK: every Linear (experts' too) whose row is a whole number of 128-column blocks is
    stored as E4M3 with one scale per 128 x 128 block, the rest kept in float (quantize.indivisible keep_float:
    DeepSeek's latent projections read rows of 32); transformers, quantizing the inputs per token and group of 128,
    computes validate's logits."""
    from transformers import AutoModelForCausalLM

    from quantfab.tasks import forward as forward_mod
    from quantfab.tasks.convert import FORMATS

    experts = {"moe_intermediate_size": 128} if "moe_intermediate_size" in FAMILIES[model_type] else {}
    latent = {"num_key_value_heads": 8} if model_type == "deepseek_v3" else {}  # as many as the queries' heads
    folder = tiny_model(tmp_path / model_type, model_type, **WIDE, **experts, **latent)
    b = FamilyBuild(folder, "gptq", Store(str(tmp_path / "store")), stages,
                    ("quantize.indivisible=keep_float", f"outputs=[{FP8_BLOCK}]"))
    (key,) = [o.key for o in b.outputs]
    reports = b.quantized.outputs[key].modules
    tensors = b.folder.weights().tensors
    whole = {r.name for r in reports if tensors[f"{r.name}.weight"].shape[-1] % 128 == 0}
    assert {r.name for r in reports if r.grid == "FP8_B128"} == whole and len(whole) >= 4 * 2  # Phi-3's are fused
    assert all(r.grid is None for r in reports if r.name not in whole)
    path = b.written(key)
    reader = FORMATS["compressed-tensors"].reader(path, b.folder.config())
    for name in whole:
        rows, cols = tensors[f"{name}.weight"].shape
        assert tuple(reader.raw(f"{name}.weight_scale").shape) == (-(-rows // 128), cols // 128), name
    assert {q.scheme for q in reader.inputs.values()} == {"fp8-group128"} and set(reader.inputs) == whole
    assert 0 < b.metrics["outputs"][key]["kl_divergence"] < 0.05
    if model_type in MOE:  # transformers 5.25 stops loading naive-quantized experts (test above)
        return
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(b.ids)).logits
    ours = forward_mod.logits(b.folder.config(), reader, b.folder.weights(), b.ids)
    assert (theirs - ours).abs().max().item() <= LOGIT_ATOL, (theirs - ours).abs().max().item()


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"), ("q_a_proj", "kv_a_proj_with_mqa"))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_family_ships_nvfp4_with_one_global_scale_per_fused_matrix(tmp_path: Path, stages, model_type: str,
                                                                         fp4_runs_in_float32) -> None:
    """GPTQ into NVFP4 (E2M1 weights and activations): the Linears vLLM fuses into one matrix (q/k/v, gate/up, an
    expert's w1/w3, DeepSeek's q_a/kv_a) share one weight global scale, as its loader needs; each Linear stores the
    global scale of its calibrated inputs; transformers, quantizing the inputs as the checkpoint says, computes
    validate's logits."""
    from transformers import AutoModelForCausalLM

    from quantfab.tasks import forward as forward_mod
    from quantfab.tasks.convert import FORMATS

    folder = tiny_model(tmp_path / model_type, model_type)
    b = FamilyBuild(folder, "gptq", Store(str(tmp_path / "store")), stages, ("outputs=[{compressed-tensors: nvfp4}]",))
    (key,) = [o.key for o in b.outputs]
    reports = b.quantized.outputs[key].modules
    assert all(r.grid == "NVFP4" and r.input_scale > 0 for r in reports)
    reader = FORMATS["compressed-tensors"].reader(path := b.written(key), b.folder.config())
    global_scale = {r.name: reader.scalar(f"{r.name}.weight_global_scale") for r in reports}
    fused = 0
    for parent in {n.rsplit(".", 1)[0] for n in global_scale}:
        for names in FUSED:
            members = [f"{parent}.{n}" for n in names]
            if all(m in global_scale for m in members):
                assert len({global_scale[m] for m in members}) == 1, members
                fused += 1
    assert fused >= (0 if model_type == "phi3" else 2 * 2)  # Phi-3 stores q/k/v and gate/up fused already
    assert {q.scheme for q in reader.inputs.values()} == {"nvfp4-group16"} and len(reader.inputs) == len(reports)
    assert 0 < b.metrics["outputs"][key]["kl_divergence"] < 0.5
    if model_type in MOE:
        return
    hf = fp4_runs_in_float32(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), key)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(b.ids)).logits
    ours = forward_mod.logits(b.folder.config(), reader, b.folder.weights(), b.ids)
    assert (theirs - ours).abs().max().item() <= LOGIT_ATOL, (theirs - ours).abs().max().item()


def test_an_fp8_kv_cache_is_refused_for_latent_attention_at_plan_time(tmp_path: Path) -> None:
    from quantfab.pipelines.plan import plan
    from quantfab.pipelines.recipe_loading import load_recipe

    folder = tiny_model(tmp_path / "deepseek_v3", "deepseek_v3")
    recipe = load_recipe(REPO / "recipes" / "tinystories-656k-q4_0.yaml", [f"model.source={folder}", f"outputs=[{SERVED}]"])
    with pytest.raises(UserError, match="deepseek_v3.*multi-head latent attention"):
        plan(recipe, str(tmp_path / "store"))


@pytest.mark.llama_cpp
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_llama_cpp_runs_each_familys_gguf_as_transformers_runs_its_weights(builds: dict, model_type: str) -> None:
    """llama.cpp's logits for the Q8_0 and the F32 file against transformers' for the same weights (validate's
    forward over each file's decoded tensors): the F32 file shows llama.cpp computes the family as transformers
    does, the Q8_0 file what ships."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install .[llama-cpp])")
    from quantfab.tasks import forward as forward_mod
    from quantfab.tasks.convert.gguf import GGUFTensors
    from quantfab.tasks.llama_cpp import llama_cpp_logits

    b = builds[model_type]["rtn"]
    # mistral is written as llama's architecture, which has no sliding window in llama.cpp: compared on windows
    # no longer than its window (8 tokens here; 4096 or none in real Mistrals), where the two compute one model
    ids = b.ids.reshape(-1, FAMILIES[model_type]["sliding_window"]) if model_type == "mistral" else b.ids
    for key, limit in (("gguf-F32", LLAMA_CPP_F32_MAX_KL),
                       ("gguf-Q8_0", LLAMA_CPP_MAX_KL_MOE if model_type in MOE else LLAMA_CPP_MAX_KL)):
        path, config = b.written(key), b.folder.config()
        ours = forward_mod.logits(config, GGUFTensors(path, config), b.folder.weights(), ids).numpy()
        theirs = llama_cpp_logits(path, ids, threads=2)
        diff = float(np.abs(theirs - ours).max())
        agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
        logp = torch.log_softmax(torch.from_numpy(ours).double(), -1)
        kl = float((logp.exp() * (logp - torch.log_softmax(torch.from_numpy(theirs).double(), -1))).sum(-1).mean())
        print(f"{model_type} {key}: KL(ours || llama.cpp) {kl:.2e}, top-1 agreement {agree:.4f}, "
              f"max |logit difference| {diff:.3g}")
        assert kl <= limit and agree >= 0.95, (key, kl, agree)


def test_families_lists_the_table_and_gguf_is_refused_for_a_family_without_a_writer(tmp_path: Path) -> None:
    """`quantfab families` shows what works where; a GGUF output of a family without a GGUF writer is refused
    when its tensors are assigned (plan and quantize), naming the model_type, before any work."""
    from quantfab.pipelines.cli import main
    from quantfab.pipelines.recipe_loading import load_recipe
    from quantfab.tasks.convert import FORMATS
    from quantfab.tasks.quantize.assign import assign_layers

    assert main(["families"]) == 0
    folder = ModelDir(tiny_model(tmp_path, "olmo"))  # OLMo 1: llama.cpp has it, quantfab has no GGUF entry for it
    recipe = load_recipe(REPO / "recipes" / "tinystories-656k-q4_0.yaml", [f"model.source={folder.path}"])
    with pytest.raises(UserError, match="gguf: model_type 'olmo' has no GGUF writer"):
        assign_layers(folder.config(), folder.weights().tensors, recipe.quantize, FORMATS["gguf"], recipe.outputs[0])


def test_plan_refuses_an_encoder_naming_the_users_path_before_any_download(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    cli = Path(sys.executable).parent / "quantfab"
    done = subprocess.run([str(cli), "plan", str(REPO / "recipes" / "tinystories-656k-q4_0.yaml"), "--set",
                           f"model.source={tmp_path}", "--store", str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 2 and f"{tmp_path}/config.json: model_type 'bert' is an encoder" in out, out
    assert "Traceback" not in out and not (tmp_path / "store" / "blobs").exists()


OUTPUTS = {method: "[{gguf: Q4_K_M}, {gguf: Q8_0}, {compressed-tensors: int4}, {format: compressed-tensors, type: int4, "
                   "group_size: 32, symmetric: false}, {gptq: int4}, {awq: int4}]" for method in ("rtn", "gptq", "awq")}
OUTPUTS["nf4"] = "[{bnb-nf4: nf4}]"


def outcome(compute: Callable[[], object]) -> object:
    """What a call returns, or the message it refuses with."""
    try:
        return compute()
    except UserError as exc:
        return f"refused: {exc}"


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_plan_reads_the_memoized_frozen_config_as_it_reads_the_transformers_config(trials: dict[str, Trial],
                                                                                     tmp_path: Path, model_type: str) -> None:
    """plan and the cache keys read a model through its frozen config (tasks/model_structure.py), read from the
    memo without torch the second time: layout, placements, expected shapes, every method's assignment for
    every format, the formats' planned tensors and whether calibrate gathers statistics are the ones the
    transformers config gives."""
    from quantfab.pipelines.recipe_loading import load_recipe
    from quantfab.tasks.convert import FORMATS
    from quantfab.tasks.model_structure import FrozenConfig, placements
    from quantfab.tasks.modelio import expected_shapes
    from quantfab.tasks.quantize.assign import assign_layers, reads_statistics

    trial = trials[model_type]
    real, weights = trial.config, trial.weights
    derived, _ = trial.folder.frozen(tmp_path)
    frozen, tensors = trial.folder.frozen(tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1 and frozen is not derived  # the second came from the memo
    assert isinstance(frozen, FrozenConfig) and tensors == weights.tensors
    plain = {k: v for k, v in real.to_dict().items() if not k.startswith("_") and json.loads(json.dumps(v)) == v}
    assert {k: getattr(frozen, k) for k in plain} == plain  # all but id2label (int keys) and dtype
    assert {k for k in set(real.to_dict()) - set(plain) if not k.startswith("_")} <= {"id2label", "dtype"}
    assert frozen.dtype == str(real.dtype).removeprefix("torch.")
    assert layout(frozen) == layout(real) and expected_shapes(frozen) == expected_shapes(real)
    assert placements(frozen, {n: t.shape for n, t in tensors.items()}) == weights.placements
    assert model_units(frozen, {n: t.shape for n, t in tensors.items()}) == \
           model_units(real, {n: t.shape for n, t in tensors.items()})
    for method, outputs in OUTPUTS.items():
        recipe = load_recipe(REPO / "recipes" / "demo.yaml", [f"quantize.method={method}", f"outputs={outputs}"])
        fitting = []
        for o in recipe.outputs:
            fmt = FORMATS[o.format]
            assigned = outcome(lambda: assign_layers(real, weights.tensors, recipe.quantize, fmt, o))
            assert outcome(lambda: assign_layers(frozen, tensors, recipe.quantize, fmt, o)) == assigned, (method, o.key)
            if isinstance(assigned, str):
                continue
            fitting.append(o)
            grids = {a.module: a.grid for layer in assigned for a in layer.values()}
            assert fmt.plan(o, frozen, tensors, grids) == fmt.plan(o, real, weights.tensors, grids), (method, o.key)
        assert reads_statistics(frozen, tensors, recipe.quantize, fitting) == \
               reads_statistics(real, weights.tensors, recipe.quantize, fitting)
