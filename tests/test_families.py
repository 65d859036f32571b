"""Any decoder-only family transformers ships: the layer-by-layer engine computes what the model computes,
and every method quantizes it through the same code a recipe runs.

The models are tiny and random (2 layers, hidden 64), built from each family's own transformers config and
written by ``save_pretrained``, with the synthetic byte-fallback tokenizer; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from quantfab.pipelines.recipe import QuantizeSpec
from quantfab.tasks.decoder import Decoder, layout
from quantfab.tasks.errors import UserError
from quantfab.tasks.modelio import CPU, ModelDir, relative
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
}


def tiny_model(folder: Path, model_type: str, seed: int = 0, **extra) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **COMMON, **FAMILIES.get(model_type, {}), **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # N(0, 1/fan_in), larger than the default init, so quantization error shows in the logits
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5)
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
    decoder.load_outer(weights.load(decoder.entry_names()))
    hidden = decoder.embed(ids)
    for i in range(decoder.num_layers):
        layer = decoder.layer(i, relative(weights.load(weights.layer_names(i)), weights.prefix(i)))
        hidden = decoder.run_layer(i, layer, hidden)
    decoder.load_outer(weights.load(decoder.outer_names))
    model = AutoModelForCausalLM.from_pretrained(folder.path, attn_implementation=config._attn_implementation).eval()
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(decoder.logits(ids, hidden), expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def trials(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trial]:
    root = tmp_path_factory.mktemp("families")
    return {t: Trial(tiny_model(root / t, t), Store(str(root / f"{t}-store")), windows(16, 64, 2), windows(8, 64, 3))
            for t in sorted(FAMILIES)}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_method_quantizes_every_linear_of_the_family(trials: dict[str, Trial], model_type: str) -> None:
    """rtn, gptq and awq on INT4 g32: every Linear the layout lists gets codes, and the calibrated methods
    lose less than round-to-nearest (KL against the float model, on held-out windows)."""
    trial = trials[model_type]
    shape = layout(trial.config)
    kl = {}
    for method in ("rtn", "gptq", "awq"):
        files = trial.layer_files(QuantizeSpec(method=method), "INT4_G32_ASYM")
        coded = {r.name for f in files for r in f.reports() if r.grid}
        assert coded == {f"{shape.prefix(i)}{lin}" for i, lins in enumerate(shape.linears) for lin in lins}
        kl[method] = trial.metrics(QuantizeSpec(method=method), "INT4_G32_ASYM")["kl_divergence"]
    print(model_type, {k: round(v, 5) for k, v in kl.items()})
    assert 0 < kl["gptq"] < kl["rtn"] and 0 < kl["awq"] < kl["rtn"], kl


@pytest.mark.parametrize(("config", "message"), [
    ({"model_type": "t5", "is_encoder_decoder": True}, "encoder-decoder"),
    ({"model_type": "bert"}, "encoder or encoder-decoder"),
    ({"model_type": "clip"}, "not a causal LM"),
    ({"model_type": "mixtral", "num_local_experts": 4}, "mixture of experts"),
])
def test_models_the_engine_cannot_run_are_refused_naming_the_type(tmp_path: Path, config: dict, message: str) -> None:
    import json

    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message) as err:
        ModelDir(tmp_path).config()
    assert str(tmp_path / "config.json") in str(err.value) and config["model_type"] in str(err.value)


REPO = Path(__file__).resolve().parent.parent
BUILDS = {  # method -> the outputs it is built into (gguf only for families with a GGUF writer)
    "rtn": "[{gguf: Q8_0}]",
    "gptq": "[{format: compressed-tensors, type: int4, group_size: 32, symmetric: true}]",  # transformers cannot
    # load asymmetric pack-quantized checkpoints (see test_formats.py)
    "awq": "[{format: compressed-tensors, type: int4, group_size: 32, symmetric: true}]",
}
LOGIT_ATOL = 2e-4  # fp32 logits of transformers' forward against validate's layer-at-a-time forward
LLAMA_CPP_MAX_KL = 1e-3  # nats per token: llama.cpp runs Q8_0 matmuls on activations rounded to 8 bits


class FamilyBuild:
    """download -> calibrate -> quantize -> convert -> validate of one tiny model, through the stage functions."""

    def __init__(self, folder: Path, method: str, store: Store, stages):
        from quantfab.pipelines.recipe_loading import load_recipe
        from quantfab.tasks import validate as validate_mod
        from quantfab.tasks.download import materialize

        r = load_recipe(REPO / "recipes" / "tinystories-656k-q4_0.yaml", [
            f"model.source={folder}", "calibration.source=synthetic://tokens?seed=5", "calibration.samples=16",
            "calibration.seq_len=64", "validate.source=synthetic://tokens?seed=6", "validate.tokens=1024",
            "validate.window=64", f"quantize.method={method}", f"outputs={BUILDS[method]}"])
        self.store, self.outputs = store, r.outputs
        built = stages(r, store)
        self.model, self.converted = built.model, built.converted
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

    from quantfab.tasks import validate as validate_mod
    from quantfab.tasks.convert import FORMATS
    from quantfab.tasks.families import family

    built = builds[model_type]
    for method in ("gptq", "awq"):
        b = built[method]
        (key,) = [o.key for o in b.outputs]
        path = b.written(key)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        shape = layout(b.folder.config())
        assert sum(k.endswith("weight_packed") for k in hf.state_dict()) == sum(map(len, shape.linears))
        with torch.no_grad():
            theirs = hf(torch.from_numpy(b.ids)).logits
        reader = FORMATS["compressed-tensors"].reader(path, b.folder.config())
        ours = validate_mod.logits(b.folder.config(), reader, b.folder.weights(), b.ids)
        assert (theirs - ours).abs().max().item() <= LOGIT_ATOL, (method, (theirs - ours).abs().max().item())
        assert 0 < b.metrics["outputs"][key]["kl_divergence"] < 0.5
    if family(model_type).gguf is None:
        return
    b = built["rtn"]
    reader = gguf.GGUFReader(str(b.written("gguf-Q8_0")))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family(model_type).gguf.arch]]
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2 and t.name != "token_embd.weight"} == {"Q8_0"}
    assert b.metrics["outputs"]["gguf-Q8_0"]["kl_divergence"] < 1e-3  # 8-bit: what ships is the model, nearly


@pytest.mark.llama_cpp
# mistral is written as llama's architecture, which in llama.cpp has no sliding window: our tiny Mistral's window of
# 8 tokens would differ at every position (real ones, 4096 or none, differ only past their window)
@pytest.mark.parametrize("model_type", ["gemma2", "granite", "llama", "olmo2", "qwen2", "qwen3"])
def test_llama_cpp_runs_each_familys_gguf_as_transformers_runs_its_weights(builds: dict, model_type: str) -> None:
    """llama.cpp's logits for the Q8_0 file against transformers' for the same dequantized weights (validate's
    forward over the file's decoded tensors)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install .[llama-cpp])")
    from quantfab.tasks import validate as validate_mod
    from quantfab.tasks.convert.gguf import GGUFTensors
    from quantfab.tasks.llama_cpp import llama_cpp_logits

    b = builds[model_type]["rtn"]
    path, config = b.written("gguf-Q8_0"), b.folder.config()
    ours = validate_mod.logits(config, GGUFTensors(path, config), b.folder.weights(), b.ids).numpy()
    theirs = llama_cpp_logits(path, b.ids, threads=2)
    diff = float(np.abs(theirs - ours).max())
    agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
    logp = torch.log_softmax(torch.from_numpy(ours).double(), -1)
    kl = float((logp.exp() * (logp - torch.log_softmax(torch.from_numpy(theirs).double(), -1))).sum(-1).mean())
    print(f"{model_type}: KL(ours || llama.cpp) {kl:.2e}, top-1 agreement {agree:.4f}, max |logit difference| {diff:.3g}")
    assert kl <= LLAMA_CPP_MAX_KL and agree >= 0.95


def test_families_lists_the_table_and_gguf_is_refused_for_a_family_without_a_writer(tmp_path: Path) -> None:
    """`quantfab families` shows what works where; a GGUF output of a family without a GGUF writer is refused
    when its tensors are assigned (plan and quantize), naming the model_type, before any work."""
    from quantfab.pipelines.cli import main
    from quantfab.pipelines.recipe_loading import load_recipe
    from quantfab.tasks.convert import FORMATS
    from quantfab.tasks.quantize.assign import assign_layers

    assert main(["families"]) == 0
    folder = ModelDir(tiny_model(tmp_path, "gemma3_text"))
    recipe = load_recipe(REPO / "recipes" / "tinystories-656k-q4_0.yaml", [f"model.source={folder.path}"])
    with pytest.raises(UserError, match="gguf: model_type 'gemma3_text' has no GGUF writer"):
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
    assert f"{tmp_path}/config.json: model_type 'bert' is an encoder" in out, out
    assert "Traceback" not in out and not (tmp_path / "store" / "blobs").exists()
